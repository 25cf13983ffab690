"""Tests for tracer.checkpoint: tiny tf_keras models shaped like ALIGN, saved the ways coyo's training saves them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

from tracer.checkpoint import Checkpoint, Variable, _table_entries, open_checkpoint  # noqa: E402
from tracer.errors import BadInputError, ConversionError  # noqa: E402

from conftest import FIXTURES  # noqa: E402

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
    for given in (str(prefix) + ".index", str(prefix) + ".data-00000-of-00001"):
        with open_checkpoint(given) as ckpt:
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
    from tensorflow.core.protobuf import tensor_bundle_pb2

    for k, value in _table_entries(Path(str(prefix) + ".index").read_bytes()):
        if k == key.encode():
            entry = tensor_bundle_pb2.BundleEntryProto()
            entry.ParseFromString(value)
            return entry.offset, entry.size
    raise AssertionError(key)


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
        with pytest.raises(BadInputError, match=r"cannot read variable 'stem_conv/kernel'.*corrupted"):
            ckpt.read("stem_conv/kernel")
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
