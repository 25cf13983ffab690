"""benchmarks/bench_bert.py's pure helpers: the stage timings it reads from convert.py's output, the ratio table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_bert  # noqa: E402


def test_timings_line_is_parsed_by_stage():
    printed = "parity: ... -> OK\ntimings: read checkpoint 0.0s, build Keras reference 6.2s, copy weights 12.5s\n"
    assert bench_bert.parse_timings(printed) == {"read checkpoint": 0.0, "build Keras reference": 6.2,
                                                 "copy weights": 12.5}
    assert bench_bert.parse_timings("no timings here") == {}


def test_ratios_against_the_same_kind_with_the_targets():
    results = {"old-tf1": {"wall_s": 20.0, "peak_rss_mb": 2000.0}, "old-h5": {"skipped": "no venv"},
               "tracer-tf1-plain": {"wall_s": 14.0, "peak_rss_mb": 1500.0},
               "tracer-tf1-trace": {"wall_s": 19.0, "peak_rss_mb": 2100.0},
               "tracer-h5-plain": {"wall_s": 9.0, "peak_rss_mb": 900.0}}
    rows = {r["mode"]: r for r in bench_bert.ratios(results)}
    assert set(rows) == {"tracer-tf1-plain", "tracer-tf1-trace"}  # nothing to divide by for h5
    assert rows["tracer-tf1-plain"]["wall"] == 0.7 and rows["tracer-tf1-plain"]["rss"] == 0.75
    assert rows["tracer-tf1-plain"]["met"] == {"wall": True, "rss": False}  # RSS target 0.7x
    assert rows["tracer-tf1-trace"]["met"] == {"wall": True}


def test_median_run_is_kept_with_every_run_beside_it():
    runs = [{"wall_s": w, "peak_rss_mb": m} for w, m in ((12.0, 900.0), (10.0, 1000.0), (30.0, 800.0))]
    chosen = bench_bert.median_of(runs)
    assert chosen["wall_s"] == 12.0 and chosen["walls_s"] == [12.0, 10.0, 30.0] and chosen["peak_rss_mb"] == 900.0
