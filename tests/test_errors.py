"""Errors below the CLI: exit codes, derived-spec refusals, output folders, the hub push, the CLI's last-resort
handling; and property tests (layout transforms, pairing under gap layers, optimizer/metric state never a weight).
The end-to-end cases are in test_cli.py."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import variable_shapes
from test_mapping import KERAS_SHAPES
from tracer.errors import BadInputError, ConversionError, ParityError, PushError, TracerError
from tracer.output import clean_leftovers, preflight, write_folder_atomically
from tracer.families.align.spec import derive_spec

ROOT = Path(__file__).resolve().parents[1]


def test_exit_codes():
    assert [e.exit_code for e in (ParityError, BadInputError, ConversionError, PushError)] == [1, 2, 3, 4]
    assert all(issubclass(e, TracerError) for e in (ParityError, BadInputError, ConversionError, PushError))


# --------------------------------------------------------------------------------------------------- spec


@pytest.fixture(scope="module")
def tiny_shapes(tiny_bundle) -> dict:
    return variable_shapes(tiny_bundle / "variables.json")


def test_two_projections_are_refused_even_when_widths_coincide(tiny_shapes):
    """An image Dense whose input width equals the BERT width cannot be told apart by shape: still refused."""
    shapes = dict(tiny_shapes)
    hidden = shapes["tf_bert_model/bert/embeddings/word_embeddings/weight"][1]
    shapes["dense_1/kernel"], shapes["dense_1/bias"] = shapes.pop("dense/kernel"), shapes.pop("dense/bias")
    shapes["dense/kernel"], shapes["dense/bias"] = (hidden, 128), (128,)
    with pytest.raises(ConversionError, match=r"2 Dense projections \(dense/kernel \(64, 128\), dense_1/kernel "
                                              r"\(64, 128\)\).*AlignModel has no image projection"):
        derive_spec(shapes)


def test_no_projection_and_unusual_bert_widths_are_refused(tiny_shapes):
    shapes = {k: v for k, v in tiny_shapes.items() if not k.startswith("dense/")}
    with pytest.raises(ConversionError, match=r"expected one text projection Dense .* found: none"):
        derive_spec(shapes)
    odd = {k: ((v[0], 96) if k.endswith("word_embeddings/weight") else v) for k, v in tiny_shapes.items()}
    with pytest.raises(ConversionError, match="hidden size 96 is not a multiple of 64.*cannot be converted"):
        derive_spec(odd)


# --------------------------------------------------------------------------------------------------- outputs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_cleaned_and_live_ones_kept(tmp_path):
    dest = tmp_path / "hf_model"
    dead = _dead_pid()
    (tmp_path / f".hf_model.partial-{dead}-abc").mkdir()
    (tmp_path / f".hf_model.partial-{os.getpid()}-def").mkdir()  # a run in progress (this one)
    (tmp_path / f".other.partial-{dead}-abc").mkdir()  # another destination's
    (tmp_path / f".hf_model.old-{dead}").mkdir()  # killed between the two renames: the destination is missing
    (tmp_path / f".hf_model.old-{dead}" / "config.json").write_text("{}")
    clean_leftovers(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.partial-%d-abc" % dead, f".hf_model.partial-{os.getpid()}-def", "hf_model"])
    assert (dest / "config.json").is_file()  # the complete old folder is back in place
    # a folder of outputs with names of their own (reports/<checkpoint>-<timestamp>)
    reports = tmp_path / "reports"
    (reports / f".ckpt-20260101-120000.partial-{dead}-xyz").mkdir(parents=True)
    (reports / "ckpt-20260101-110000").mkdir()
    (reports / f".run.csv.partial-{dead}-q.csv").write_text("half")  # a --mapping_out file's stage
    clean_leftovers(reports, any_name=True)
    assert [p.name for p in reports.iterdir()] == ["ckpt-20260101-110000"]


def test_atomic_folder_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"

    def fill(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(dest, fill, overwrite=False)
    assert list(tmp_path.iterdir()) == []
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def reject(tmp):
        raise ParityError("reloads differently")

    with pytest.raises(ParityError):
        write_folder_atomically(dest, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True, verify=reject)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dest.iterdir()] == ["old.txt"]
    write_folder_atomically(dest, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dest.iterdir()] == ["new.txt"]
    assert dest.stat().st_mode & 0o777 == 0o777 & ~_umask()  # an ordinary folder, not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_preflight_names_the_missing_parent(tmp_path):
    options = SimpleNamespace(save_model=True, push_to_hub=False, overwrite=False, trace=False, mapping_out=None,
                              pytorch_dump_folder_path=str(tmp_path / "no" / "such" / "hf_model"))
    with pytest.raises(BadInputError, match=r"the parent folder .*/no/such does not exist; create it or choose "
                                            r"another --pytorch_dump_folder_path"):
        preflight(options)


def test_report_is_written_atomically(tmp_path, monkeypatch):
    """report.write_report writes beside the destination and renames: an interrupted write leaves no report folder
    and keeps an existing one."""
    from tracer.engine import report

    result = SimpleNamespace(rows=[], entries=[])
    dest = tmp_path / "report"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.page, "summary", interrupted)  # write_report's own lookup
    with pytest.raises(KeyboardInterrupt):
        report.write_report(result, dest, "ckpt")
    assert list(tmp_path.iterdir()) == []
    dest.mkdir()
    (dest / "summary.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        report.write_report(result, dest, "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["report"] and (dest / "summary.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------------- the hub


@pytest.fixture
def no_network(monkeypatch):
    """Every connection and lookup refused (and counted)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError(101, "network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="module")
def pipeline():
    from tracer import pipeline

    return pipeline


def _push(pipeline, folder):
    options = pipeline.ConvertOptions(pytorch_dump_folder_path=str(folder), hub_repo_id="someone/align")
    return pipeline.push(folder, options)


def test_push_without_token_fails_fast_offline(pipeline, tmp_path, monkeypatch, no_network):
    import huggingface_hub
    from huggingface_hub import constants

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    start = time.perf_counter()
    with pytest.raises(PushError, match=r"no Hugging Face token found.*saved and kept in .*hf upload someone/align"):
        _push(pipeline, tmp_path)
    assert time.perf_counter() - start < 2 and no_network == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        _push(pipeline, tmp_path)
    assert no_network == [] and (tmp_path / "config.json").is_file()


def test_push_with_token_and_no_network_fails_quickly(pipeline, tmp_path, monkeypatch, no_network):
    import huggingface_hub
    from huggingface_hub import constants

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    start = time.perf_counter()
    with pytest.raises(PushError, match=r"push to the hub as `someone/align` failed .*check the network"):
        _push(pipeline, tmp_path)
    assert time.perf_counter() - start < 30 and no_network  # tried, refused, gave up without hanging
    assert (tmp_path / "config.json").is_file()


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("tracer_convert_errors", ROOT / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("raised, code, message", [
    (RuntimeError("boom"), 70, "internal error (a bug in tracer, not in your input)"),
    (OSError(28, "No space left on device"), 2, "cannot read or write a file: [Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted by Ctrl-C"),
])
def test_unexpected_failures_keep_their_own_exit_codes(raised, code, message, cli, tiny_bundle, monkeypatch,
                                                        caplog):
    """Exit 1 means a parity failure: nothing else may end with it (Python's default for an uncaught exception)."""

    def fail(options, keras=None):
        raise raised

    monkeypatch.setattr("tracer.pipeline.convert", fail)
    assert cli.main(["--checkpoint_path", str(tiny_bundle / "model-weights"), "--log_level", "error"]) == code
    assert message in caplog.text


def test_demo_and_checkpoint_path_together_are_refused(cli, caplog):
    assert cli.main(["--demo", "tiny", "--checkpoint_path", "x", "--log_level", "error"]) == 2
    assert "--demo converts its own checkpoint: drop --checkpoint_path, or drop --demo" in caplog.text


# --------------------------------------------------------------------------------------------------- properties


def _float_arrays(shape):
    return hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=True, allow_infinity=True,
                                                            allow_subnormal=True))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_transforms_invert_bit_for_bit_on_any_float(data):
    """Extends test_mapping's round trip: arbitrary float32 bit patterns (NaN, ±Inf, -0.0, subnormals) survive the
    layout transforms and their inverses unchanged, and the forward result is contiguous (for torch.from_numpy)."""
    from tracer.engine.transforms import TRANSFORMS, get_transform

    name = data.draw(st.sampled_from(sorted(TRANSFORMS)))
    shape = tuple(data.draw(KERAS_SHAPES[name]))
    array = data.draw(_float_arrays(shape))
    t = get_transform(name)
    out = t(array)
    assert out.flags.c_contiguous and out.dtype == array.dtype
    back = t.inverse(out)
    assert back.shape == array.shape
    assert np.ascontiguousarray(back).view(np.uint32).tobytes() == array.view(np.uint32).tobytes()


# ---- pairing: stable under inserted gap layers


def _unit(kind: str, index: int, c_in: int, c: int, size: int):
    """One layer as both frameworks record it: (Keras records, torch records, the expected (keras, torch) pair)."""
    from tracer.engine.record import Record

    def rec(framework, path, cls, kind_, shape, variables, activation=None):
        return Record(framework, "vision", 0, path, cls, kind_, shape, "float32", variables, activation, kind_)

    nhwc, nchw = (1, size, size, c), (1, c, size, size)
    k_path, t_path = f"layer{index}_{kind}", f"encoder.layer{index}"
    if kind in ("conv", "conv_swish"):
        act = "swish" if kind == "conv_swish" else "linear"
        k = rec("keras", k_path, "Conv2D", "conv", nhwc, {"kernel": (3, 3, c_in, c), "bias": (c,)}, act)
        t = [rec("torch", t_path, "Conv2d", "conv", nchw, {"weight": (c, c_in, 3, 3), "bias": (c,)})]
        if kind == "conv_swish":  # fused in Keras, a separate module in torch: paired with the activation's output
            t.append(rec("torch", t_path + ".act", "SiLU", "activation", nchw, {}, "swish"))
        return [k], t, (k_path, t[-1].path)
    if kind == "depthwise":
        k = rec("keras", k_path, "DepthwiseConv2D", "depthwise", nhwc, {"depthwise_kernel": (3, 3, c, 1)})
        t = rec("torch", t_path, "AlignVisionDepthwiseConv2d", "depthwise", nchw, {"weight": (c, 1, 3, 3)})
        return [k], [t], (k_path, t_path)
    if kind == "batchnorm":
        k = rec("keras", k_path, "BatchNormalization", "batchnorm", nhwc,
                {n: (c,) for n in ("gamma", "beta", "moving_mean", "moving_variance")})
        t = rec("torch", t_path, "BatchNorm2d", "batchnorm", nchw,
                {n: (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        return [k], [t], (k_path, t_path)
    if kind == "activation":
        k = rec("keras", k_path, "Activation", "activation", nhwc, {}, "swish")
        t = rec("torch", t_path, "SiLU", "activation", nchw, {}, "swish")
        return [k], [t], (k_path, t_path)
    raise AssertionError(kind)


UNIT_KINDS = ("conv", "conv_swish", "depthwise", "batchnorm", "activation")


def _sequences(units):
    keras, torch, expected, c_in = [], [], set(), 3
    for i, (kind, c, size) in enumerate(units):
        c = c_in if kind in ("depthwise", "batchnorm", "activation") else c
        k, t, pair = _unit(kind, i, c_in, c, size)
        keras.append(k)
        torch.append(t)
        expected.add(pair)
        c_in = c
    return keras, torch, expected


def _gap(framework: str, kind: str, path: str, shape):
    from tracer.engine.record import Record

    cls = {"dropout": "Dropout", "reshape": "Reshape"}[kind]
    return Record(framework, "vision", 0, path, cls, kind, tuple(shape), "float32", {}, None, kind)


def _flatten(groups):
    records = [r for group in groups for r in group]
    for order, r in enumerate(records):
        r.order = order
    return records


def _paired(keras, torch) -> set:
    from tracer.engine.pairing import align

    return {(p.keras.path, p.torch.path) for p in align(keras, torch, "vision") if p.paired}


units_strategy = st.lists(st.tuples(st.sampled_from(UNIT_KINDS), st.integers(2, 9), st.sampled_from([4, 8, 16])),
                          min_size=1, max_size=10)


def test_pairing_without_any_unweighted_record():
    keras, torch, expected = _sequences([("conv", 4, 8), ("batchnorm", 4, 8)])
    assert _paired(_flatten(keras), _flatten(torch)) == expected


@settings(max_examples=150, deadline=None)
@given(units=units_strategy, data=st.data())
def test_pairing_is_stable_under_inserted_gap_layers(units, data):
    """Dropout/Reshape records inserted anywhere between layers, on either side, pair with nothing and move no
    pair. (The kinds inserted on the two sides differ: two Dropouts at unrelated places could rightly pair.)"""
    keras_units, torch_units, expected = _sequences(units)
    assert _paired(_flatten(keras_units), _flatten(torch_units)) == expected
    keras_kind = data.draw(st.sampled_from(["dropout", "reshape"]))
    torch_kind = "reshape" if keras_kind == "dropout" else "dropout"
    insertions = data.draw(st.lists(st.tuples(st.sampled_from(["keras", "torch"]), st.integers(0, len(units)),
                                              st.booleans()), max_size=8))
    keras_groups, torch_groups = [list(g) for g in keras_units], [list(g) for g in torch_units]
    keras_groups.insert(0, [])
    torch_groups.insert(0, [])
    for n, (side, at, same_shape) in enumerate(insertions):
        groups = keras_groups if side == "keras" else torch_groups
        before = [r for g in groups[:at + 1] for r in g]
        shape = before[-1].shape if (same_shape and before) else (1, 7 + n, 3)
        groups[at].append(_gap(side, keras_kind if side == "keras" else torch_kind, f"{side}_gap{n}", shape))
    assert _paired(_flatten(keras_groups), _flatten(torch_groups)) == expected


@settings(max_examples=100, deadline=None)
@given(units=units_strategy, data=st.data())
def test_matching_gap_layers_on_both_sides_pair_with_each_other_only(units, data):
    """The same Dropout in both frameworks, after the same layer: the two pair, every other pair stays."""
    keras_units, torch_units, expected = _sequences(units)
    where = sorted(set(data.draw(st.lists(st.integers(0, len(units) - 1), min_size=1, max_size=4))))
    for at in where:
        shape = keras_units[at][-1].shape
        keras_units[at].append(_gap("keras", "dropout", f"keras_dropout{at}", shape))
        torch_units[at].append(_gap("torch", "dropout", f"torch_dropout{at}", torch_units[at][-1].shape))
    got = _paired(_flatten(keras_units), _flatten(torch_units))
    assert got == expected | {(f"keras_dropout{at}", f"torch_dropout{at}") for at in where}


# ---- the reader: optimizer and metric state is never a weight, whatever the saver and the metrics


METRICS = {
    "mean": lambda k: k.metrics.Mean(name="loss"),
    "sum": lambda k: k.metrics.Sum(name="seen"),
    "auc": lambda k: k.metrics.AUC(name="auc", num_thresholds=5),
    "precision": lambda k: k.metrics.Precision(name="precision"),
    "recall": lambda k: k.metrics.Recall(name="recall"),
    "binary_accuracy": lambda k: k.metrics.BinaryAccuracy(name="accuracy"),
    "mean_iou": lambda k: k.metrics.MeanIoU(num_classes=2, name="iou"),
}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metrics=st.lists(st.sampled_from(sorted(METRICS)), max_size=3),
       saver=st.sampled_from(["save_weights", "checkpoint_model_optimizer", "checkpoint_model_only"]),
       optimizer=st.sampled_from(["adam", "legacy_adam", "sgd_momentum"]))
def test_reader_sets_aside_every_optimizer_and_metric_variable(metrics, saver, optimizer):
    """Extends test_checkpoint's property to more metric classes (Precision's `thresholds` list, MeanIoU's
    `total_cm` alias, MeanMetricWrapper's `_fn_kwargs`) and to `tf.train.Checkpoint(model=..., optimizer=...)`."""
    import tensorflow as tf
    import tf_keras as keras

    from tracer.io.checkpoint import open_checkpoint

    keras.backend.clear_session()
    inp = keras.Input((4,))
    x = keras.layers.Dense(3, name="proj")(inp)
    x = keras.layers.LayerNormalization(name="norm")(x)
    model = keras.Model(inp, x, name="tiny")
    own = {v.name[:-2] for v in model.weights}
    for i, name in enumerate(metrics):
        setattr(model, f"metric_{i}", METRICS[name](keras))
    opt = {"adam": lambda: keras.optimizers.Adam(1e-3), "legacy_adam": lambda: keras.optimizers.legacy.Adam(1e-3),
           "sgd_momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9)}[optimizer]()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(np.ones((2, 4), np.float32)) ** 2)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "w")
        if saver == "save_weights":
            model.optimizer = opt
            model.save_weights(prefix)
        elif saver == "checkpoint_model_optimizer":
            tf.train.Checkpoint(model=model, optimizer=opt).write(prefix)
        else:
            tf.train.Checkpoint(model=model).write(prefix)
        with open_checkpoint(prefix) as ckpt:
            assert set(ckpt.weights) == own
            roles = {v.role for v in ckpt.set_aside}
            assert roles <= {"optimizer", "metric"}
            assert ("metric" in roles) == bool(metrics)
