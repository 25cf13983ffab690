"""The tf_keras reference ALIGN: names, shapes and object graph as coyo writes them, and the original's outputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

from tracer.families.align.demo import demo_inputs, demo_spec, realistic_value  # noqa: E402
from tracer.errors import BadInputError, ConversionError  # noqa: E402
from tracer.families.align.keras_ref import (  # noqa: E402
    assign_weights,
    build_reference,
    embed,
    metric_variables,
    reference_variables,
)
from tracer.families.align.spec import derive_spec, round_filters  # noqa: E402

from conftest import FIXTURES  # noqa: E402

MINI = FIXTURES / "coyo_mini"
MINI_PREFIX = MINI / "model-weights"
B7_JSON = FIXTURES / "coyo_b7_bert_base_variables.json"
METRIC_NAMES = {"total", "count"}
OUTPUT_KEYS = ("image_features", "text_features", "image_embeds", "text_embeds")


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures come with the project's workspace, not with a plain clone")


def read_object_graph(prefix) -> tuple[dict[str, str], object]:
    """`{checkpoint key: full_name}` for every variable of a TF object-based checkpoint, and its reader."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(str(prefix))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    keys = {attr.checkpoint_key: attr.full_name for node in graph.nodes for attr in node.attributes}
    return keys, reader


def model_keys_by_full_name(keys: dict[str, str]) -> dict[str, str]:
    """`{full_name: checkpoint key}` for the model's weights (no optimizer, no loss trackers)."""
    out: dict[str, str] = {}
    for key, full_name in keys.items():
        if key.startswith(("image_encoder/", "text_encoder/", "temperature/")) and "OPTIMIZER_SLOT" not in key:
            assert full_name not in out, f"two checkpoint entries named {full_name}"
            out[full_name] = key
    return out


def _max_diffs(got: dict, ref) -> dict[str, float]:
    return {k: float(np.abs(np.asarray(got[k]) - ref[k]).max()) for k in OUTPUT_KEYS}


# ------------------------------------------------------------------------------------------ tiny, no fixtures


@pytest.fixture(scope="module")
def tiny_model():
    return build_reference(demo_spec("tiny"))


def test_tiny_structure_and_names(tiny_model):
    spec = demo_spec("tiny")
    names = reference_variables(tiny_model)
    assert derive_spec({n: list(v.shape) for n, v in names.items()}) == spec
    # Every stage has a block; stride-2 blocks pad like correct_pad on an unknown size; no top conv, no image Dense.
    effnet = tiny_model.image_encoder.layers[1]
    assert effnet.name == "efficientnet"
    assert [n.split("_")[0] for n in names if n.endswith("_project_conv/kernel")] == spec.vision.block_names()
    assert effnet.get_layer("stem_conv_pad").padding == ((0, 1), (0, 1))
    assert effnet.get_layer("block2a_dwconv_pad").padding == ((0, 1), (0, 1))  # kernel 3
    assert effnet.get_layer("block3a_dwconv_pad").padding == ((1, 2), (1, 2))  # kernel 5
    assert not any(n.startswith("top_") for n in names)
    assert isinstance(effnet.layers[1], tf_keras.layers.Rescaling)
    assert tiny_model.image_encoder.output_shape == (None, spec.vision.hidden_dim)
    assert tiny_model.image_encoder.input_shape == (None, 289, 289, 3)
    assert names["block1a_bn/gamma"].shape == (1, 1, 1, 1, round_filters(32, spec.vision.width_coefficient))
    # The weights Keras knows are exactly the reference ones plus the three trackers' total/count.
    metric_vars = [v for vs in metric_variables(tiny_model).values() for v in vs]
    assert sorted(metric_variables(tiny_model)) == ["loss", "loss_i2t", "loss_t2i"]
    assert sorted(v.name for v in metric_vars) == ["count:0"] * 3 + ["total:0"] * 3
    assert {id(v) for v in tiny_model.weights} - {id(v) for v in metric_vars} == {id(v) for v in names.values()}
    assert names["Variable"] is tiny_model.temperature


def test_bert_classes_and_calls_go_through_keras(tiny_model, monkeypatch):
    seen = []
    original = tf_keras.layers.Layer.__call__

    def spy(self, *args, **kwargs):
        seen.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tf_keras.layers.Layer, "__call__", spy)
    inputs = demo_inputs(demo_spec("tiny"), n=1)
    tiny_model.text_encoder(
        {k: tf.constant(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}, training=False
    )
    for cls in ("TFBertModel", "TFBertMainLayer", "TFBertEmbeddings", "TFBertEncoder", "TFBertLayer",
                "TFBertAttention", "TFBertSelfAttention", "TFBertSelfOutput", "TFBertIntermediate",
                "TFBertOutput", "TFBertPooler", "Dense", "LayerNormalization"):
        assert cls in seen, cls
    assert seen.count("TFBertLayer") == 2


def _np_layer_norm(x, gamma, beta, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _np_text_tower(w, spec, ids, mask, types):
    """BERT + [CLS] projection in float64 numpy, straight from the maths (no TensorFlow)."""
    text = spec.text
    s = text.scope + "/"
    erf = np.vectorize(math.erf)
    seq = ids.shape[1]
    x = (w[s + "embeddings/word_embeddings/weight"][ids] + w[s + "embeddings/position_embeddings/embeddings"][:seq]
         + w[s + "embeddings/token_type_embeddings/embeddings"][types])
    x = _np_layer_norm(x, w[s + "embeddings/LayerNorm/gamma"], w[s + "embeddings/LayerNorm/beta"])
    ext = (1.0 - mask[:, None, None, :]) * -10000.0
    heads, size = text.num_heads, text.hidden_size // text.num_heads
    for i in range(text.num_layers):
        p = f"{s}encoder/layer_._{i}/"

        def dense(h, name):
            return h @ w[p + name + "/kernel"] + w[p + name + "/bias"]

        def split(h):
            return h.reshape(h.shape[0], seq, heads, size).transpose(0, 2, 1, 3)

        q, k, v = (split(dense(x, f"attention/self/{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + ext
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        a = _np_layer_norm(dense(ctx, "attention/output/dense") + x,
                           w[p + "attention/output/LayerNorm/gamma"], w[p + "attention/output/LayerNorm/beta"])
        h = dense(a, "intermediate/dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = _np_layer_norm(dense(h, "output/dense") + a, w[p + "output/LayerNorm/gamma"], w[p + "output/LayerNorm/beta"])
    return x[:, 0] @ w[spec.projection_name + "/kernel"] + w[spec.projection_name + "/bias"]


def test_text_tower_maths_against_numpy(tiny_model):
    spec = demo_spec("tiny")
    shapes = {n: tuple(v.shape) for n, v in reference_variables(tiny_model).items()}
    values = {n: realistic_value(n, s, seed=3) if n != "Variable" else np.float32(0.5) for n, s in shapes.items()}
    assign_weights(tiny_model, lambda n: values[n], list(values))  # callable source
    inputs = demo_inputs(spec, n=3, seed=5)
    got = embed(tiny_model, **inputs)
    w64 = {n: v.astype(np.float64) for n, v in values.items()}
    want = _np_text_tower(w64, spec, inputs["input_ids"], inputs["attention_mask"].astype(np.float64),
                          inputs["token_type_ids"])
    assert np.abs(got["text_features"] - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got["image_embeds"], axis=-1), 1.0, atol=1e-5)
    # Padding really is masked: changing ids under mask 0 changes nothing.
    changed = dict(inputs)
    changed["input_ids"] = np.where(inputs["attention_mask"] == 0, 7, inputs["input_ids"]).astype(np.int32)
    again = embed(tiny_model, **changed)
    assert np.abs(again["text_features"] - got["text_features"]).max() < 1e-5


def test_assign_weights_is_strict(tiny_model):
    shapes = {n: tuple(v.shape) for n, v in reference_variables(tiny_model).items()}
    values = {n: np.zeros(s, np.float32) for n, s in shapes.items()}

    missing = dict(values)
    del missing["stem_conv/kernel"]
    with pytest.raises(ConversionError, match="stem_conv/kernel"):
        assign_weights(tiny_model, missing)

    extra = dict(values, **{"top_conv/kernel": np.zeros((1, 1, 32, 64), np.float32)})
    with pytest.raises(ConversionError, match="top_conv/kernel"):
        assign_weights(tiny_model, extra)

    wrong = dict(values, **{"dense/kernel": np.zeros((3, 3), np.float32)})
    kernel = list(shapes["dense/kernel"])
    with pytest.raises(ConversionError, match=rf"dense/kernel: model \[{kernel[0]}, {kernel[1]}\], given \[3, 3\]"):
        assign_weights(tiny_model, wrong)

    with pytest.raises(BadInputError):
        assign_weights(tiny_model, lambda n: values[n])  # a function needs the names

    # Arrays are fetched one at a time, each once, only after the names were checked.
    fetched = []

    def source(name):
        fetched.append(name)
        return values[name]

    assign_weights(tiny_model, source, list(values))
    assert sorted(fetched) == sorted(values)
    with pytest.raises(ConversionError):
        fetched.clear()
        assign_weights(tiny_model, source, list(values)[1:])
    assert fetched == []


def test_embed_rejects_bad_shapes(tiny_model):
    inputs = demo_inputs(demo_spec("tiny"), n=1)
    with pytest.raises(BadInputError):
        embed(tiny_model, inputs["pixel_values"][:, :288], inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(BadInputError):
        embed(tiny_model, inputs["pixel_values"], inputs["input_ids"][:, :10], inputs["attention_mask"][:, :10])


# ------------------------------------------------------------------------------------------ ALIGN-base names


def test_b7_bert_base_names_and_shapes():
    _need(B7_JSON)
    listed = {name: shape for name, shape in json.loads(B7_JSON.read_text())["variables"]}
    weights = {n[:-2]: s for n, s in listed.items() if n[:-2] not in METRIC_NAMES}
    spec = derive_spec(weights)
    assert spec == demo_spec("base")
    model = build_reference(spec)
    got = {n: list(v.shape) for n, v in reference_variables(model).items()}
    assert sorted(set(got) ^ set(weights)) == []
    assert got == weights
    assert len(got) == 1232
    metric_vars = {v.name for vs in metric_variables(model).values() for v in vs}
    assert metric_vars == {n for n in listed if n[:-2] in METRIC_NAMES} == {"total:0", "count:0"}


# ------------------------------------------------------------------------------------------ coyo_mini fixture


@pytest.fixture(scope="module")
def mini():
    _need(MINI_PREFIX.with_suffix(".index"))
    keys, reader = read_object_graph(MINI_PREFIX)
    by_name = model_keys_by_full_name(keys)
    shapes = reader.get_variable_to_shape_map()
    spec = derive_spec({n: shapes[k] for n, k in by_name.items()})
    reference = np.load(MINI / "reference.npz")
    return spec, keys, by_name, reader, reference


@pytest.fixture(scope="module")
def mini_model(mini):
    return build_reference(mini[0])


def test_mini_assign_by_name_matches_original(mini, mini_model):
    spec, _, by_name, reader, ref = mini
    model = mini_model
    assign_weights(model, lambda n: reader.get_tensor(by_name[n]), list(by_name))
    out = embed(model, ref["pixel_values"], ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    diffs = _max_diffs(out, ref)
    print("coyo_mini max abs diffs (assign by name):", diffs)
    assert all(d < 1e-5 for d in diffs.values()), diffs
    assert float(model.temperature.numpy()) == pytest.approx(float(ref["temperature"]))


def test_mini_load_weights_restores_object_graph(mini, mini_model, tmp_path):
    spec, keys, _, _, ref = mini
    model = mini_model
    # Start from zeros so every value that matters must come from load_weights.
    assign_weights(model, {n: np.zeros(v.shape, np.float32) for n, v in reference_variables(model).items()})
    status = model.load_weights(str(MINI_PREFIX))
    status.expect_partial()  # the optimizer is not built here
    status.assert_existing_objects_matched()
    out = embed(model, ref["pixel_values"], ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    diffs = _max_diffs(out, ref)
    print("coyo_mini max abs diffs (load_weights):", diffs)
    assert all(d < 1e-5 for d in diffs.values()), diffs

    # Our model's own object graph (no optimizer) is the fixture's minus the optimizer, key for key.
    model.save_weights(str(tmp_path / "ours"))
    ours, _ = read_object_graph(tmp_path / "ours")
    theirs = {k: v for k, v in keys.items() if not k.startswith("optimizer/")}
    assert ours == theirs


def test_mini_spec_is_small_demo_with_its_vocabulary(mini):
    import dataclasses

    spec = mini[0]
    small = demo_spec("small")
    assert spec == dataclasses.replace(small, text=dataclasses.replace(small.text, vocab_size=2048))
