"""Benchmark: tracer's plain and traced conversion against the original converter's procedure, same run.

    python benchmarks/bench_convert.py                 # ALIGN-base demo checkpoint (written once to demo/base)
    python benchmarks/bench_convert.py --repeats 3     # three interleaved rounds, the median of each mode
    python benchmarks/bench_convert.py --size small    # a quick look
    python benchmarks/bench_convert.py --modes trace --batch 8   # the activation budget at batch 8

Each mode runs in its own process (so peak RSS is its own) on the same checkpoint and inputs (2 images, 2 texts):
- `baseline`: the original converter's procedure (transformers' `convert_align_tf_to_hf.py`): build the Keras model,
  compile it and restore it with `load_weights`; gather every variable's value in a dict; build the HF model with
  its default initialisation; copy through the rename table in a plain loop over all variables; one forward each;
  save.
- `plain`: `convert.py --save_model` (no Keras model: weights straight from the checkpoint, the outputs compared
  with the reference outputs stored with the inputs).
- `trace`: `convert.py --trace --save_model`.
Writes benchmarks/results/convert-<size>.json and .csv (wall, CPU, peak RSS, per-phase times) and prints the
ratios against the baseline with the targets (trace ≤ 0.6× wall, ≤ 0.8× RSS; plain ≤ 0.4× wall, ≤ 0.6× RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"trace": {"wall": 0.6, "rss": 0.8}, "plain": {"wall": 0.4, "rss": 0.6}}


def _phase(timings: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - start, 3)
    return now


def run_baseline(checkpoint: str, inputs_file: str, out_dir: str) -> dict:
    """The original converter's steps, with this project's reference model standing in for coyo's code."""
    timings: dict = {}
    t = time.perf_counter()
    import numpy as np
    import tensorflow  # noqa: F401  (imports are part of every procedure's cost)
    import torch
    from transformers import AlignModel

    from tracer.families.align.hf import align_config
    from tracer.families.align.inputs import inputs_from_npz
    from tracer.families.align.keras_ref.align import build_reference, embed
    from tracer.engine.mapping import map_by_rules
    from tracer.families.align.rules import ALIGN_RULES
    from tracer.families.align.spec import derive_spec
    from tracer.engine.transforms import get_transform

    t = _phase(timings, "imports", t)
    shapes = {k: tuple(v) for k, v in _weight_shapes(checkpoint).items()}
    spec = derive_spec(shapes)
    keras_model = build_reference(spec)
    keras_model.compile()
    t = _phase(timings, "build Keras", t)
    keras_model.load_weights(checkpoint).expect_partial()
    t = _phase(timings, "load_weights", t)
    # As the original: every variable's value in a dict, then the HF model with its default initialisation.
    tf_params = {v.name: v.numpy() for v in keras_model.trainable_variables}
    tf_params.update({v.name: v.numpy() for v in keras_model.non_trainable_variables})
    hf_model = AlignModel(align_config(spec)).eval()
    t = _phase(timings, "build HF", t)
    table = {e.variable: e for e in map_by_rules(shapes, ALIGN_RULES, spec.vision.block_index()).entries}
    state = hf_model.state_dict()
    for name, value in tf_params.items():  # a plain loop over all variables
        entry = table.get(name.removesuffix(":0"))
        if entry is not None:
            state[entry.parameter].copy_(torch.from_numpy(get_transform(entry.transform)(value)))
    t = _phase(timings, "copy", t)
    inputs = inputs_from_npz(inputs_file)
    with torch.inference_mode():
        out = hf_model(pixel_values=inputs.torch_pixel_values(), **inputs.torch_text())
    t = _phase(timings, "forward HF", t)
    keras_out = embed(keras_model, inputs.pixel_values_nhwc, inputs.input_ids, inputs.attention_mask,
                      inputs.token_type_ids)
    diff = float(np.max(np.abs(out.image_embeds.numpy() - keras_out["image_embeds"])))
    t = _phase(timings, "forward Keras", t)
    hf_model.save_pretrained(out_dir)
    _phase(timings, "save", t)
    return {"timings": timings, "image_embeds_max_abs": diff}


def _weight_shapes(checkpoint: str) -> dict:
    from tracer.io.checkpoint import open_checkpoint

    with open_checkpoint(checkpoint) as ckpt:
        return ckpt.shapes()


def run_tracer(checkpoint: str, inputs_file: str, out_dir: str, trace: bool) -> dict:
    import convert

    budget = os.environ.get("TRACER_BENCH_BUDGET_MB")  # --budget, passed down to the child
    args = (["--activation_budget_mb", budget] if budget else []) + ["--checkpoint_path", checkpoint, "--inputs", inputs_file, "--save_model", "--overwrite",
            "--pytorch_dump_folder_path", out_dir, "--log_level", "warning"]
    if trace:
        args += ["--trace", "--report_dir", str(Path(out_dir).parent / "report")]
    start = time.perf_counter()
    captured = {}
    original = convert._convert  # not tracer.pipeline.convert: importing it here would import torch too early

    def spy(options, keras):
        captured["keras"] = keras
        captured["result"] = original(options, keras)
        return captured["result"]

    convert._convert = spy
    code = convert.main(args)
    if code:
        raise SystemExit(f"convert.py exited {code}")
    result, keras = captured["result"], captured["keras"]
    return {"worker_peak_rss_mb": round(keras.peak_rss_mb, 1) if keras is not None else 0.0,
            "timings": {"imports+cli": round(time.perf_counter() - start - sum(result.timings.values()), 3),
                        **{k: round(v, 3) for k, v in result.timings.items()}},
            "image_embeds_max_abs": result.parity.image_embeds_max_abs, "parity_against": result.parity.against}


def child(mode: str, checkpoint: str, inputs_file: str) -> None:
    """Run one mode in this process and print its measurements as JSON."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if mode == "baseline":  # TensorFlow imported as the original converter did: Keras 3 loads with it
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        out = str(Path(tmp) / "model")
        if mode == "baseline":
            measured = run_baseline(checkpoint, inputs_file, out)
        else:
            measured = run_tracer(checkpoint, inputs_file, out, trace=(mode == "trace"))
    from tracer.memory import peak_rss_mb

    # A traced run's Keras worker process, joined by now (its CPU time is among the children's): its peak, as it
    # reported it, is added to ours: an upper bound of the pair's peak (they need not peak at once; the shared
    # ring counts in both). Peaks are VmHWM (`peak_rss_mb`), not ru_maxrss: Linux carries that across exec, so
    # a child of a parent that had peaked (writing the demo checkpoint, say) would report the parent's peak.
    own = peak_rss_mb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    measured.setdefault("worker_peak_rss_mb", 0.0)
    measured.update(tensorflow_imported="tensorflow" in sys.modules, own_peak_rss_mb=round(own, 1))
    measured.update(mode=mode, wall_s=round(time.perf_counter() - wall0, 2),
                    cpu_s=round(time.process_time() - cpu0 + children.ru_utime + children.ru_stime, 2),
                    peak_rss_mb=round(own + measured["worker_peak_rss_mb"], 1))
    print("RESULT " + json.dumps(measured))


def _repeated_inputs(inputs_file: str, batch: int) -> str:
    """The demo's inputs and reference outputs repeated to `batch` rows (same rows, same outputs)."""
    import numpy as np

    arrays = dict(np.load(inputs_file))
    repeated = {k: (np.resize(v, (batch, *v.shape[1:])) if v.ndim and k != "temperature" else v)
                for k, v in arrays.items()}
    path = Path(tempfile.gettempdir()) / f"tracer-bench-inputs-{batch}.npz"
    np.savez(path, **repeated)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--modes", default="baseline,plain,trace")
    parser.add_argument("--budget", type=float, default=None, help="--activation_budget_mb for the traced run")
    parser.add_argument("--batch", type=int, default=None,
                        help="run on this many images and texts (the demo's inputs repeated, with their reference "
                             "outputs); default: the demo's own 2")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every mode, interleaved (so drift hits each alike); the median wall is kept")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.checkpoint, args.inputs)
        return 0

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tracer.families.align.demo import ensure_demo_checkpoint

    bundle = ensure_demo_checkpoint(args.size, ROOT / "demo" / args.size)
    checkpoint, inputs_file = str(bundle / "model-weights"), str(bundle / "reference.npz")
    if args.batch:
        inputs_file = _repeated_inputs(inputs_file, args.batch)
    if args.budget:
        os.environ["TRACER_BENCH_BUDGET_MB"] = str(args.budget)
    from bench_bert import median_of  # this folder's: the run with the median wall, every run's beside it

    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--checkpoint", checkpoint,
                                   "--inputs", inputs_file], capture_output=True, text=True, cwd=ROOT)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"mode {mode} failed ({proc.returncode})")
            run = json.loads(line[0][len("RESULT "):])
            runs[mode].append(run)
            print(f"{mode:8s} wall {run['wall_s']:7.1f} s  cpu {run['cpu_s']:7.1f} s  "
                  f"peak RSS {run['peak_rss_mb']:8.0f} MB  phases {run['timings']}", flush=True)
    results = {mode: median_of(r) for mode, r in runs.items()}

    if "baseline" in results:
        base = results["baseline"]
        for mode, target in TARGETS.items():
            if mode in results:
                wall = results[mode]["wall_s"] / base["wall_s"]
                rss = results[mode]["peak_rss_mb"] / base["peak_rss_mb"]
                results[mode]["ratios"] = {"wall": round(wall, 3), "rss": round(rss, 3)}
                print(f"{mode:8s} wall {wall:.2f}× (target ≤ {target['wall']}×, "
                      f"{'met' if wall <= target['wall'] else 'MISSED'}), peak RSS {rss:.2f}× (target ≤ "
                      f"{target['rss']}×, {'met' if rss <= target['rss'] else 'MISSED'})")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stamp = {"size": args.size, "batch": args.batch or 2, "repeats": args.repeats, "activation_budget_mb": args.budget or 512, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"), "modes": results}
    name = f"convert-{args.size}" + (f"-batch{args.batch}" if args.batch else "") + \
        (f"-budget{args.budget:g}" if args.budget else "")
    (out / f"{name}.json").write_text(json.dumps(stamp, indent=2) + "\n")
    with open(out / f"{name}.csv", "w") as f:
        f.write("mode,wall_s,cpu_s,peak_rss_mb,wall_ratio,rss_ratio\n")
        for mode, r in results.items():
            ratios = r.get("ratios", {})
            f.write(f"{mode},{r['wall_s']},{r['cpu_s']},{r['peak_rss_mb']},{ratios.get('wall', '')},"
                    f"{ratios.get('rss', '')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
