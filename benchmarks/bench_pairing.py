"""Time the pairing of ALIGN-base's layer sequences (EfficientNet-B7 + BERT-base).

    python benchmarks/bench_pairing.py [--size base] [--repeat 5]

Records both models once (one image, one text; uninitialised weights are enough for shapes and call order),
then times `pair_records` alone, and prints and writes the figures (benchmarks/results/pairing.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from tracer.families.align.demo import demo_inputs, demo_spec
    from tracer.families.align.hf import align_config, build_empty, materialize_uninitialized
    from tracer.families.align.inputs import Inputs
    from tracer.families.align.keras_ref.align import build_reference
    from tracer.engine.pairing import pair_records
    from tracer.families.align.record import record_keras, record_torch

    spec = demo_spec(args.size)
    arrays = demo_inputs(spec, n=1)
    inputs = Inputs(arrays["pixel_values"], arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"])
    keras_records = record_keras(build_reference(spec), inputs, keep_outputs=False)
    torch_records, _ = record_torch(materialize_uninitialized(build_empty(align_config(spec))), inputs,
                                    keep_outputs=False)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        pairs = pair_records(keras_records, torch_records)
        times.append(time.perf_counter() - start)
    result = {
        "size": args.size,
        "keras_records": {t: sum(r.tower == t for r in keras_records) for t in ("vision", "text")},
        "torch_records": {t: sum(r.tower == t for r in torch_records) for t in ("vision", "text")},
        "paired": sum(p.paired for p in pairs),
        "pairing_seconds": {"median": statistics.median(times), "min": min(times), "max": max(times),
                            "repeat": args.repeat},
    }
    out = Path(__file__).parent / "results" / f"pairing-{args.size}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
