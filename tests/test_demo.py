"""Demo checkpoints: written like a coyo training run, derivable, realistic, deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

from tracer.families.align.demo import demo_inputs, demo_spec, write_demo_checkpoint  # noqa: E402
from tracer.errors import BadInputError  # noqa: E402
from tracer.families.align.keras_ref import build_reference, embed, reference_variables  # noqa: E402
from tracer.families.align.spec import derive_spec  # noqa: E402

TINY = demo_spec("tiny")


def read_object_graph(prefix) -> tuple[dict[str, str], object]:
    """`{checkpoint key: full_name}` for every variable of a TF object-based checkpoint, and its reader."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(str(prefix))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return {a.checkpoint_key: a.full_name for node in graph.nodes for a in node.attributes}, reader


def model_keys_by_full_name(keys: dict[str, str]) -> dict[str, str]:
    """`{full_name: checkpoint key}` for the model's weights (no optimizer, no loss trackers)."""
    return {
        full_name: key
        for key, full_name in keys.items()
        if key.startswith(("image_encoder/", "text_encoder/", "temperature/")) and "OPTIMIZER_SLOT" not in key
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = {}
    for optimizer in ("adam", "legacy_adam"):
        timings: dict = {}
        out[optimizer] = write_demo_checkpoint(root / optimizer / "model-weights", TINY, seed=0,
                                               optimizer=optimizer, timings=timings)
        print(f"tiny demo ({optimizer}) seconds:", {k: round(v, 2) for k, v in timings.items()})
    out["h5"] = write_demo_checkpoint(root / "h5" / "model", TINY, seed=0, h5=True)
    return out


@pytest.fixture(scope="module")
def fresh_model():
    return build_reference(TINY)


def _model_tensors(prefix) -> dict[str, np.ndarray]:
    keys, reader = read_object_graph(prefix)
    return {name: reader.get_tensor(key) for name, key in model_keys_by_full_name(keys).items()}


def test_specs():
    for size in ("tiny", "small", "base"):
        spec = demo_spec(size)
        assert spec.embed_dim == spec.vision.hidden_dim
        assert spec.text.hidden_size == 64 * spec.text.num_heads
        assert spec.text.intermediate_size == 4 * spec.text.hidden_size
    assert len(TINY.vision.block_names()) == 7  # one block in every stage
    assert demo_spec("small").text.vocab_size == demo_spec("base").text.vocab_size == 30522
    assert demo_spec("base").vision.variant == "b7"
    with pytest.raises(BadInputError):
        demo_spec("huge")


def test_demo_inputs_are_deterministic_and_padded():
    a, b = demo_inputs(TINY, n=3, seed=1), demo_inputs(TINY, n=3, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["pixel_values"], demo_inputs(TINY, n=3, seed=2)["pixel_values"])
    px = a["pixel_values"]
    assert px.shape == (3, 289, 289, 3) and px.dtype == np.float32
    assert 0.0 <= px.min() and px.max() <= 255.0 and px.std() > 20
    assert np.abs(np.diff(px, axis=1)).mean() < 0.5 * px.std(axis=(1, 2)).mean()  # spatially correlated
    ids, mask, types = a["input_ids"], a["attention_mask"], a["token_type_ids"]
    assert ids.shape == mask.shape == types.shape == (3, TINY.text.seq_length)
    assert ids.dtype == mask.dtype == types.dtype == np.int32
    assert (mask[:2] == 0).any(axis=1).all() and mask[2].all()
    assert (ids[mask == 0] == 0).all() and ids.max() < TINY.text.vocab_size
    assert types[1].any() and not types[0].any()


def test_checkpoint_layouts(written):
    for optimizer in ("adam", "legacy_adam"):
        keys, reader = read_object_graph(written[optimizer])
        by_name = model_keys_by_full_name(keys)
        shapes = reader.get_variable_to_shape_map()
        assert derive_spec({n: shapes[k] for n, k in by_name.items()}) == TINY
        for tracker in ("loss_tracker", "loss_i2t_tracker", "loss_t2i_tracker"):
            assert keys[f"{tracker}/total/.ATTRIBUTES/VARIABLE_VALUE"] == "total"
            assert keys[f"{tracker}/count/.ATTRIBUTES/VARIABLE_VALUE"] == "count"
            assert reader.get_tensor(f"{tracker}/count/.ATTRIBUTES/VARIABLE_VALUE") == 1
        n_trainable = sum(1 for n in by_name if "moving_" not in n)
        if optimizer == "adam":
            slots = {v for k, v in keys.items() if k.startswith("optimizer/_variables/")}
            assert keys["optimizer/_variables/1/.ATTRIBUTES/VARIABLE_VALUE"] == "Adam/m/stem_conv/kernel"
            assert len(slots) == 2 * n_trainable
            assert "Adam/v/Variable" in slots and "Adam/m/tf_bert_model/bert/pooler/dense/kernel" in slots
            assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 1
        else:
            slots = [k for k in keys if "/.OPTIMIZER_SLOT/optimizer/" in k]
            assert len(slots) == 2 * n_trainable
            assert "temperature/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE" in keys
            assert reader.get_tensor("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE") == 1


def test_weights_are_realistic_and_deterministic(written):
    adam, legacy = _model_tensors(written["adam"]), _model_tensors(written["legacy_adam"])
    assert adam.keys() == legacy.keys()
    assert all(np.array_equal(adam[n], legacy[n]) for n in adam)  # same seed, same weights
    assert adam["Variable"] == np.float32(0.07)
    for name, value in adam.items():
        if name.endswith("moving_mean"):
            assert np.abs(value).max() > 1e-3, name
        elif name.endswith("moving_variance"):
            assert value.min() > 0 and np.abs(value - 1).max() > 1e-2, name
        elif name.endswith("gamma"):
            assert np.abs(value - 1).max() > 1e-2, name
        elif name.endswith(("beta", "bias")):
            assert np.abs(value).max() > 1e-3, name


def test_activations_stay_well_scaled(written, fresh_model):
    status = fresh_model.load_weights(written["adam"])
    status.expect_partial()
    status.assert_existing_objects_matched()
    inputs = demo_inputs(TINY, n=3, seed=4)
    out = embed(fresh_model, **inputs)
    for key in ("image_features", "text_features"):
        value = out[key]
        assert np.isfinite(value).all(), key
        assert 1e-2 < np.abs(value).max() < 50, (key, np.abs(value).max())
        assert value.std() > 1e-2, key
    # Different images give different embeddings.
    sims = out["image_embeds"] @ out["image_embeds"].T
    assert sims[np.triu_indices(3, 1)].max() < 0.999


def test_h5_round_trip(written, fresh_model):
    import h5py

    assert written["h5"].endswith("model.h5")
    with h5py.File(written["h5"], "r") as f:
        assert set(f.keys()) == {"vision_encoder", "text_encoder", "top_level_model_weights"}
        assert float(f["top_level_model_weights/Variable:0"][()]) == pytest.approx(0.07)
    fresh_model.load_weights(written["adam"]).expect_partial()
    inputs = demo_inputs(TINY, n=2)
    want = embed(fresh_model, **inputs)
    fresh_model.temperature.assign(1.0)
    for variable in reference_variables(fresh_model).values():
        if "moving_variance" in variable.name:
            variable.assign(np.ones(variable.shape, np.float32))
    fresh_model.load_weights(written["h5"])
    got = embed(fresh_model, **inputs)
    assert float(fresh_model.temperature.numpy()) == pytest.approx(0.07)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_unknown_optimizer(tmp_path):
    with pytest.raises(BadInputError):
        write_demo_checkpoint(tmp_path / "x", TINY, optimizer="sgd")
