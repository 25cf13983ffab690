"""Tests for tracer.io.checkpoint: tiny tf_keras models shaped like ALIGN, saved the ways coyo's training saves them."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

from tracer.io.checkpoint import (  # noqa: E402
    Checkpoint, Variable, _proto_decode, _proto_fields, _read_bundle_index, _table_entries, open_checkpoint,
)
from tracer.errors import BadInputError, ConversionError  # noqa: E402

from conftest import FIXTURES, shared_fixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FIXTURE = FIXTURES / "coyo_mini"
OPTIMIZERS = ("adam", "legacy_adam", "sgd_momentum", "legacy_rmsprop")


# ---------------------------------------------------------------------------------------------------------------
# tiny ALIGN-like models


class TinyAlign(keras.Model):
    """A subclassed model holding a functional image encoder, a Dense, an unnamed tf.Variable and Mean trackers."""

    def __init__(self, encoder, units, n_trackers, extra_variable=None):
        super().__init__(name="tiny_align")
        self.image_encoder = encoder
        self.proj = keras.layers.Dense(units, name="proj")
        self.temperature = tf.Variable(0.07)
        if extra_variable is not None:
            self.extra = tf.Variable(1.0, name=extra_variable)
        self.tracker_names = []
        for i in range(n_trackers):
            setattr(self, f"loss{i}_tracker", keras.metrics.Mean(name=f"loss{i}"))
            self.tracker_names.append(f"loss{i}_tracker")

    @property
    def trackers(self):
        return [getattr(self, n) for n in self.tracker_names]

    def call(self, x):
        out = self.proj(self.image_encoder(x)) / self.temperature
        if hasattr(self, "extra"):
            out = out * self.extra
        return out


def make_optimizer(kind):
    return {
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "legacy_adam": lambda: keras.optimizers.legacy.Adam(1e-3),
        "sgd_momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
        "legacy_rmsprop": lambda: keras.optimizers.legacy.RMSprop(1e-3),
    }[kind]()


def build_model(optimizer="adam", units=3, n_trackers=2, channels=4, extra_variable=None, seed=0):
    keras.backend.clear_session()
    tf.random.set_seed(seed)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(channels, 3, name="stem_conv")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = TinyAlign(keras.Model(inp, x, name="image_encoder"), units, n_trackers, extra_variable)
    model.compile(optimizer=make_optimizer(optimizer))
    images = np.random.RandomState(seed).rand(2, 8, 8, 3).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(images, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
    for tracker in model.trackers:
        tracker.update_state(loss)
    return model


def expected_weights(model):
    """name -> value of every model variable that is not metric state."""
    metric_refs = {v.ref() for t in model.trackers for v in t.variables}
    out = {}
    for v in model.weights:
        if v.ref() not in metric_refs:
            assert v.name.endswith(":0")
            out[v.name[:-2]] = v.numpy()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model per optimizer layout, saved as TF checkpoint and as .h5; returns (dir, expected weights)."""
    out = {}
    for kind in ("adam", "legacy_adam"):
        root = tmp_path_factory.mktemp(kind)
        model = build_model(kind)
        model.save_weights(str(root / "model-weights"))
        model.save_weights(str(root / "weights.h5"))
        out[kind] = (root, expected_weights(model))
    return out


def copy_tf(src_root: Path, dst: Path, state_file: bool = False) -> Path:
    """Copy the saved prefix's files (and, on request, the `checkpoint` state file save_weights wrote)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src_root.glob("model-weights*"):
        shutil.copy(f, dst / f.name)
    if state_file:
        shutil.copy(src_root / "checkpoint", dst / "checkpoint")
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst / "model-weights"


# ---------------------------------------------------------------------------------------------------------------
# optimizer layouts, metrics, values


@pytest.mark.parametrize("kind", ["adam", "legacy_adam"])
def test_tf_checkpoint_roles_and_values(saved, kind):
    root, expected = saved[kind]
    with open_checkpoint(root / "model-weights") as ckpt:
        assert isinstance(ckpt, Checkpoint) and ckpt.format == "tf"
        assert ckpt.path == str(root / "model-weights")
        assert set(ckpt.weights) == set(expected)
        assert "Variable" in ckpt.weights and "stem_conv/kernel" in ckpt.weights
        for name, value in expected.items():
            got = ckpt.read(name)
            assert got.shape == value.shape and ckpt.shapes()[name] == value.shape
            np.testing.assert_array_equal(got, value)
        assert ckpt.read("Variable") == pytest.approx(0.07, abs=0.002)  # one Adam step away from 0.07

        roles = {}
        for var in ckpt.set_aside:
            roles.setdefault(var.role, []).append(var)
        assert set(roles) == {"optimizer", "metric"}
        metrics = roles["metric"]
        assert sorted(v.name for v in metrics) == ["count", "count", "total", "total"]
        assert all(v.key.startswith(("loss0_tracker/", "loss1_tracker/")) for v in metrics)
        opt = roles["optimizer"]
        n_trainable = sum(1 for n in expected if not n.endswith(("moving_mean", "moving_variance")))
        if kind == "adam":  # Keras >= 2.11 layout: optimizer/_variables/N named Adam/m/<var>, Adam/v/<var>
            slot_names = {v.name for v in opt if v.key.startswith("optimizer/_variables/")}
            assert "Adam/m/stem_conv/kernel" in slot_names and "Adam/v/Variable" in slot_names
            assert sum(1 for v in opt if v.name.startswith("Adam/m/")) == n_trainable
            assert {"iteration", "learning_rate"} <= {v.name for v in opt}
            assert not any(".OPTIMIZER_SLOT" in v.key for v in ckpt.variables)
        else:  # legacy layout: <var>/.OPTIMIZER_SLOT/optimizer/m, plus iter, beta_1, ... under optimizer/
            slots = [v for v in opt if "/.OPTIMIZER_SLOT/optimizer/" in v.key]
            assert len(slots) == 2 * n_trainable
            assert {"Adam/iter", "Adam/learning_rate", "Adam/beta_1"} <= {v.name for v in opt}
            assert any(v.key.startswith("image_encoder/") for v in slots)  # stored under the model's own paths
        for var in opt:
            assert var.name not in ckpt.weights or ckpt.weights[var.name].key != var.key
        # every tensor of the file is listed exactly once
        keys = [v.key for v in ckpt.variables]
        assert len(keys) == len(set(keys))
        reader = tf.train.load_checkpoint(str(root / "model-weights"))
        assert set(keys) == set(reader.get_variable_to_shape_map()) - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
        # set-aside tensors are readable too, on request
        iteration = next(v for v in opt if v.name in ("iteration", "Adam/iter"))
        assert ckpt.read_variable(iteration) == 1
        assert all(isinstance(v, Variable) and v.role in ("weight", "optimizer", "metric") for v in ckpt.variables)
        assert [v.name for v in ckpt.weights.values()] == sorted(ckpt.weights)


@pytest.mark.parametrize("kind", ["adam", "legacy_adam"])
def test_h5_weights(saved, kind):
    root, expected = saved[kind]
    with open_checkpoint(root / "weights.h5") as ckpt:
        assert ckpt.format == "h5"
        assert set(ckpt.weights) == set(expected)
        assert ckpt.set_aside == []  # tf_keras save_weights writes neither optimizer nor metric state to .h5
        temperature = ckpt.weights["Variable"]
        assert temperature.key == "/top_level_model_weights/Variable:0" and temperature.shape == ()
        for name, value in expected.items():
            np.testing.assert_array_equal(ckpt.read(name), value)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_whole_model_h5_sets_optimizer_aside(tmp_path):
    keras.backend.clear_session()
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    model.compile(optimizer=keras.optimizers.legacy.Adam(), loss="mse")
    model.train_on_batch(np.ones((2, 4), "float32"), np.zeros((2, 2), "float32"))
    model.save(str(tmp_path / "model.h5"))
    with open_checkpoint(tmp_path / "model.h5") as ckpt:
        assert set(ckpt.weights) == {"d/kernel", "d/bias"}
        assert {v.name for v in ckpt.set_aside} == {"Adam/iter", "Adam/d/kernel/m", "Adam/d/kernel/v",
                                                    "Adam/d/bias/m", "Adam/d/bias/v"}
        assert all(v.role == "optimizer" for v in ckpt.set_aside)
        np.testing.assert_array_equal(ckpt.read("d/kernel"), model.get_layer("d").kernel.numpy())


def test_duplicate_weight_names_are_a_conversion_error(tmp_path):
    model = build_model("adam", extra_variable="Variable")  # a second unnamed-style variable called "Variable"
    model.save_weights(str(tmp_path / "w"))
    with pytest.raises(ConversionError, match=r"'Variable' stored at") as err:
        open_checkpoint(tmp_path / "w")
    assert "temperature/.ATTRIBUTES/VARIABLE_VALUE" in str(err.value) and "extra/.ATTRIBUTES" in str(err.value)
    # tf_keras cannot even write that model to .h5 (one group, one name); names can repeat across layer groups
    import h5py

    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"enc_a", b"enc_b"])
        for layer in ("enc_a", "enc_b"):
            group = f.create_group(layer)
            group.attrs["weight_names"] = np.array([b"dense/kernel:0"])
            group["dense/kernel:0"] = np.zeros((2, 2), "float32")
    with pytest.raises(ConversionError, match=r"'dense/kernel' stored at /enc_a/dense/kernel:0, /enc_b/dense"):
        open_checkpoint(tmp_path / "w.h5")


def test_variable_named_like_a_metric_stays_a_weight(tmp_path):
    model = build_model("adam", extra_variable="total")  # a bare model variable named "total" is not a metric
    model.save_weights(str(tmp_path / "w"))
    with open_checkpoint(tmp_path / "w") as ckpt:
        assert ckpt.weights["total"].key == "extra/.ATTRIBUTES/VARIABLE_VALUE"
        assert sorted(v.name for v in ckpt.set_aside if v.role == "metric") == ["count", "count", "total", "total"]
        assert ckpt.read("total") == pytest.approx(model.extra.numpy())


def test_unknown_weight_and_closed_checkpoint(saved):
    root, _ = saved["adam"]
    ckpt = open_checkpoint(root / "model-weights")
    with pytest.raises(ConversionError, match="no weight named 'nope'"):
        ckpt.read("nope")
    with pytest.raises(ConversionError):
        ckpt.read("Adam/m/stem_conv/kernel")  # optimizer state is not a weight
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.read("Variable")


# ---------------------------------------------------------------------------------------------------------------
# the real fixture written by coyo-align's training code


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"{FIXTURE} (the real coyo checkpoint) is absent: the shared "
                    "fixtures come with the project's workspace, not with a plain clone")
def test_coyo_fixture_matches_variables_json():
    listed = json.loads((FIXTURE / "variables.json").read_text())["variables"]
    expected = {name[:-2]: tuple(shape) for name, shape in listed if name not in ("total:0", "count:0")}
    with open_checkpoint(FIXTURE / "model-weights") as ckpt:
        assert ckpt.shapes() == expected
        assert list(ckpt.weights) == sorted(expected)
        assert ckpt.read("Variable") == pytest.approx(0.07)
        assert ckpt.read("stem_conv/kernel").dtype == np.float32
        metric = sorted(v.key for v in ckpt.set_aside if v.role == "metric")
        assert len(metric) == 6 and all(k.split("/")[0].endswith("_tracker") for k in metric)
        optimizer = [v for v in ckpt.set_aside if v.role == "optimizer"]
        assert {v.name for v in optimizer} >= {"iteration", "learning_rate", "Adam/m/Variable", "Adam/v/Variable"}
        assert all(v.key.startswith("optimizer/") for v in optimizer)
    # the same checkpoint through its directory (resolved through the `checkpoint` file) and its .index
    for path in (FIXTURE, FIXTURE / "model-weights.index", FIXTURE / "checkpoint"):
        with open_checkpoint(path) as ckpt:
            assert ckpt.path == str(FIXTURE / "model-weights") and len(ckpt.weights) == len(expected)


# ---------------------------------------------------------------------------------------------------------------
# path handling


def test_path_forms_accepted(saved, tmp_path):
    root, expected = saved["adam"]
    prefix = copy_tf(root, tmp_path / "one")
    # a directory with exactly one *.index and no `checkpoint` file
    with open_checkpoint(tmp_path / "one") as ckpt:
        assert ckpt.path == str(prefix) and set(ckpt.weights) == set(expected)
    # the .index itself and a data shard
    for form in (str(prefix) + ".index", str(prefix) + ".data-00000-of-00001"):
        with open_checkpoint(form) as ckpt:
            assert ckpt.path == str(prefix)
    # a directory whose `checkpoint` file names a relative prefix, next to other checkpoints
    shutil.copy(str(prefix) + ".index", tmp_path / "one" / "older.index")
    (tmp_path / "one" / "checkpoint").write_text('model_checkpoint_path: "model-weights"\n'
                                                  'all_model_checkpoint_paths: "model-weights"\n')
    with open_checkpoint(tmp_path / "one") as ckpt:
        assert ckpt.path == str(prefix)
    # an absolute path written before the directory was moved
    (tmp_path / "one" / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run1/model-weights"\n')
    with open_checkpoint(tmp_path / "one") as ckpt:
        assert ckpt.path == str(prefix)
    # a directory holding a single .h5
    (tmp_path / "h5").mkdir()
    shutil.copy(root / "weights.h5", tmp_path / "h5" / "weights.h5")
    with open_checkpoint(tmp_path / "h5") as ckpt:
        assert ckpt.format == "h5"


def test_missing_path(tmp_path):
    with pytest.raises(BadInputError, match="does not exist") as err:
        open_checkpoint(tmp_path / "nothing-here")
    assert err.value.exit_code == 2 and "save_weights" in str(err.value)


def test_directory_without_checkpoint(tmp_path, saved):
    with pytest.raises(BadInputError, match="without a 'checkpoint' file"):
        open_checkpoint(tmp_path)
    root, _ = saved["adam"]
    prefix = copy_tf(root, tmp_path / "two")
    shutil.copy(str(prefix) + ".index", tmp_path / "two" / "other.index")
    with pytest.raises(BadInputError, match="several checkpoints.*other.index"):
        open_checkpoint(tmp_path / "two")


def test_state_file_pointing_nowhere(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-7"\n')
    with pytest.raises(BadInputError, match="names checkpoint 'ckpt-7'.*moved or deleted"):
        open_checkpoint(tmp_path)
    (tmp_path / "checkpoint").write_text("garbage\n")
    with pytest.raises(BadInputError, match="does not name a model_checkpoint_path"):
        open_checkpoint(tmp_path)


def test_index_without_data(saved, tmp_path):
    root, _ = saved["adam"]
    prefix = copy_tf(root, tmp_path)
    os.remove(str(prefix) + ".data-00000-of-00001")
    with pytest.raises(BadInputError, match=r"data shard\(s\) missing: .*model-weights\.data-00000-of-00001"):
        open_checkpoint(str(prefix) + ".index")


def test_data_without_index(saved, tmp_path):
    root, _ = saved["adam"]
    prefix = copy_tf(root, tmp_path)
    os.remove(str(prefix) + ".index")
    with pytest.raises(BadInputError, match=r"no index file"):
        open_checkpoint(prefix)


def test_truncated_data_detected_on_open(saved, tmp_path):
    root, _ = saved["adam"]
    prefix = copy_tf(root, tmp_path)
    data = Path(str(prefix) + ".data-00000-of-00001")
    os.truncate(data, data.stat().st_size // 2)
    message = r"truncated: \d+ bytes, but the index needs \d+; \d+ of \d+ tensors lie past its end.*copy the checkpoint"
    with pytest.raises(BadInputError, match=message):
        open_checkpoint(prefix)


def _entry_location(prefix: Path, key: str) -> tuple[int, int]:
    entry = _read_bundle_index(Path(str(prefix) + ".index")).entries[key]
    return entry.offset, entry.size


def test_corrupted_tensor_detected_on_read(saved, tmp_path):
    root, expected = saved["adam"]
    prefix = copy_tf(root, tmp_path)
    offset, size = _entry_location(prefix, "image_encoder/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
    with open(str(prefix) + ".data-00000-of-00001", "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_checkpoint(prefix) as ckpt:  # opening reads only the index and the object graph
        with pytest.raises(BadInputError, match=r"cannot read variable 'stem_conv/kernel'.*damaged.*corrupted") as err:
            ckpt.read("stem_conv/kernel")
        assert str(err.value).startswith(str(prefix) + ".data-00000-of-00001: ")
        np.testing.assert_array_equal(ckpt.read("stem_bn/gamma"), expected["stem_bn/gamma"])  # one at a time


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BadInputError, match="neither a TensorFlow checkpoint nor a Keras HDF5"):
        open_checkpoint(text)
    bad_index = tmp_path / "junk.index"
    bad_index.write_bytes(b"\x00" * 100)
    (tmp_path / "junk.data-00000-of-00001").write_bytes(b"\x00" * 100)
    with pytest.raises(BadInputError, match="not a readable TF checkpoint index"):
        open_checkpoint(bad_index)


def test_h5_errors(saved, tmp_path):
    import h5py

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(BadInputError, match="not Keras 2 weights"):
        open_checkpoint(tmp_path / "plain.h5")
    root, _ = saved["adam"]
    data = (root / "weights.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(BadInputError, match="cut.h5"):
        with open_checkpoint(tmp_path / "cut.h5") as ckpt:
            for name in ckpt.weights:
                ckpt.read(name)


# ---------------------------------------------------------------------------------------------------------------
# property: whatever the optimizer, trackers and format, weights hold exactly the model's own variables


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    optimizer=st.sampled_from(OPTIMIZERS),
    units=st.integers(1, 4),
    channels=st.integers(1, 4),
    n_trackers=st.integers(0, 3),
    fmt=st.sampled_from(("tf", "h5")),
)
@example(optimizer="legacy_rmsprop", units=2, channels=3, n_trackers=3, fmt="tf")
@example(optimizer="sgd_momentum", units=1, channels=2, n_trackers=1, fmt="tf")
def test_weights_never_hold_optimizer_or_metric_state(optimizer, units, channels, n_trackers, fmt):
    model = build_model(optimizer, units=units, n_trackers=n_trackers, channels=channels)
    expected = expected_weights(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.h5" if fmt == "h5" else "w")
        model.save_weights(path)
        with open_checkpoint(path) as ckpt:
            assert set(ckpt.weights) == set(expected)
            weight_keys = {v.key for v in ckpt.weights.values()}
            for var in ckpt.set_aside:
                assert var.key not in weight_keys
                if var.role == "optimizer":
                    assert var.key.startswith("optimizer/") or "/.OPTIMIZER_SLOT/" in var.key
                else:
                    assert var.role == "metric" and var.name in ("total", "count")
            if fmt == "tf":
                assert sum(v.role == "metric" for v in ckpt.variables) == 2 * n_trackers
                assert sum(v.role == "optimizer" for v in ckpt.variables) > len(expected) - 2  # slots + counters
            for var in ckpt.weights.values():
                assert not var.key.startswith("optimizer/") and ".OPTIMIZER_SLOT" not in var.key
            np.testing.assert_array_equal(ckpt.read("stem_conv/kernel"), expected["stem_conv/kernel"])


# ---------------------------------------------------------------------------------------------------------------
# the reader of its own (no TensorFlow): bit for bit what TensorFlow reads, checksums, refusals


def assert_reads_like_tensorflow(prefix) -> int:
    """Every tensor of the checkpoint, the object graph included, read by tracer.io.checkpoint equals TensorFlow's
    reading: same dtype, shape and bytes; listed dtypes and shapes agree too. Returns the count of tensors."""
    reader = tf.train.load_checkpoint(str(prefix))
    keys = reader.get_variable_to_shape_map()
    with open_checkpoint(prefix) as ckpt:
        listed = {v.key: v for v in ckpt.variables}
        assert set(listed) == set(keys) - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
        for key in keys:
            theirs = reader.get_tensor(key)
            var = listed.get(key)
            mine = ckpt.read_variable(var) if var is not None else ckpt._backend.read_key(key)
            assert mine.flags.writeable, key
            if isinstance(theirs, bytes):  # TF hands scalar strings out as bytes
                assert mine.shape == () and mine.dtype == object and mine.item() == theirs, key
                continue
            theirs = np.asarray(theirs)
            assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), key
            if mine.dtype == object:
                assert mine.tolist() == theirs.tolist(), key
            else:
                assert mine.tobytes() == theirs.tobytes(), key
            if var is not None:
                assert (var.dtype, var.shape) == (theirs.dtype.name, theirs.shape), key
        return len(keys)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_reader_matches_tensorflow_on_optimizer_layouts(saved, kind, tmp_path):
    if kind in saved:
        root = saved[kind][0]
    else:
        build_model(kind, n_trackers=3).save_weights(str(tmp_path / "model-weights"))
        root = tmp_path
    assert assert_reads_like_tensorflow(root / "model-weights") > 20


def test_reader_matches_tensorflow_on_demo_checkpoint(tiny_bundle):
    assert assert_reads_like_tensorflow(tiny_bundle / "model-weights") > 100


def test_reader_matches_tensorflow_on_coyo_fixture():
    assert assert_reads_like_tensorflow(shared_fixture("coyo_mini") / "model-weights") > 100


def test_reader_matches_tensorflow_on_every_dtype(tmp_path):
    """Each dtype a variable can hold, empty tensors, string arrays and a tensor longer than the checksum chunk."""
    rng = np.random.RandomState(0)
    module = tf.Module()
    for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "complex64", "complex128"):
        value = rng.randn(3, 5) * 100 + (1j * rng.randn(3, 5) if name.startswith("complex") else 0)
        setattr(module, name, tf.Variable(value.astype(name), name=name))
    module.bool_ = tf.Variable(rng.rand(7) > 0.5, name="bool")
    module.bfloat16 = tf.Variable(tf.constant([1.5, -2.25, 3e38, 1e-40], tf.bfloat16), name="bfloat16")
    module.empty = tf.Variable(np.zeros((0, 3), np.float32), name="empty")
    module.long = tf.Variable(rng.rand(3, 500_001).astype(np.float32), name="long")  # 6 MB: several CRC chunks
    module.scalar = tf.Variable(np.int64(-(2 ** 62)), name="scalar")
    module.text = tf.Variable(b"hello", name="text")
    module.texts = tf.Variable([[b"", b"a" * 300], ["\u00e9".encode(), b"\x00\xff"]], name="texts")
    module.no_texts = tf.Variable(tf.constant([], tf.string), name="no_texts")
    tf.train.Checkpoint(m=module).write(str(tmp_path / "ckpt"))
    assert assert_reads_like_tensorflow(tmp_path / "ckpt") == 22
    with open_checkpoint(tmp_path / "ckpt") as ckpt:
        assert ckpt.read("bfloat16").dtype.name == "bfloat16" and ckpt.weights["bfloat16"].dtype == "bfloat16"
        assert ckpt.read("texts")[1, 0] == "\u00e9".encode() and ckpt.read("text").item() == b"hello"
        long = ckpt.read("long")
        long[0, 0] = 7.0  # the caller's own array
        assert ckpt.read("long")[0, 0] != 7.0


def test_open_and_read_never_import_tensorflow(tiny_bundle):
    code = f"""
import sys
from tracer.io.checkpoint import open_checkpoint
with open_checkpoint({str(tiny_bundle / "model-weights")!r}) as ckpt:
    n = sum(ckpt.read(name).size > 0 for name in ckpt.weights)
    n += sum(ckpt.read_variable(var).size > 0 for var in ckpt.set_aside)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras", "torch"))
assert not heavy, heavy
print(n)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 100


def test_damaged_object_graph_and_file_cut_after_opening(saved, tmp_path):
    root, _ = saved["adam"]
    prefix = copy_tf(root, tmp_path)
    data = Path(str(prefix) + ".data-00000-of-00001")
    offset, size = _entry_location(prefix, "image_encoder/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
    with open_checkpoint(prefix) as ckpt:  # truncated while open: the read names the file and what is missing
        os.truncate(data, offset + size // 2)
        with pytest.raises(BadInputError, match=r"data-00000-of-00001: cannot read variable 'stem_conv/kernel'.*"
                                                r"the file ends \d+ bytes before its data does.*copy the checkpoint"):
            ckpt.read("stem_conv/kernel")
    prefix = copy_tf(root, tmp_path / "graph")
    offset, size = _entry_location(prefix, "_CHECKPOINTABLE_OBJECT_GRAPH")
    with open(str(prefix) + ".data-00000-of-00001", "r+b") as f:
        f.seek(offset + size - 3)
        byte = f.read(1)
        f.seek(offset + size - 3)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(BadInputError, match=r"cannot read tensor '_CHECKPOINTABLE_OBJECT_GRAPH'.*damaged"):
        open_checkpoint(prefix)


def test_name_based_checkpoints_read_and_partitioned_ones_are_refused(tmp_path):
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "tf1"), tensor_names=["w"], shape_and_slices=[""],
                      tensors=[tf.zeros((2, 2))])
    with open_checkpoint(tmp_path / "tf1") as ckpt:  # a TF1 Saver bundle: named by its keys
        assert ckpt.format == "tf1" and ckpt.shapes() == {"w": (2, 2)}
    # a slice of a [4, 2] variable, as a variable partitioner saves it
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "part"), tensor_names=["dense/kernel"], shape_and_slices=["4 2 0,2:-"],
                      tensors=[tf.zeros((2, 2))])
    with pytest.raises(ConversionError, match=r"1 partitioned variable\(s\) \('dense/kernel'\)"):
        open_checkpoint(tmp_path / "part")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _write_table(path: Path, items: list[tuple[bytes, bytes]]) -> None:
    """A LevelDB-style table as TF writes an index: one uncompressed data block, an empty metaindex block, an index
    block and the footer (block checksums are left zero; the reader does not check them)."""
    def block(pairs):
        body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in pairs)
        return body + struct.pack("<II", 0, 1)  # one restart point, at 0

    out, handles = b"", []
    for body in (block(items), block([])):
        handles.append(_varint(len(out)) + _varint(len(body)))
        out += body + b"\x00" + b"\x00" * 4  # trailer: no compression, checksum
    index = block([(items[-1][0], handles[0])])
    index_handle = _varint(len(out)) + _varint(len(index))
    out += index + b"\x00" * 5
    path.write_bytes(out + (handles[1] + index_handle).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57))


def test_big_endian_and_newer_bundles_are_refused(saved, tmp_path):
    root, expected = saved["adam"]
    prefix = copy_tf(root, tmp_path)
    index = Path(str(prefix) + ".index")
    items = list(_table_entries(index.read_bytes()))
    assert items[0][0] == b""
    _write_table(index, items)  # the table rewritten as it was: still a good checkpoint
    with open_checkpoint(prefix) as ckpt:
        np.testing.assert_array_equal(ckpt.read("stem_conv/kernel"), expected["stem_conv/kernel"])
    _write_table(index, [(b"", items[0][1] + b"\x10\x01")] + items[1:])  # endianness = BIG
    with pytest.raises(ConversionError, match="big-endian byte order"):
        open_checkpoint(prefix)
    _write_table(index, [(b"", items[0][1] + b"\x1a\x02\x10\x02")] + items[1:])  # version { min_consumer: 2 }
    with pytest.raises(ConversionError, match="tensor-bundle reader of version >= 2"):
        open_checkpoint(prefix)
    _write_table(index, [(b"", items[0][1])] + [(k, v[:-3]) for k, v in items[1:]])  # entries cut short
    with pytest.raises(BadInputError, match="not a readable TF checkpoint index"):
        open_checkpoint(prefix)


def test_proto_decoder():
    message = (b"\x08\x96\x01"  # 1: varint 150
               + b"\x11" + struct.pack("<Q", 2 ** 63 + 5)  # 2: fixed64 (skipped by the schema below)
               + b"\x1d" + struct.pack("<I", 0xDEADBEEF)  # 3: fixed32
               + b"\x22\x03abc" + b"\x22\x00"  # 4: repeated string
               + b"\x2a\x04\x08\x01\x08\x02"  # 5: nested message, field 1 repeated
               + b"\x30" + _varint(2 ** 64 - 1))  # 6: int64 -1
    assert list(_proto_fields(message))[:3] == [(1, 0, 150), (2, 1, 2 ** 63 + 5), (3, 5, 0xDEADBEEF)]
    decoded = _proto_decode(message, {1: ("a", "int"), 3: ("c", "fixed32"), 4: ("d", ["str"]),
                                      5: ("e", {1: ("x", ["int"])}), 6: ("f", "int"), 7: ("g", {1: ("y", "str")})})
    assert (decoded.a, decoded.c, decoded.d, decoded.e.x, decoded.f, decoded.g.y) == (
        150, 0xDEADBEEF, ["abc", ""], [1, 2], -1, "")
    for bad in (b"\x22\x05ab", b"\x0b", b"\x08", b"\x15\x00\x00"):
        with pytest.raises(ValueError):
            list(_proto_fields(bad))
    with pytest.raises(ValueError, match="wire type"):
        _proto_decode(b"\x0a\x00", {1: ("a", "int")})


# ---------------------------------------------------------------------------------------------------------------
# TF1 name-based bundles and transformers' tf_model.h5 (the BERT family's checkpoints)


def test_tf1_name_based_bundle_read_by_name_with_bookkeeping_set_aside(tmp_path):
    names = {
        "bert/embeddings/word_embeddings": np.arange(12, dtype=np.float32).reshape(4, 3),
        "bert/embeddings/word_embeddings/adam_m": np.ones((4, 3), np.float32),
        "bert/embeddings/word_embeddings/adam_v": np.ones((4, 3), np.float32),
        "bert/pooler/dense/kernel/AdamWeightDecayOptimizer": np.ones((3, 3), np.float32),
        "bert/pooler/dense/kernel/AdamWeightDecayOptimizer_1": np.ones((3, 3), np.float32),
        "bert/pooler/dense/kernel": np.full((3, 3), 2.0, np.float32),
        "cls/seq_relationship/output_weights": np.zeros((2, 3), np.float32),
        "global_step": np.array(7, np.int64),
        "learning_rate": np.array(1e-4, np.float32),
        "beta1_power": np.array(0.9, np.float32),
    }
    prefix = tmp_path / "bert_model.ckpt"
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=list(names), shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(v) for v in names.values()])
    for path in (prefix, str(prefix) + ".index", tmp_path):
        with open_checkpoint(path) as ckpt:
            assert ckpt.format == "tf1"
            assert set(ckpt.weights) == {"bert/embeddings/word_embeddings", "bert/pooler/dense/kernel",
                                         "cls/seq_relationship/output_weights"}
            roles = {v.name: v.role for v in ckpt.set_aside}
            assert roles == {"bert/embeddings/word_embeddings/adam_m": "optimizer",
                             "bert/embeddings/word_embeddings/adam_v": "optimizer",
                             "bert/pooler/dense/kernel/AdamWeightDecayOptimizer": "optimizer",
                             "bert/pooler/dense/kernel/AdamWeightDecayOptimizer_1": "optimizer",
                             "beta1_power": "optimizer", "global_step": "other", "learning_rate": "other"}
            np.testing.assert_array_equal(ckpt.read("bert/embeddings/word_embeddings"),
                                          names["bert/embeddings/word_embeddings"])
            assert ckpt.shapes()["cls/seq_relationship/output_weights"] == (2, 3)


def test_tf1_saver_checkpoint(tmp_path):
    """A checkpoint written by tf.compat.v1.train.Saver itself (graph mode), as google-research's BERT wrote them."""
    code = (
        "import tensorflow as tf\n"
        "tf.compat.v1.disable_eager_execution()\n"
        "with tf.compat.v1.variable_scope('bert/encoder/layer_0/attention/self/query'):\n"
        "    k = tf.compat.v1.get_variable('kernel', [3, 3], initializer=tf.compat.v1.ones_initializer())\n"
        "step = tf.compat.v1.train.get_or_create_global_step()\n"
        "saver = tf.compat.v1.train.Saver()\n"
        "with tf.compat.v1.Session() as s:\n"
        "    s.run(tf.compat.v1.global_variables_initializer())\n"
        f"    saver.save(s, {str(tmp_path / 'model.ckpt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                   capture_output=True)
    with open_checkpoint(tmp_path) as ckpt:  # the directory's `checkpoint` file names it
        assert ckpt.format == "tf1"
        assert list(ckpt.weights) == ["bert/encoder/layer_0/attention/self/query/kernel"]
        assert [(v.name, v.role) for v in ckpt.set_aside] == [("global_step", "other")]
        np.testing.assert_array_equal(ckpt.read("bert/encoder/layer_0/attention/self/query/kernel"), np.ones((3, 3)))


def test_transformers_h5_shared_variable_is_its_owners_weight(tmp_path):
    import h5py

    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    with h5py.File(tmp_path / "tf_model.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"bert", b"mlm___cls"])
        bert = f.create_group("bert")
        bert.attrs["weight_names"] = np.array([b"tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight:0"])
        bert["tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight:0"] = table
        mlm = f.create_group("mlm___cls")
        mlm.attrs["weight_names"] = np.array([b"tf_bert_for_masked_lm/mlm___cls/predictions/bias:0",
                                              b"tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight:0"])
        mlm["tf_bert_for_masked_lm/mlm___cls/predictions/bias:0"] = np.zeros(3, np.float32)
        mlm["tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight:0"] = table
    with open_checkpoint(tmp_path / "tf_model.h5") as ckpt:
        assert set(ckpt.weights) == {"tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight",
                                     "tf_bert_for_masked_lm/mlm___cls/predictions/bias"}
        word = ckpt.weights["tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight"]
        assert word.key == "/bert/tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight:0"
        (copy,) = ckpt.set_aside
        assert copy.role == "other" and copy.key.startswith("/mlm___cls/") and copy.name == word.name
        np.testing.assert_array_equal(ckpt.read_variable(copy), table)


def test_transformers_h5_shard_lists_datasets(tmp_path):
    """One shard of a sharded tf_model.h5: `layer_names` names the datasets (the model scope stripped)."""
    import h5py

    with h5py.File(tmp_path / "tf_model-00001-of-00002.h5", "w") as f:
        names = [b"bert/embeddings/word_embeddings/weight:0", b"bert/pooler/dense/bias:0"]
        f.attrs["layer_names"] = np.array(names)
        f.create_dataset(names[0].decode(), data=np.ones((4, 2), np.float32))
        f.create_dataset(names[1].decode(), data=np.zeros(2, np.float32))
    with open_checkpoint(tmp_path / "tf_model-00001-of-00002.h5") as ckpt:
        assert ckpt.shapes() == {"bert/embeddings/word_embeddings/weight": (4, 2), "bert/pooler/dense/bias": (2,)}
        np.testing.assert_array_equal(ckpt.read("bert/embeddings/word_embeddings/weight"), np.ones((4, 2)))
