"""What `tracer.trace` costs against the two forwards it replaces: EfficientNetB0 (tf_keras.applications) against
transformers' `EfficientNetForImageClassification`, batch 8 at 224.

Measured in one process, each figure the median of `--repeats` runs: one Keras forward, one torch forward, and
`tracer.trace` of the same batch (probe, pairing, inference, weight copy, both models side by side with every
paired layer compared; no diagnosis, since nothing diverges). Target: trace <= 4x (Keras + torch forward).
Activation memory: the process's RSS is sampled every 5 ms during each call; its peak above the RSS before the
call is what the call added (both models are built before). Target: within `--budget` for the trace.

    python benchmarks/bench_api.py [--batch 8] [--budget 512 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tracer  # noqa: E402  (TensorFlow's environment first)

RESULTS = Path(__file__).parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PeakRSS:
    """The process's peak RSS while the block runs, sampled every 5 ms, above its RSS at the start."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.added = self.peak - self.start


def build(batch: int):
    import tf_keras
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    rng = np.random.default_rng(0)
    tf_keras.utils.set_random_seed(1)
    keras_model = tf_keras.applications.EfficientNetB0(weights=None, classifier_activation=None)
    noise = np.kron(rng.standard_normal((16, 28, 28, 3)), np.ones((1, 8, 8, 1)))
    calibration = np.clip(127.5 + 60 * noise, 0, 255).astype(np.float32)
    norms = [layer for layer in keras_model.submodules if isinstance(layer, tf_keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    keras_model(calibration, training=True)  # BatchNorm statistics of natural-looking images
    config = EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, dropout_rate=0.2,
                                depthwise_padding=[], hidden_dim=1280, num_labels=1000)
    torch_model = EfficientNetForImageClassification(config).eval()
    images = calibration[:batch] if batch <= 16 else np.concatenate([calibration] * (batch // 16 + 1))[:batch]
    norm = next(layer for layer in keras_model.layers if isinstance(layer, tf_keras.layers.Normalization))
    normalise = tf_keras.Model(keras_model.input, norm.output)
    pixels = np.ascontiguousarray(np.transpose(normalise(images).numpy(), (0, 3, 1, 2)))
    return keras_model, torch_model, images, pixels


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, median MB added at peak, last result)."""
    from tracer.memory import trim

    times, added, out = [], [], None
    for _ in range(repeats):
        out = None
        trim()  # what earlier calls freed goes back to the system: the peak is this call's own
        with PeakRSS() as peak:
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
        added.append(peak.added)
    return statistics.median(times), statistics.median(added), out


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=float, nargs="+", default=[512.0, 128.0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    keras_model, torch_model, images, pixels = build(args.batch)
    keras_model(images[:1])  # first-call costs out of the measurement
    with torch.inference_mode():
        torch_model(pixel_values=torch.from_numpy(pixels[:1]))
    keras_s, keras_mb, _ = timed(lambda: keras_model(images, training=False), args.repeats)

    def torch_forward():
        with torch.inference_mode():
            return torch_model(pixel_values=torch.from_numpy(pixels))

    torch_s, torch_mb, _ = timed(torch_forward, args.repeats)
    results = {"batch": args.batch, "repeats": args.repeats, "keras_forward_s": keras_s, "torch_forward_s": torch_s,
               "keras_forward_added_mb": keras_mb, "torch_forward_added_mb": torch_mb, "trace": []}
    for budget in args.budget:
        trace_s, trace_mb, run = timed(lambda: tracer.trace(keras_model, torch_model, images,
                                                            torch_inputs={"pixel_values": pixels},
                                                            activation_budget_mb=budget), args.repeats)
        assert run.verdict == "match", run.summary["verdict_reasons"]
        results["trace"].append({"budget_mb": budget, "trace_s": trace_s, "added_mb": trace_mb,
                                 "ratio_to_forwards": trace_s / (keras_s + torch_s), "layers": len(run.rows),
                                 "timings": {k: round(v, 3) for k, v in run.timings.items()}})
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"api-efficientnetb0-batch{args.batch}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"EfficientNetB0, batch {args.batch}, median of {args.repeats}:")
    print(f"  Keras forward {keras_s:.2f} s (+{keras_mb:.0f} MB at peak), torch forward {torch_s:.2f} s "
          f"(+{torch_mb:.0f} MB)")
    for t in results["trace"]:
        print(f"  tracer.trace, budget {t['budget_mb']:.0f} MB: {t['trace_s']:.2f} s = {t['ratio_to_forwards']:.2f}x "
              f"the two forwards (target <= 4x), +{t['added_mb']:.0f} MB at peak (budget {t['budget_mb']:.0f}); "
              f"{t['layers']} layers; {t['timings']}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
