"""The eager reference (`keras_ref.EagerReference`) and the recorder built on it, against the functional model."""

from __future__ import annotations

import gc
import os
import re
import weakref

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

from tracer.families.align.demo import demo_inputs, demo_spec, realistic_value  # noqa: E402
from tracer.errors import ConversionError  # noqa: E402
from tracer.families.align.inputs import Inputs  # noqa: E402
from tracer.families.align.keras_ref import (  # noqa: E402
    Container,
    EagerReference,
    assign_weights,
    build_reference,
    embed,
    reference_variables,
)
from tracer.families.align.keras_ref.eager import PROBE_IMAGE_SIZE  # noqa: E402
from tracer.families.align.record import record_keras  # noqa: E402

SPEC = demo_spec("tiny")
OUTPUT_KEYS = ("image_features", "text_features", "image_embeds", "text_embeds")
_BLOCK_LAYER = re.compile(r"/(block\d+[a-z])_[a-z_]+$")


def _fixed_values(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Deterministic trained-looking weights, with BatchNorm statistics that are not 0/1 so they matter."""
    rng = np.random.default_rng(11)
    out = {}
    for name, shape in shapes.items():
        if name == "Variable":
            out[name] = np.float32(0.07)
        elif name.endswith("moving_mean"):
            out[name] = rng.normal(0.0, 0.1, size=shape).astype(np.float32)
        elif name.endswith("moving_variance"):
            out[name] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        else:
            out[name] = realistic_value(name, shape, seed=5)
    return out


@pytest.fixture(scope="module")
def functional():
    """(functional model with fixed weights, its values by name, the inputs, its `embed` outputs)."""
    model = build_reference(SPEC)
    values = _fixed_values({n: tuple(v.shape) for n, v in reference_variables(model).items()})
    assign_weights(model, values)
    inputs = demo_inputs(SPEC, n=3, seed=2)
    return model, values, inputs, embed(model, **inputs)


def _inputs(arrays: dict) -> Inputs:
    return Inputs(arrays["pixel_values"], arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"])


def test_eager_features_equal_functional(functional):
    model, values, inputs, want = functional
    eager = EagerReference(SPEC, values=values)
    got = eager.embed(**inputs)
    diffs = {k: float(np.abs(got[k] - want[k]).max()) for k in OUTPUT_KEYS}
    print("eager vs functional max |diff|:", diffs)
    assert all(d <= 1e-6 for d in diffs.values()), diffs
    assert float(eager.temperature.numpy()) == pytest.approx(0.07)


def test_variable_names_and_shapes_match_functional(functional):
    model, values, _, _ = functional
    eager = EagerReference(SPEC, values=values)
    assert eager.unused(values) == [n for n in values if n != "Variable"]  # only the temperature so far
    eager.build("vision")
    eager.build("text")
    got = {n: tuple(v.shape) for n, v in eager.variables().items()}
    want = {n: tuple(v.shape) for n, v in reference_variables(model).items()}
    assert got == want
    assert sorted(eager.consumed) == sorted(values)  # each name read once
    assert eager.unused(values) == []
    assert set(eager.variables("vision")) | set(eager.variables("text")) | {"Variable"} == set(want)
    assert not set(eager.variables("vision")) & set(eager.variables("text"))
    # Values are the ones given, with no second assignment needed.
    for name in ("block1a_dwconv/depthwise_kernel", "tf_bert_model/bert/encoder/layer_._1/output/dense/kernel",
                 "dense/bias", "stem_bn/moving_variance"):
        assert np.array_equal(eager.variables()[name].numpy(), values[name])


def test_random_init_without_values_has_the_same_names(functional):
    model = functional[0]
    eager = EagerReference(SPEC)
    eager.build("vision")
    eager.build("text")
    assert eager.consumed == []
    assert ({n: tuple(v.shape) for n, v in eager.variables().items()}
            == {n: tuple(v.shape) for n, v in reference_variables(model).items()})


def test_unknown_name_or_wrong_shape_raises(functional):
    _, values, _, _ = functional
    missing = {n: v for n, v in values.items() if n != "block2a_dwconv/depthwise_kernel"}
    eager = EagerReference(SPEC, values=missing)
    with pytest.raises(ConversionError, match=r"block2a_dwconv/depthwise_kernel` \[3, 3, 48, 1\]"):
        eager.build("vision")
    assert eager.variables("vision") == {} and not eager.built("vision")  # a half-built tower is dropped
    eager.build("text")  # the other tower does not need the missing name

    wrong = dict(values, **{"dense/kernel": np.zeros((3, 3), np.float32)})
    kernel = list(values["dense/kernel"].shape)
    with pytest.raises(ConversionError, match=rf"dense/kernel: model \[{kernel[0]}, {kernel[1]}\], given \[3, 3\]"):
        EagerReference(SPEC, values=wrong).build("text")

    with pytest.raises(ConversionError, match="`Variable`"):
        EagerReference(SPEC, values={n: v for n, v in values.items() if n != "Variable"})

    def reader(name):  # a callable source that knows nothing (like Checkpoint.read on a foreign name)
        raise KeyError(name)

    with pytest.raises(ConversionError, match="Variable"):
        EagerReference(SPEC, values=reader)


def test_probe_build_then_full_size(functional):
    _, values, inputs, want = functional
    eager = EagerReference(SPEC, values=values)
    probe = eager.image_features(np.full((1, PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE, 3), 127.0, np.float32))
    assert probe.shape == (1, SPEC.vision.hidden_dim)
    eager.build("text")
    consumed = list(eager.consumed)
    # coyo's unknown-size paddings, whatever the probe size (65 is odd: a known-size pad would differ).
    pads = {c.layer.name: c.layer.padding for c in eager._vision.calls.values() if c.layer.name.endswith("_pad")}
    assert pads["stem_conv_pad"] == ((0, 1), (0, 1))
    assert pads["block3a_dwconv_pad"] == ((1, 2), (1, 2))
    image = eager.image_features(tf.constant(inputs["pixel_values"]))  # tf input at 289, the same variables
    text = eager.text_features(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    assert eager.consumed == consumed  # nothing was created again
    assert float(np.abs(image - want["image_features"]).max()) <= 1e-6
    assert float(np.abs(text - want["text_features"]).max()) <= 1e-6


def test_building_call_equals_later_calls(functional):
    """The first call builds each layer itself (not through `Layer.__call__`): it computes bit for bit what later
    calls compute, and the hook sees the same calls."""
    _, values, inputs, _ = functional
    eager = EagerReference(SPEC, values=values)

    def run() -> list:
        calls = []
        features = eager.image_features(inputs["pixel_values"],
                                        hook=lambda layer, path, args, kwargs, out: calls.append((path, out.numpy())))
        return [*calls, ("features", features)]

    building, later = run(), run()
    assert [p for p, _ in building] == [p for p, _ in later]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(building, later))
    layers = eager._vision.layers
    assert all(layer.built for layer in layers)
    conv = next(layer for layer in layers if layer.name == "stem_conv")
    assert [v.name for v in conv.weights] == ["stem_conv/kernel:0"]
    assert tuple(conv._build_input_shape) == (3, 290, 290, 3)  # stored by the build, as `Layer.__call__` stores it


def test_release_drops_one_tower(functional):
    _, values, inputs, want = functional
    eager = EagerReference(SPEC, values=values)
    eager.build("vision")
    eager.build("text")
    probe = weakref.ref(eager.variables("vision")["stem_conv/kernel"])
    text_names = set(eager.variables("text"))
    eager.release("vision")
    gc.collect()
    assert eager.variables("vision") == {} and not eager.built("vision")
    assert probe() is None  # nothing else held it: its memory is free
    assert set(eager.variables("text")) == text_names
    assert "stem_conv/kernel" not in eager.variables()
    # Calling the tower again builds it again, from the values again.
    image = eager.image_features(inputs["pixel_values"])
    assert float(np.abs(image - want["image_features"]).max()) <= 1e-6


def test_hook_sees_every_layer_post_order_with_block_containers(functional):
    _, values, inputs, _ = functional
    eager = EagerReference(SPEC, values=values)
    calls = []

    def hook(layer, path, args, kwargs, output):
        calls.append((layer, path, args, kwargs, output))

    eager.image_features(inputs["pixel_values"][:1], hook=hook)
    paths = [c[1] for c in calls]
    assert paths[0] == "vision_encoder/efficientnet/rescaling"
    assert paths[-2:] == ["vision_encoder/efficientnet/avg_pool", "vision_encoder/efficientnet"]
    assert isinstance(calls[-1][0], Container) and calls[-1][0].cls == "Functional"
    blocks = [i for i, c in enumerate(calls) if isinstance(c[0], Container) and c[0].cls == "EfficientNetBlock"]
    assert [calls[i][1].rsplit("/", 1)[1] for i in blocks] == SPEC.vision.block_names()
    for i in blocks:
        block, path, args, _, output = calls[i]
        assert block.role == "Block"
        name = path.rsplit("/", 1)[1]
        members = [j for j, p in enumerate(paths) if (m := _BLOCK_LAYER.search(p)) and m.group(1) == name]
        assert members == list(range(members[0], i))  # right after its own layers, which are contiguous
        assert paths[i - 1].endswith(("_project_bn", "_add"))
        assert output is calls[i - 1][4]  # the block's output is its last layer's
        assert args[0] is calls[members[0]][2][0]  # its input is its first layer's
        assert {id(layer) for layer in block.layers} == {id(calls[j][0]) for j in members}
    # Merge layers get their list spread out.
    excite = next(c for c in calls if c[1].endswith("block1a_se_excite"))
    assert len(excite[2]) == 2
    # No hook: nothing is reported, and the same layers run.
    calls.clear()
    eager.image_features(inputs["pixel_values"][:1])
    assert calls == []


def test_hook_sees_bert_sublayers_and_projection(functional):
    _, values, inputs, _ = functional
    eager = EagerReference(SPEC, values=values)
    calls = []
    eager.text_features(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                        hook=lambda layer, path, args, kwargs, out: calls.append((type(layer).__name__, path, kwargs)))
    paths = [c[1] for c in calls]
    assert paths[:2] == ["text_encoder/tf_bert_model/bert/embeddings/LayerNorm",
                         "text_encoder/tf_bert_model/bert/embeddings/dropout"]
    assert paths[-3:] == ["text_encoder/tf_bert_model/bert", "text_encoder/tf_bert_model", "text_encoder/dense"]
    assert "text_encoder/tf_bert_model/bert/encoder/layer_._1/attention/self/dropout" in paths
    assert sum(c[0] == "TFBertLayer" for c in calls) == SPEC.text.num_layers
    self_attention = next(c for c in calls if c[0] == "TFBertSelfAttention")
    assert set(self_attention[2]) == {"attention_mask"}


def test_record_keras_streams_records_in_order(functional):
    model, values, inputs, want = functional
    eager = EagerReference(SPEC, values=values)
    seen = []

    def sink(record):
        assert record.order == sum(r.tower == record.tower for r in seen)  # final order on arrival
        assert record.output is not None and record.shape == record.output.shape
        seen.append(record)
        record.output, record.inputs, record.input, record.input_kwargs = None, (), None, {}  # the sink may drop them

    records = record_keras(eager, _inputs(inputs), sink=sink)
    assert [id(r) for r in records] == [id(r) for r in seen]
    vision = [r for r in records if r.tower == "vision"]
    text = [r for r in records if r.tower == "text"]
    assert records == vision + text
    assert [r.order for r in vision] == list(range(len(vision)))
    assert [r.order for r in text] == list(range(len(text)))
    assert [r.path.rsplit("/", 1)[1] for r in vision if r.role == "Block"] == SPEC.vision.block_names()
    assert all(r.cls == "EfficientNetBlock" and r.kind == "container" and r.variables == {}
               for r in vision if r.role == "Block")
    conv = next(r for r in vision if r.path.endswith("/stem_conv"))
    assert conv.variables == {"stem_conv/kernel": tuple(values["stem_conv/kernel"].shape)}
    assert conv.config["padding"] == "valid" and conv.kind == "conv"
    assert text[-1].path == "text_encoder/dense" and text[-1].kind == "linear"

    # Kept arrays, from the functional model too (it is copied into an eager reference).
    kept = record_keras(model, _inputs(inputs), towers=("text",))
    assert [r.path for r in kept] == [r.path for r in text]
    assert float(np.abs(kept[-1].output - want["text_features"]).max()) <= 1e-6
    attention = next(r for r in kept if r.cls == "TFBertSelfAttention")
    assert attention.input.shape == (3, SPEC.text.seq_length, SPEC.text.hidden_size)
    assert attention.input_kwargs["attention_mask"].shape == (3, 1, 1, SPEC.text.seq_length)

    shapes_only = record_keras(eager, _inputs(inputs), keep_outputs=False, towers=("vision",))
    assert [r.shape for r in shapes_only] == [r.shape for r in vision]
    assert all(r.output is None and r.inputs == () for r in shapes_only)
