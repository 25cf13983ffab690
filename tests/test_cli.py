"""Bad input, end to end through the CLI: every case gets a message naming the cause and what to do, the documented
exit code, and no output folder (or an untouched one).

In-process `convert.main([...])` wherever that is enough; real processes only to kill a run while it saves, to run
with sockets blocked and to run as a user who cannot write the destination.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVERT_PY = ROOT / "convert.py"
_spec = importlib.util.spec_from_file_location("tracer_convert_cli", CONVERT_PY)
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)


# --------------------------------------------------------------------------------------------------- helpers


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def text(self, level=logging.WARNING) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= level)


def run(*args) -> tuple[int, str, str]:
    """`convert.main(args)` in this process: (exit code, ERROR messages, WARNING-and-above messages)."""
    handler = _Messages()
    log = logging.getLogger("tracer")
    log.addHandler(handler)
    try:
        code = convert.main([str(a) for a in args] + ["--log_level", "warning"])
    finally:
        log.removeHandler(handler)
    return code, handler.text(logging.ERROR), handler.text()


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary siblings of `folder` (`.NAME.partial-*`, `.NAME.old-*`)."""
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.*"))


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert leftovers(out) == []


def copy_checkpoint(bundle: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in bundle.glob("model-weights*"):
        shutil.copy(f, folder / f.name)
    return folder / "model-weights"


def rewrite_checkpoint(bundle: Path, prefix: Path, edit) -> Path:
    """The bundle's weights, changed by `edit(dict)`, written as a TF2 object-based checkpoint whose variables carry
    those names (what the reader goes by), like a training run's `save_weights` would."""
    import tensorflow as tf

    from tracer.io.checkpoint import open_checkpoint

    with open_checkpoint(bundle / "model-weights") as ckpt:
        weights = {name: ckpt.read(name) for name in ckpt.weights}
    edit(weights)
    variables = {f"v{i}": tf.Variable(value, name=name) for i, (name, value) in enumerate(weights.items())}
    tf.train.Checkpoint(**variables).write(str(prefix))
    return prefix


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "hf_model"


@pytest.fixture
def args(tiny_bundle, out):
    """A complete, valid command line for the tiny bundle, saving to `out`."""
    return ["--checkpoint_path", tiny_bundle / "model-weights", "--inputs", tiny_bundle / "reference.npz",
            "--save_model", "--pytorch_dump_folder_path", out]


def with_checkpoint(args: list, path) -> list:
    args = list(args)
    args[args.index("--checkpoint_path") + 1] = path
    return args


# --------------------------------------------------------------------------------------------------- 1. paths


def test_checkpoint_path_that_does_not_exist(args, out, tmp_path):
    start = time.perf_counter()
    code, error, _ = run(*with_checkpoint(args, tmp_path / "nowhere" / "model-weights"))
    assert code == 2
    assert "nowhere/model-weights does not exist" in error and "pass the prefix given to model.save_weights()" in error
    assert time.perf_counter() - start < 5  # before anything heavy: no model is built
    assert_no_output(out)


def test_index_without_its_data_shard(args, out, tiny_bundle, tmp_path):
    prefix = copy_checkpoint(tiny_bundle, tmp_path / "ckpt")
    os.remove(f"{prefix}.data-00000-of-00001")
    code, error, _ = run(*with_checkpoint(args, f"{prefix}.index"))
    assert code == 2
    assert "data shard(s) missing" in error and "model-weights.data-00000-of-00001" in error and "copy every" in error
    assert_no_output(out)


def test_truncated_data_file(args, out, tiny_bundle, tmp_path):
    prefix = copy_checkpoint(tiny_bundle, tmp_path / "ckpt")
    data = Path(f"{prefix}.data-00000-of-00001")
    os.truncate(data, data.stat().st_size // 2)
    code, error, _ = run(*with_checkpoint(args, prefix))
    assert code == 2
    assert "is truncated" in error and "copy the checkpoint again" in error
    assert_no_output(out)


def test_corrupted_data_file(args, out, tiny_bundle, tmp_path):
    """Sizes intact, bytes flipped inside one tensor: TensorFlow's checksum catches it when that tensor is read."""
    from tensorflow.core.protobuf import tensor_bundle_pb2

    from tracer.io.checkpoint import _table_entries, open_checkpoint

    prefix = copy_checkpoint(tiny_bundle, tmp_path / "ckpt")
    entries = {}
    for key, value in _table_entries(Path(f"{prefix}.index").read_bytes()):
        if key:
            entry = tensor_bundle_pb2.BundleEntryProto()
            entry.ParseFromString(value)
            entries[key.decode()] = entry
    with open_checkpoint(prefix) as ckpt:
        key = ckpt.weights["tf_bert_model/bert/embeddings/word_embeddings/weight"].key
    with open(f"{prefix}.data-00000-of-00001", "r+b") as f:
        f.seek(entries[key].offset + entries[key].size // 2)
        f.write(b"\xde\xad\xbe\xef")
    code, error, _ = run(*with_checkpoint(args, prefix))
    assert code == 2
    assert "cannot read variable 'tf_bert_model/bert/embeddings/word_embeddings/weight'" in error
    assert "corrupted or incomplete, copy the checkpoint again" in error
    assert_no_output(out)


def test_file_that_is_not_a_checkpoint(args, out, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    code, error, _ = run(*with_checkpoint(args, notes))
    assert code == 2
    assert "neither a TensorFlow checkpoint nor a Keras HDF5 weights file" in error and "save_weights" in error
    assert_no_output(out)


@pytest.fixture(scope="module")
def folder_run(tiny_bundle, tmp_path_factory):
    """One successful run covering several inputs at once: the checkpoint given as a training folder (its
    `checkpoint` file names the current prefix; an older, damaged checkpoint lies beside it), an image and a text
    longer than 64 tokens, and an existing non-empty output folder replaced with --overwrite."""
    from PIL import Image

    from tracer.families.align.inputs import default_vocab_file

    tmp = tmp_path_factory.mktemp("folder_run")
    training = tmp / "training"
    copy_checkpoint(tiny_bundle, training)
    shutil.copy(tiny_bundle / "checkpoint", training / "checkpoint")
    (training / "ckpt-1.index").write_bytes(b"\0" * 64)  # not current, and unreadable if it were picked
    (training / "ckpt-1.data-00000-of-00001").write_bytes(b"\0" * 64)
    # The tiny checkpoint's vocabulary has 1,024 tokens: the first 1,024 of the uncased BERT vocabulary fit it.
    vocab = tmp / "vocab.txt"
    vocab.write_text("".join(Path(default_vocab_file()).read_text().splitlines(keepends=True)[:1024]))
    image = tmp / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(image)
    out = tmp / "hf_model"
    out.mkdir()
    (out / "previous.txt").write_text("an older conversion")
    long_text = " ".join(["the cat sat on the mat and looked at the dog"] * 10)
    code, error, messages = run("--checkpoint_path", training, "--image", image, "--text", long_text,
                                "--text", "a short one", "--vocab_file", vocab, "--save_model",
                                "--pytorch_dump_folder_path", out, "--overwrite")
    return code, error, messages, out


def test_folder_with_checkpoint_file_resolves_to_the_current_prefix(folder_run):
    code, error, _, _ = folder_run
    assert (code, error) == (0, "")


def test_overwrite_replaces_an_existing_folder_with_a_complete_model(folder_run):
    _, _, _, out = folder_run
    files = {p.name for p in out.iterdir()}
    assert "previous.txt" not in files
    assert {"config.json", "model.safetensors", "processor_config.json"} <= files
    assert leftovers(out) == []
    from transformers import AlignConfig

    assert AlignConfig.from_pretrained(out).text_config.num_hidden_layers == 2


def test_long_text_is_truncated_with_a_warning(folder_run):
    _, _, messages, _ = folder_run
    assert "text 0 ('the cat sat on the mat" in messages and "truncated to 64 tokens" in messages
    assert "text 1" not in messages


# --------------------------------------------------------------------------------------------------- 2. shapes


def test_image_tower_with_its_own_projection_is_refused(args, out, tiny_bundle, tmp_path):
    """coyo's B0-B6 layout: `dense` projects the image features, `dense_1` the text. The text projection must not be
    taken by its name `dense`: the checkpoint is refused."""

    def add_image_projection(weights):
        for leaf in ("kernel", "bias"):
            weights[f"dense_1/{leaf}"] = weights.pop(f"dense/{leaf}")
        rng = np.random.default_rng(1)
        width = weights["block7a_project_conv/kernel"].shape[-1]  # the image features' width
        weights["dense/kernel"] = rng.standard_normal((width, weights["dense_1/kernel"].shape[1]), np.float32)
        weights["dense/bias"] = np.zeros(weights["dense_1/kernel"].shape[1], np.float32)

    prefix = rewrite_checkpoint(tiny_bundle, tmp_path / "b0" / "model-weights", add_image_projection)
    for extra in ([], ["--trace", "--mapping", "infer", "--report_dir", tmp_path / "report"]):
        code, error, _ = run(*with_checkpoint(args, prefix), *extra)
        assert code == 3
        assert "the image tower has its own Dense projection (dense/kernel takes the image features" in error
        assert "AlignModel has no image projection, so it cannot hold this checkpoint" in error
        assert_no_output(out)
        assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_missing_extra_or_misshapen_variables_are_named(case, args, out, tiny_bundle, tmp_path):
    layer1 = "tf_bert_model/bert/encoder/layer_._1/"

    def edit(weights):
        if case == "missing":
            del weights[layer1 + "output/dense/bias"]
        elif case == "extra":
            weights["classifier_head/kernel"] = np.zeros((64, 3), np.float32)
        else:
            weights[layer1 + "intermediate/dense/kernel"] = np.zeros((64, 200), np.float32)

    prefix = rewrite_checkpoint(tiny_bundle, tmp_path / case / "model-weights", edit)
    code, error, _ = run(*with_checkpoint(args, prefix))
    assert code == 3
    expected = {
        "missing": ["1 weight(s) missing from the checkpoint: `text_model.encoder.layer.1.output.dense.bias`",
                    f"the checkpoint's layer `{layer1}output/dense` lacks it", "use the complete checkpoint"],
        "extra": ["have no place in AlignModel: ['classifier_head/kernel']", "coyo-align ALIGN checkpoint?"],
        "shape": [f"`{layer1}intermediate/dense/kernel`: checkpoint shape (64, 200)", "needs (64, 256)",
                  "cannot be converted"],
    }[case]
    for part in expected:
        assert part in error
    assert_no_output(out)


def test_bert_of_another_size_is_derived(out, tmp_path):
    """A 3-layer, 128-wide BERT (2 heads of 64, as coyo builds them) converts; nothing about it is hard-coded."""
    from transformers import AlignConfig

    from tracer.families.align.demo import demo_inputs, demo_spec, write_demo_checkpoint
    from tracer.families.align.spec import AlignSpec, TextSpec

    tiny = demo_spec("tiny")
    spec = AlignSpec(vision=tiny.vision, embed_dim=tiny.embed_dim,
                     text=TextSpec(vocab_size=1024, hidden_size=128, num_layers=3, num_heads=2,
                                   intermediate_size=512))
    prefix = write_demo_checkpoint(tmp_path / "bert3" / "model-weights", spec)
    np.savez(tmp_path / "inputs.npz", **demo_inputs(spec, n=1))
    code, error, _ = run("--checkpoint_path", prefix, "--inputs", tmp_path / "inputs.npz", "--save_model",
                         "--pytorch_dump_folder_path", out)
    assert (code, error) == (0, "")
    text = AlignConfig.from_pretrained(out).text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == \
        (3, 128, 2, 512)


# --------------------------------------------------------------------------------------------------- 3. values


@pytest.fixture(scope="module")
def nonfinite_checkpoint(tiny_bundle, tmp_path_factory):
    """NaN and Inf in rows of the position table no input reaches (64 tokens of 512 positions)."""

    def spoil(weights):
        table = weights["tf_bert_model/bert/embeddings/position_embeddings/embeddings"]
        table[-1, 0], table[-2, 3] = np.nan, np.inf

    return rewrite_checkpoint(tiny_bundle, tmp_path_factory.mktemp("nonfinite") / "model-weights", spoil)


def test_nonfinite_weights_are_refused_by_name(args, out, nonfinite_checkpoint):
    code, error, _ = run(*with_checkpoint(args, nonfinite_checkpoint))
    assert code == 2
    assert "1 weight(s) hold NaN or Inf: ['tf_bert_model/bert/embeddings/position_embeddings/embeddings']" in error
    assert "pass --allow_nonfinite" in error
    assert_no_output(out)


def test_nonfinite_weights_convert_with_allow_nonfinite(args, out, nonfinite_checkpoint):
    code, error, messages = run(*with_checkpoint(args, nonfinite_checkpoint), "--allow_nonfinite")
    assert (code, error) == (0, "")
    assert "converting 1 weight(s) that hold NaN or Inf" in messages and "position_embeddings" in messages
    assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------- 4. output


def test_non_empty_output_folder_is_refused_before_reading(args, out, monkeypatch):
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    def must_not_run(*a, **k):
        raise AssertionError("the checkpoint was opened before the output folder was checked")

    monkeypatch.setattr("tracer.io.checkpoint._resolve", must_not_run)
    code, error, _ = run(*args)
    assert code == 2
    assert f"output folder {out} exists and is not empty; pass --overwrite to replace it" in error
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert leftovers(out) == []


def test_output_path_that_is_a_file(args, out):
    out.write_text("a file")
    code, error, _ = run(*args, "--overwrite")
    assert code == 2 and "exists and is not a folder" in error and out.read_text() == "a file"


def test_existing_report_folder_and_mapping_file_are_refused(args, out, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "notes.md").write_text("mine")
    code, error, _ = run(*args, "--trace", "--report_dir", report)
    assert code == 2 and f"report folder {report} exists and is not empty; pass --overwrite" in error
    assert (report / "notes.md").read_text() == "mine"
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("mine")
    code, error, _ = run(*args, "--mapping_out", mapping)
    assert code == 2 and f"mapping file {mapping} already exists; pass --overwrite" in error
    assert mapping.read_text() == "mine"
    assert_no_output(out)


def _unprivileged() -> list[str]:
    """A command prefix that drops root, who writes through any permission bits."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without `setpriv` (util-linux) to drop privileges: a read-only folder cannot be "
                    "made")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_read_only_destination_fails_fast(tiny_bundle):
    base = Path(tempfile.mkdtemp(prefix="tracer-ro-"))
    try:
        base.chmod(0o755)
        read_only = base / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        out = read_only / "hf_model"
        start = time.perf_counter()
        proc = subprocess.run(
            [*_unprivileged(), sys.executable, str(CONVERT_PY), "--checkpoint_path", str(tiny_bundle / "model-weights"),
             "--save_model", "--pytorch_dump_folder_path", str(out)],
            cwd=base, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(base)})
        elapsed = time.perf_counter() - start
        assert proc.returncode == 2, proc.stderr
        assert f"output folder {out}: cannot write into {read_only}" in proc.stderr
        assert "make it writable or choose another --pytorch_dump_folder_path" in proc.stderr
        # Checked before torch, transformers and TensorFlow are even imported (those take ~10 s here).
        assert elapsed < 5, f"took {elapsed:.1f} s"
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)
        shutil.rmtree(base)


SLOW_SAVE = """
import os, pathlib, runpy, sys, time
import transformers

_save = transformers.PreTrainedModel.save_pretrained


def slow_save(self, save_directory, *args, **kwargs):
    _save(self, save_directory, *args, **kwargs)  # the weights are on disk, the processor is not yet
    pathlib.Path(os.environ["TRACER_TEST_SAVING"]).write_text(str(save_directory))
    time.sleep(600)


transformers.PreTrainedModel.save_pretrained = slow_save
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python convert.py` would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def killed_runs(tiny_bundle, tmp_path_factory):
    """Two conversions killed while saving (SIGKILL; SIGTERM into an existing folder with --overwrite), run side by
    side. Returns {signal: (folder, exit code, stderr, what was on disk at the moment of the kill)}."""
    tmp = tmp_path_factory.mktemp("killed")
    script = tmp / "slow_save.py"
    script.write_text(SLOW_SAVE)
    procs = {}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        work = tmp / sig.name
        work.mkdir()
        out = work / "hf_model"
        extra = []
        if sig == signal.SIGTERM:
            out.mkdir()
            (out / "previous.txt").write_text("an older conversion")
            extra = ["--overwrite"]
        env = {**os.environ, "TRACER_TEST_SAVING": str(work / "saving")}
        cmd = [sys.executable, str(script), str(CONVERT_PY), "--checkpoint_path", str(tiny_bundle / "model-weights"),
               "--inputs", str(tiny_bundle / "reference.npz"), "--save_model", "--pytorch_dump_folder_path",
               str(out), "--log_level", "warning", *extra]
        procs[sig] = (work, out, subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True))
    results = {}
    deadline = time.monotonic() + 400
    pending = dict(procs)
    while pending and time.monotonic() < deadline:
        for sig, (work, out, proc) in list(pending.items()):
            if (work / "saving").exists():
                partial = Path((work / "saving").read_text())
                seen = {"partial": partial, "partial_files": sorted(p.name for p in partial.iterdir()),
                        "destination": sorted(p.name for p in out.iterdir()) if out.exists() else None}
                proc.send_signal(sig)
                _, stderr = proc.communicate(timeout=60)
                results[sig] = (out, proc.returncode, stderr, seen)
                del pending[sig]
            elif proc.poll() is not None:
                results[sig] = (out, proc.returncode, proc.communicate()[1], None)
                del pending[sig]
        time.sleep(0.2)
    for _, _, proc in pending.values():
        proc.kill()
    assert not pending, "the conversion never reached the save"
    return results


def test_sigkill_while_saving_leaves_no_model_folder(killed_runs, args):
    out, code, stderr, seen = killed_runs[signal.SIGKILL]
    assert seen is not None, stderr
    # At the kill: the half-written model lay in a hidden partial folder beside the destination, not in it.
    assert seen["destination"] is None and "model.safetensors" in seen["partial_files"]
    assert seen["partial"].parent == out.parent and seen["partial"].name.startswith(".hf_model.partial-")
    assert code == -signal.SIGKILL
    assert not out.exists()
    # SIGKILL cannot be caught: the partial folder stays until the next run writing there removes it, whatever
    # that run's fate (here it fails on its checkpoint path).
    assert leftovers(out) == [seen["partial"].name]
    code, error, _ = run("--checkpoint_path", out.parent / "missing", "--save_model",
                         "--pytorch_dump_folder_path", out)
    assert code == 2 and leftovers(out) == [] and not out.exists()


def test_sigterm_while_saving_keeps_the_previous_folder(killed_runs):
    out, code, stderr, seen = killed_runs[signal.SIGTERM]
    assert seen is not None, stderr
    assert seen["destination"] == ["previous.txt"]
    assert code == 143
    assert "interrupted by SIGTERM" in stderr and "no half-written output is left" in stderr
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------------- 5. network


BLOCK_NETWORK = """
import os, runpy, socket, sys

LOG = os.environ["TRACER_TEST_NETWORK_LOG"]


def refuse(what, *args):
    with open(LOG, "a") as f:
        f.write(f"{what} {args[:1]!r}\\n")
    raise OSError(101, "network access blocked by the test")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse("connect_ex", address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.create_connection = lambda *a, **k: refuse("create_connection", *a)
socket.getaddrinfo = lambda *a, **k: refuse("getaddrinfo", *a)
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python convert.py` would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def offline_runs(tiny_bundle, tmp_path_factory):
    """With every socket connection and DNS lookup refused (and logged), side by side:
    `offline`: HF_HUB_OFFLINE=1, a full --trace --save_model run;
    `push`: HF_HUB_OFFLINE unset and no token anywhere, --push_to_hub."""
    tmp = tmp_path_factory.mktemp("offline")
    script = tmp / "block_network.py"
    script.write_text(BLOCK_NETWORK)
    procs = {}
    for name in ("offline", "push"):
        work = tmp / name
        (work / "hf_home").mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
        env.update(TRACER_TEST_NETWORK_LOG=str(work / "network.log"), HF_HOME=str(work / "hf_home"),
                   HOME=str(work))
        if name == "offline":
            env["HF_HUB_OFFLINE"] = "1"
        flags = (["--trace", "--report_dir", str(work / "report"), "--save_model"] if name == "offline"
                 else ["--push_to_hub", "--hub_repo_id", "someone/align-tiny"])
        cmd = [sys.executable, str(script), str(CONVERT_PY), "--checkpoint_path", str(tiny_bundle / "model-weights"),
               "--inputs", str(tiny_bundle / "reference.npz"), "--pytorch_dump_folder_path", str(work / "hf_model"),
               *flags]
        procs[name] = (work, time.perf_counter(), subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (work, start, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=500)
        log = work / "network.log"
        results[name] = dict(work=work, code=proc.returncode, stdout=stdout, stderr=stderr,
                             network=log.read_text() if log.exists() else "", seconds=time.perf_counter() - start)
    return results


def test_full_traced_run_touches_no_network(offline_runs):
    r = offline_runs["offline"]
    assert r["code"] == 0, r["stderr"][-3000:]
    assert r["network"] == ""
    assert (r["work"] / "hf_model" / "model.safetensors").is_file()
    assert (r["work"] / "report" / "summary.json").is_file()


def test_push_without_a_token_fails_after_saving_and_keeps_the_model(offline_runs):
    r = offline_runs["push"]
    assert r["code"] == 4, r["stderr"][-3000:]
    assert r["network"] == ""  # without a token nothing is tried: no connection, no lookup, no wait
    assert "ERROR tracer: cannot push to the hub as `someone/align-tiny`: no Hugging Face token found" in r["stderr"]
    assert "the converted model is saved and kept in" in r["stderr"] and "hf upload someone/align-tiny" in r["stderr"]
    assert (r["work"] / "hf_model" / "model.safetensors").is_file()
    # and it was said at the start, before the work
    assert r["stderr"].index("the push will fail after the model is saved") < r["stderr"].index("ERROR tracer")


# --------------------------------------------------------------------------------------------------- 6. inputs


def test_image_that_is_not_an_image(args, out, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is text, not a JPEG")
    cli = list(args)
    at = cli.index("--inputs")
    del cli[at:at + 2]
    code, error, _ = run(*cli, "--image", fake, "--text", "a cat")
    assert code == 2
    assert "holiday.jpg" in error and "not a readable image" in error and "PNG, JPEG" in error
    assert_no_output(out)


@pytest.mark.parametrize("case", ["misspelt key", "missing key", "NCHW pixels", "short input_ids"])
def test_inputs_with_wrong_keys_or_shapes(case, args, out, tiny_bundle, tmp_path):
    arrays = dict(np.load(tiny_bundle / "reference.npz"))
    if case == "misspelt key":
        arrays["token_types_ids"] = arrays.pop("token_type_ids")
        expected = "unknown key(s) ['token_types_ids']"
    elif case == "missing key":
        del arrays["attention_mask"]
        expected = "missing key(s) ['attention_mask']"
    elif case == "NCHW pixels":
        arrays["pixel_values"] = arrays["pixel_values"].transpose(0, 3, 1, 2)
        expected = "which is NCHW: transpose to (0, 2, 3, 1)"
    else:
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            arrays[k] = arrays[k][:, :32]
        expected = "`input_ids` must be shape (2, 64); got shape (2, 32)"
    bad = tmp_path / "inputs.npz"
    np.savez(bad, **arrays)
    cli = list(args)
    cli[cli.index("--inputs") + 1] = bad
    code, error, _ = run(*cli)
    assert code == 2
    assert str(bad) in error and expected in error
    assert_no_output(out)
