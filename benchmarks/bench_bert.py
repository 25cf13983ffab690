"""Benchmark: tracer's BERT conversion against transformers 4's own loaders, at BERT-Base size, offline.

    python benchmarks/bench_bert.py                    # BERT-Base (12 layers, hidden 768), both checkpoint kinds
    python benchmarks/bench_bert.py --size small       # a quick look (2 layers, hidden 128)
    python benchmarks/bench_bert.py --venv /tmp/tf4    # where the transformers 4 environment is (made once)

The checkpoints are the project's own BERT-Base demo (random weights, pre-training heads): a google-research TF1
checkpoint with Adam slots and `global_step` (`demo/bert-<size>`, as `convert.py --demo bert-base` writes it) and
transformers 4's `TFBertForPreTraining` `tf_model.h5` (`demo/bert-<size>-h5`). Both sides run on the same inputs
(the three default sentences, tokenized once into an .npz). Each procedure runs in a fresh process; its wall time
is measured around the process (interpreter start and imports included), its peak RSS by the process itself.

The old procedures run in a separate virtual environment with transformers 4.57.6, torch 2.13.0 (CPU),
tensorflow-cpu 2.21 and tf-keras 2.21 (`TF_USE_LEGACY_KERAS=1`), created with pip on first use. Where pip cannot
make it (offline, no wheels), the old side is skipped with the reason printed and tracer is still measured.

- `old-tf1`: `BertForPreTraining(config)` + `load_tf_weights_in_bert`, a forward, `save_pretrained`;
- `old-h5`: `BertForPreTraining(config)` on real storage + `load_tf2_checkpoint_in_pytorch_model`, forward, save;
- `old-from-tf`: `BertModel.from_pretrained(h5 folder, from_tf=True)`, then forward and save, each tried and what
  happened recorded (not timed against: it is the path that no longer works);
- `tracer-{tf1,h5}-{plain,trace}`: `convert.py --checkpoint_path ... --inputs ... --save_model` (`--trace`).

Prints wall, peak RSS and the ratios tracer/old with the targets (plain ≤ 0.75× wall and ≤ 0.7× RSS, `--trace`
≤ 1.0× wall); writes benchmarks/results/bert_<size>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / "benchmarks" / ".venv-tf4"
# torch pinned exactly: the CPU wheel on this machine's disk; any other spec resolves to a multi-GB CUDA build.
OLD_REQUIREMENTS = ("transformers==4.57.6", "torch==2.13.0", "tensorflow-cpu==2.21.*", "tf-keras==2.21.*")
SIZES = {"base": {}, "small": {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 512}}
TARGETS = {"plain": {"wall": 0.75, "rss": 0.7}, "trace": {"wall": 1.0}}
OLD_OF = {"tf1": "old-tf1", "h5": "old-h5"}  # the old procedure each tracer run is measured against
SEQ_LENGTH = 32


# ------------------------------------------------------------------------------------------ the children

def _rss_mb() -> float:
    """Peak RSS of this process (`tracer.memory.peak_rss_mb`, read without importing tracer: the old side has
    none)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)


def _inputs(path: str):
    import numpy as np
    import torch

    with np.load(path) as data:
        return {k: torch.from_numpy(data[k].astype(np.int64)) for k in ("input_ids", "attention_mask",
                                                                         "token_type_ids")}


def _phase(timings: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - start, 3)
    return now


def _forward_and_save(model, inputs: str, out: str, timings: dict, t: float) -> dict:
    """The old procedures' common end: one forward on the inputs, `save_pretrained`, what they report."""
    import torch
    import transformers

    model.eval()
    with torch.no_grad():
        hidden = model.bert(**_inputs(inputs)).last_hidden_state
    t = _phase(timings, "forward", t)
    model.save_pretrained(out)
    _phase(timings, "save", t)
    return {"transformers": transformers.__version__, "torch": torch.__version__, "timings": timings,
            "last_hidden_state_abs_mean": float(hidden.abs().mean())}


def old_tf1(checkpoint: str, inputs: str, out: str) -> dict:
    """transformers 4's TF1 procedure (`convert_bert_original_tf_checkpoint_to_pytorch.py`'s steps)."""
    timings: dict = {}
    t = time.perf_counter()
    from transformers import BertConfig, BertForPreTraining
    from transformers.models.bert.modeling_bert import load_tf_weights_in_bert

    t = _phase(timings, "imports", t)
    config = BertConfig.from_json_file(str(Path(checkpoint).parent / "bert_config.json"))
    model = BertForPreTraining(config)
    t = _phase(timings, "build (random init)", t)
    load_tf_weights_in_bert(model, config, checkpoint)  # imports TensorFlow
    t = _phase(timings, "load_tf_weights_in_bert", t)
    return _forward_and_save(model, inputs, out, timings, t)


def old_h5(checkpoint: str, inputs: str, out: str) -> dict:
    """transformers 4's TF2 procedure into a model on real storage: `load_tf2_checkpoint_in_pytorch_model`."""
    timings: dict = {}
    t = time.perf_counter()
    from transformers import BertConfig, BertForPreTraining
    from transformers.modeling_tf_pytorch_utils import (
        load_tf2_checkpoint_in_pytorch_model,
    )

    t = _phase(timings, "imports", t)
    config = BertConfig.from_pretrained(str(Path(checkpoint).parent))
    model = BertForPreTraining(config)
    t = _phase(timings, "build (random init)", t)
    load_tf2_checkpoint_in_pytorch_model(model, checkpoint)  # builds TFBertForPreTraining, load_weights, copies
    t = _phase(timings, "load_tf2_checkpoint_in_pytorch_model", t)
    return _forward_and_save(model, inputs, out, timings, t)


def old_from_tf(checkpoint: str, inputs: str, out: str) -> dict:
    """`BertModel.from_pretrained(folder, from_tf=True)`: each step tried, what happened recorded."""
    timings: dict = {}
    t = time.perf_counter()
    import torch
    import transformers
    from transformers import BertModel

    t = _phase(timings, "imports", t)
    record: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "timings": timings}
    try:
        model = BertModel.from_pretrained(str(Path(checkpoint).parent), from_tf=True)
    except Exception as exc:  # noqa: BLE001  (recorded, not raised: what this path does is the measurement)
        record["from_pretrained"] = f"{type(exc).__name__}: {exc}"[:500]
        return record
    t = _phase(timings, "from_pretrained", t)
    devices: dict[str, int] = {}
    for p in model.parameters():
        devices[str(p.device)] = devices.get(str(p.device), 0) + 1
    record.update(from_pretrained="ok", parameter_devices=devices)
    for step, call in (("forward", lambda: model(**_inputs(inputs))),
                       ("save_pretrained", lambda: model.save_pretrained(out))):
        try:
            with torch.no_grad():
                call()
            record[step] = "ok"
        except Exception as exc:  # noqa: BLE001  (as above)
            record[step] = f"{type(exc).__name__}: {exc}"[:500]
        t = _phase(timings, step, t)
    return record


def run_tracer(checkpoint: str, inputs: str, out: str, trace: bool) -> dict:
    """`convert.py` in this process, as a user runs it; its stage timings parsed from what it prints."""
    sys.path.insert(0, str(ROOT))
    import convert

    argv = ["--checkpoint_path", checkpoint, "--inputs", inputs, "--save_model", "--overwrite",
            "--pytorch_dump_folder_path", out, "--log_level", "warning"]
    if trace:
        argv += ["--trace", "--report_dir", str(Path(out).parent / "report")]
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = convert.main(argv)
    text = printed.getvalue()
    if code:
        raise SystemExit(f"convert.py exited {code}:\n{text[-3000:]}")
    timings = parse_timings(text)
    timings = {"imports+cli": round(time.perf_counter() - start - sum(timings.values()), 3), **timings}
    parity = re.search(r"^parity: (.*)$", text, re.MULTILINE)
    return {"timings": timings, "parity": parity.group(1) if parity else None,
            "tensorflow_imported": "tensorflow" in sys.modules}


def parse_timings(printed: str) -> dict[str, float]:
    """convert.py's `timings: read checkpoint 0.1s, ...` line as {stage: seconds}."""
    line = re.search(r"^timings: (.*)$", printed, re.MULTILINE)
    if not line:
        return {}
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"\s*([^,]+?) (\d+(?:\.\d+)?)s(?:,|$)", line.group(1))}


PROCEDURES = {"old-tf1": old_tf1, "old-h5": old_h5, "old-from-tf": old_from_tf}


def child(mode: str, checkpoint: str, inputs: str) -> None:
    """Run one procedure in this process; print its measurements as one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory(prefix="bench-bert-") as tmp:
        out = str(Path(tmp) / "model")
        if mode in PROCEDURES:
            measured = PROCEDURES[mode](checkpoint, inputs, out)
        else:
            measured = run_tracer(checkpoint, inputs, out, trace=mode.endswith("-trace"))
    measured.update(mode=mode, peak_rss_mb=_rss_mb())
    print("RESULT " + json.dumps(measured))


def write_checkpoints(size: str) -> None:
    """The demo checkpoints (once) and the shared inputs, in this process (the main environment)."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    import tracer  # noqa: F401  (before TensorFlow: legacy Keras)
    from tracer.families.bert.family import DEFAULT_TEXTS
    from tracer.families.bert.tokenizer import build_tokenizer
    from tracer.families.bert.writers import base_spec, minilm_folder, write_base_demo

    paths = checkpoint_paths(size)
    for format, path in paths.items():
        if not Path(path).with_name(Path(path).name + (".index" if format == "tf1" else "")).is_file():
            write_base_demo(Path(path).parent, format, **SIZES[size])
    tokenizer = build_tokenizer(base_spec(**SIZES[size]), str(minilm_folder() / "vocab.txt"), True)
    enc = [tokenizer(*(t if isinstance(t, tuple) else (t,)), padding="max_length", truncation=True,
                     max_length=SEQ_LENGTH, return_token_type_ids=True) for t in DEFAULT_TEXTS]
    np.savez(inputs_path(size), **{k: np.asarray([e[k] for e in enc], np.int64)
                                   for k in ("input_ids", "attention_mask", "token_type_ids")})


def checkpoint_paths(size: str) -> dict[str, str]:
    return {"tf1": str(ROOT / "demo" / f"bert-{size}" / "bert_model.ckpt"),
            "h5": str(ROOT / "demo" / f"bert-{size}-h5" / "tf_model.h5")}


def inputs_path(size: str) -> str:
    return str(ROOT / "demo" / f"bert-{size}-inputs.npz")


# ------------------------------------------------------------------------------------------ the parent

def old_environment(venv: Path) -> tuple[str | None, str]:
    """The transformers 4 environment's python, made with pip on first use; (None, why) when it cannot be."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import transformers, torch, tensorflow, tf_keras; print(transformers.__version__)"]
    if python.is_file():
        done = subprocess.run(probe, check=False, capture_output=True, text=True, env=_old_env())
        if done.returncode == 0 and done.stdout.strip().startswith("4."):
            return str(python), f"transformers {done.stdout.strip()} in {venv}"
    print(f"creating the transformers 4 environment in {venv} ({' '.join(OLD_REQUIREMENTS)}) ...", flush=True)
    steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "-q", *OLD_REQUIREMENTS])
    for step in steps:
        done = subprocess.run(step, check=False, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            return None, f"`{' '.join(step)}` failed ({done.returncode}): {' | '.join(tail)}"
    done = subprocess.run(probe, check=False, capture_output=True, text=True, env=_old_env())
    if done.returncode or not done.stdout.strip().startswith("4."):
        return None, f"the new environment does not import transformers 4: {done.stderr.strip()[-500:]}"
    return str(python), f"transformers {done.stdout.strip()} in {venv} (created now)"


def _old_env() -> dict:
    return {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def measure(python: str, mode: str, checkpoint: str, inputs: str, env: dict | None = None) -> dict:
    """One procedure in a fresh process: its own measurements plus the wall time around the whole process."""
    start = time.perf_counter()
    done = subprocess.run([python, __file__, "--child", mode, "--checkpoint", checkpoint, "--inputs", inputs],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not line:
        return {"mode": mode, "failed": f"exit {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"}
    return {**json.loads(line[-1][len("RESULT "):]), "wall_s": round(wall, 2)}


def ratios(results: dict[str, dict]) -> list[dict]:
    """Each tracer run against the old procedure for its checkpoint kind, with the targets met or missed."""
    rows = []
    for mode, r in results.items():
        if not mode.startswith("tracer-") or "wall_s" not in r:
            continue
        _, kind, how = mode.split("-")
        old = results.get(OLD_OF[kind], {})
        if "wall_s" not in old:
            continue
        row = {"mode": mode, "against": OLD_OF[kind], "wall": round(r["wall_s"] / old["wall_s"], 3),
               "rss": round(r["peak_rss_mb"] / old["peak_rss_mb"], 3)}
        row["met"] = {k: row[k] <= limit for k, limit in TARGETS[how].items()}
        rows.append(row)
    return rows


def median_of(runs: list[dict]) -> dict:
    """The run with the median wall, with every run's wall and RSS beside it."""
    good = [r for r in runs if "wall_s" in r]
    if not good:
        return runs[-1]
    chosen = dict(sorted(good, key=lambda r: r["wall_s"])[len(good) // 2])
    if len(good) > 1:
        chosen.update(walls_s=[r["wall_s"] for r in good], peak_rss_mbs=[r["peak_rss_mb"] for r in good],
                      peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in good))
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=list(SIZES))
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="the transformers 4 environment (made once)")
    parser.add_argument("--modes", default="old-tf1,old-h5,old-from-tf,tracer-tf1-plain,tracer-tf1-trace,"
                                           "tracer-h5-plain,tracer-h5-trace")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode; the median wall is kept")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.checkpoint, args.inputs)
        return 0
    if args.write:
        write_checkpoints(args.write)
        return 0

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in PROCEDURES and m not in
               {f"tracer-{k}-{h}" for k in OLD_OF for h in TARGETS}]
    if unknown:
        parser.error(f"unknown modes {unknown}")
    subprocess.run([sys.executable, __file__, "--write", args.size], check=True, cwd=ROOT)
    paths, inputs = checkpoint_paths(args.size), inputs_path(args.size)
    old_python, why = (None, "no old procedure asked for")
    if any(m in PROCEDURES for m in modes):
        old_python, why = old_environment(Path(args.venv))
        print(("old procedures: " if old_python else "SKIPPING the old procedures: ") + why, flush=True)

    results: dict[str, dict] = {}
    for mode in modes:
        if mode in PROCEDURES and old_python is None:
            results[mode] = {"mode": mode, "skipped": why}
            continue
        kind = "h5" if mode in ("old-h5", "old-from-tf") else mode.split("-")[1]
        python, env = (old_python, _old_env()) if mode in PROCEDURES else (sys.executable, None)
        results[mode] = median_of([measure(python, mode, paths[kind], inputs, env) for _ in range(args.repeats)])
        r = results[mode]
        if "failed" in r:
            print(f"{mode:18s} FAILED {r['failed']}", flush=True)
            continue
        extra = {k: r[k] for k in ("from_pretrained", "parameter_devices", "forward", "save_pretrained") if k in r}
        print(f"{mode:18s} wall {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  phases {r['timings']}"
              + (f"  {extra}" if extra else ""), flush=True)

    table = ratios(results)
    if table:
        print(f"\n{'tracer run':18s} {'against':8s} {'wall':>7s} {'RSS':>7s}  targets")
    for row in table:
        how = row["mode"].rsplit("-", 1)[1]
        said = ", ".join(f"{k} ≤ {TARGETS[how][k]}× {'met' if ok else 'MISSED'}" for k, ok in row["met"].items())
        print(f"{row['mode']:18s} {row['against']:8s} {row['wall']:6.2f}× {row['rss']:6.2f}×  {said}")
    if old_python is None and any(m in PROCEDURES for m in modes):
        print(f"\nthe old side was skipped ({why}): tracer measured alone, no ratios")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    stamp = {"size": args.size, "sizes": SIZES[args.size] or "BERT-Base", "repeats": args.repeats,
             "seq_length": SEQ_LENGTH, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
             "old_environment": why, "targets": TARGETS, "modes": results, "ratios": table}
    (out / f"bert_{args.size}.json").write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"written {out / f'bert_{args.size}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
