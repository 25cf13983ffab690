"""Time the per-layer comparison sums (`compare.Sums`) on activations shaped like ALIGN-base's (EfficientNet-B7 at
289 px, batch 2), as a traced run compares them: the Keras output (NHWC) against the HF output (NCHW, seen through a
transposed view: the accumulated error) and against the local re-run's output (channels-last, so a contiguous NHWC
array: the local error), both against the same reference as `Measured.add` does.

    python benchmarks/bench_compare.py [--repeat 7] [--threads 2] [--module path/to/compare.py]

`--module` times another version of compare.py (`git show REV:tracer/engine/compare.py > /tmp/old.py`), for a before/after.
Prints the median wall and process CPU time per shape (torch on 2 threads by default, as in a traced run on this
2-core machine; code that runs torch ops on several threads is at the mercy of other load here).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(2, 145, 145, 192), (2, 73, 73, 384), (2, 37, 37, 960), (2, 10, 10, 2560), (2, 64, 768)]


def arrays(shape: tuple[int, ...], seed: int = 0):
    """(reference, accumulated candidate, local candidate) as a traced run holds them. The HF side's arrays are
    torch's (its allocations are not on huge pages, numpy's large ones are: strided reads cost more on them)."""
    import torch

    rng = np.random.default_rng(seed)
    r = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    acc, local = torch.from_numpy(r + 1e-3 * noise), torch.from_numpy(r + 1e-6 * noise).clone()
    if len(shape) == 4:  # the HF output: NCHW in memory, seen as NHWC
        return r, acc.permute(0, 3, 1, 2).contiguous().numpy().transpose(0, 2, 3, 1), local.numpy()
    return r, acc.clone().numpy(), local.numpy()


def median_ms(fn, repeat: int) -> tuple[float, float]:
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--module", type=Path, help="a compare.py to time instead of tracer/engine/compare.py")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.module:
        importlib.import_module("tracer")  # the file's relative imports resolve in the package

        spec = importlib.util.spec_from_file_location("tracer._bench_compare", args.module)
        compare = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compare)
    else:
        from tracer.engine import compare
    Sums = compare.Sums

    def both(r, acc, loc):  # what `Measured.add` does with the two candidates
        if hasattr(Sums, "add_each"):
            Sums.add_each(r, [(Sums(), acc), (Sums(), loc)])
        else:
            Sums().add(r, acc), Sums().add(r, loc)

    total = np.zeros(6)
    print(f"{'shape':22s} {'accumulated (wall/cpu ms)':>26s} {'local':>16s} {'both':>16s}")
    for shape in SHAPES:
        r, acc, loc = arrays(shape)
        times = [*median_ms(lambda: Sums().add(r, acc), args.repeat),
                 *median_ms(lambda: Sums().add(r, loc), args.repeat),
                 *median_ms(lambda: both(r, acc, loc), args.repeat)]
        total += times
        print(f"{str(shape):22s} " + "   ".join(f"{w:7.1f} /{c:7.1f}" for w, c in zip(times[::2], times[1::2])))
    print(f"{'total':22s} " + "   ".join(f"{w:7.1f} /{c:7.1f}" for w, c in zip(total[::2], total[1::2])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
