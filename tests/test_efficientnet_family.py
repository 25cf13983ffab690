"""The keras.applications EfficientNet family: spec derivation for B0-B7, rules, strict transfer, logits parity,
processor vs Keras' own preprocessing, and the save/reload round trip. Demo checkpoints are written once per session
(B0 at 224 in all three formats, B3 at 200 as a weights="imagenet" model, a B0 without top at 128)."""

from __future__ import annotations

import time
import types
from dataclasses import dataclass

import numpy as np
import pytest

import tracer  # noqa: F401  (before TensorFlow: legacy Keras)
from tracer.errors import BadInputError, ConversionError
from tracer.engine.mapping import map_by_rules
from tracer.engine.transforms import get_transform
from tracer.families.efficientnet import hf
from tracer.families.efficientnet.family import EfficientNetFamily
from tracer.families.efficientnet.spec import (VARIANTS, at_size, derive_spec, depthwise_padding, expected_shapes,
                                               looks_like_efficientnet)

TOL = 1e-4
PRE_TOL = 1e-6
FAMILY = EfficientNetFamily()

# What transformers' convert_efficientnet_to_pytorch.py hard-codes per variant (hidden_dim, dw_padding) at the
# variants' default resolutions: an independent check of what we compute.
HF_CONVERTER = {
    "b0": (1280, []), "b1": (1280, [16]), "b2": (1408, [5, 8, 16]), "b3": (1536, [5, 18]),
    "b4": (1792, [6]), "b5": (2048, [13, 27]), "b6": (2304, [31]), "b7": (2560, [18]),
}


# ----------------------------------------------------------------------------------------------- fixtures


@dataclass
class Demo:
    name: str
    paths: dict
    model: object  # the tf_keras model that wrote the checkpoint
    options: types.SimpleNamespace
    imagenet_multiply: bool


DEMOS = {  # name -> (variant, image size, include_top, imagenet multiply, formats)
    "b0": ("b0", None, True, False, ("h5", "full_h5", "tf")),
    "b3": ("b3", 200, True, True, ("h5", "full_h5", "tf")),
    "b0_notop": ("b0", 128, False, False, ("h5",)),
}
CASES = [("b0", "h5"), ("b0", "full_h5"), ("b0", "tf"), ("b3", "h5"), ("b3", "tf"), ("b0_notop", "h5")]


@pytest.fixture(scope="session")
def demos(tmp_path_factory) -> dict[str, Demo]:
    from tracer.families.efficientnet.demo import write_demo_checkpoint

    out = {}
    for name, (variant, size, top, multiply, formats) in DEMOS.items():
        d = write_demo_checkpoint(tmp_path_factory.mktemp(f"effnet_{name}"), variant, size, top, num_labels=10,
                                  imagenet_multiply=multiply, formats=formats)
        out[name] = Demo(name, d.paths, d.model, types.SimpleNamespace(image_size=size), multiply)
    return out


@dataclass
class Converted:
    spec: object
    checkpoint: object
    weight_map: object
    accounted: dict
    coverage: object
    model: object
    reference: object
    names: dict
    processor: object
    example: object
    keras: dict
    torch: dict
    seconds: float


_CONVERTED: dict = {}


def convert(demos, name: str, fmt: str) -> Converted:
    """The family's steps, as the CLI drives them (cached per session)."""
    if (name, fmt) in _CONVERTED:
        return _CONVERTED[name, fmt]
    from tracer.engine.transfer import transfer
    from tracer.io.checkpoint import open_checkpoint

    start = time.perf_counter()
    demo = demos[name]
    checkpoint = open_checkpoint(demo.paths[fmt])
    assert FAMILY.detect(checkpoint.shapes(), {})
    spec = FAMILY.derive(checkpoint, demo.options)
    weight_map, accounted = FAMILY.weight_map(checkpoint, spec)
    model = FAMILY.build_hf(spec, demo.options)
    coverage = transfer(checkpoint.read, list(checkpoint.shapes()), weight_map, model)
    names = FAMILY.weight_names(checkpoint, spec)
    by_reference = {v: k for k, v in names.items()}
    reference = FAMILY.keras_reference(spec, lambda n: checkpoint.read(by_reference[n]))
    processor = FAMILY.processor(spec, demo.options)
    example = FAMILY.example(spec, processor, demo.options)
    result = Converted(spec, checkpoint, weight_map, accounted, coverage, model, reference, names, processor, example,
                       FAMILY.keras_outputs(reference, example), FAMILY.hf_outputs(model, example),
                       time.perf_counter() - start)
    _CONVERTED[name, fmt] = result
    return result


# ----------------------------------------------------------------------------------------------- the spec


def test_variant_table_is_tf_keras_own():
    """VARIANTS repeats what tf_keras' EfficientNetB{n} pass to EfficientNet(...): captured without building."""
    from unittest import mock

    from tf_keras.src.applications import efficientnet as E

    for v in VARIANTS:
        with mock.patch.object(E, "EfficientNet", side_effect=lambda *a, **k: a) as fake:
            args = getattr(E, f"EfficientNetB{v.name[1:]}")(weights=None)
        assert fake.called
        assert tuple(args[:4]) == (v.width_coefficient, v.depth_coefficient, v.default_size, v.dropout_rate), v


def test_base_stages_are_tf_keras_and_hf_defaults():
    from tf_keras.src.applications.efficientnet import DEFAULT_BLOCKS_ARGS
    from transformers import EfficientNetConfig

    from tracer.families.align.spec import BASE_STAGES

    keras = [(a["kernel_size"], a["repeats"], a["filters_in"], a["filters_out"], a["expand_ratio"], a["strides"])
             for a in DEFAULT_BLOCKS_ARGS]
    assert keras == list(BASE_STAGES)
    c = EfficientNetConfig()
    assert list(zip(c.kernel_sizes, c.num_block_repeats, c.in_channels, c.out_channels, c.expand_ratios,
                    c.strides)) == list(BASE_STAGES)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("include_top", [True, False], ids=["top", "notop"])
def test_derive_every_variant(variant, include_top):
    """Each variant's names and shapes give back its variant, hidden size and the converter's dw_padding, and the
    HF model built from the spec takes every mapped tensor at the transformed shape."""
    shapes = expected_shapes(variant, include_top, 1000)
    spec = derive_spec(shapes)
    hidden, padding = HF_CONVERTER[variant.name]
    assert (spec.variant, spec.width_coefficient, spec.depth_coefficient) == (
        variant.name, variant.width_coefficient, variant.depth_coefficient)
    assert spec.image_size == variant.default_size and spec.hidden_dim == hidden
    assert list(spec.depthwise_padding) == padding
    assert spec.include_top == include_top and spec.num_labels == (1000 if include_top else 0)

    model = hf.build_empty(spec)
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    weight_map = map_by_rules(shapes, FAMILY.rules(spec), spec.block_index)
    assert sorted(weight_map.unmatched) == [f"normalization/{x}" for x in ("count", "mean", "variance")]
    assert {e.parameter for e in weight_map.entries} == set(hf_shapes)
    for e in weight_map.entries:
        assert get_transform(e.transform).shape(shapes[e.variable]) == hf_shapes[e.parameter], e


def test_depthwise_padding_follows_the_resolution():
    b3 = derive_spec(expected_shapes(VARIANTS[3], True))
    assert at_size(b3, 200).depthwise_padding == (8, 18)  # 100 -> 50 -> 25 (odd: symmetric) -> 13 (odd)
    assert at_size(b3, 256).depthwise_padding == ()  # powers of two: always asymmetric
    assert depthwise_padding(224, b3.block_strides) == ()


def test_expected_shapes_are_the_keras_models(demos):
    from tracer.families.efficientnet.keras_ref import reference_name

    for name, (variant, _size, top, _m, _f) in DEMOS.items():
        model = demos[name].model  # `normalization_N` when built after others: read under its canonical name
        actual = {reference_name(w): tuple(w.shape) for w in model.weights}
        v = next(v for v in VARIANTS if v.name == variant)
        assert actual == expected_shapes(v, top, 10), name


def test_detect_imagenet_multiply_in_every_format(demos):
    """The file's own layer list (HDF5) or object graph (TF) says whether the model had the ImageNet multiply."""
    from tracer.families.efficientnet.spec import detect_imagenet_multiply
    from tracer.io.checkpoint import open_checkpoint

    for demo in demos.values():
        for fmt, path in demo.paths.items():
            with open_checkpoint(path) as checkpoint:
                assert detect_imagenet_multiply(checkpoint.path, checkpoint.format) == demo.imagenet_multiply, path


def test_derive_rejects_what_it_cannot_convert():
    shapes = expected_shapes(VARIANTS[0], True, 10)
    with pytest.raises(BadInputError, match="odd"):
        derive_spec(shapes, image_size=225)
    with pytest.raises(ConversionError, match="missing"):
        derive_spec({k: v for k, v in shapes.items() if k != "block2b_se_reduce/bias"})
    wider = dict(shapes, **{"stem_conv/kernel": (3, 3, 3, 40)})
    with pytest.raises(ConversionError, match="no EfficientNetB0-B7"):
        derive_spec(wider)
    assert not looks_like_efficientnet({**shapes, "bert/pooler/dense/kernel": (8, 8)})


def test_labels(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n\nbird\n")
    assert hf.read_labels(path, 4) == {0: "cat", 1: "dog", 2: "", 3: "bird"}
    with pytest.raises(BadInputError, match="4 line"):
        hf.read_labels(path, 10)
    spec = derive_spec(expected_shapes(VARIANTS[0], True, 4))
    config = hf.efficientnet_config(spec, hf.read_labels(path, 4))
    assert config.num_labels == 4 and config.id2label[3] == "bird"
    assert hf.efficientnet_config(spec).id2label[2] == "LABEL_2"


# ----------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name,fmt", CASES)
def test_convert_strictly_and_match_logits(demos, name, fmt):
    c = convert(demos, name, fmt)
    demo = demos[name]
    assert c.spec.imagenet_multiply == demo.imagenet_multiply
    # Every HF tensor written; every checkpoint weight used by the model or accounted for by the processor.
    assert c.coverage.hf_tensors_written == c.coverage.hf_tensors_total
    assert not c.weight_map.unmatched
    used = {e.variable for e in c.weight_map.entries}
    assert used | set(c.accounted) == set(c.checkpoint.shapes()) and not used & set(c.accounted)
    assert all(n.endswith("num_batches_tracked") for n in c.coverage.derived)
    # The Keras reference took every checkpoint weight exactly once.
    assert sorted(c.reference.consumed) == sorted(c.names.values())
    assert len(set(c.reference.consumed)) == len(c.reference.consumed)
    # Parity on realistic (calibrated) weights; the outputs are O(1), not blown up.
    out = FAMILY.output_name(c.spec)
    k, t = c.keras[out], c.torch[out]
    assert k.shape == t.shape and k.shape[0] == 4
    assert 1e-2 < np.abs(k).max() < 1e2
    delta = float(np.abs(k - t).max())
    print(f"{name}/{fmt}: {out} max|d| {delta:.2e} (max|{out}| {np.abs(k).max():.3f}), {c.seconds:.1f} s")
    assert delta < TOL
    # The Keras reference computes what the model that wrote the checkpoint computes.
    assert np.abs(FAMILY.keras_outputs(types.SimpleNamespace(model=demo.model), c.example)[out] - k).max() < 1e-5


@pytest.mark.parametrize("name,fmt", [("b0", "h5"), ("b3", "tf"), ("b0_notop", "h5")])
def test_processor_matches_keras_preprocessing(demos, name, fmt):
    from tracer.families.efficientnet.keras_ref import preprocessing_model

    c = convert(demos, name, fmt)
    keras = preprocessing_model(c.reference.model)(c.example.keras).numpy().transpose(0, 3, 1, 2)
    hf_pixels = c.example.torch["pixel_values"].numpy()
    delta = float(np.abs(keras - hf_pixels).max())
    print(f"{name}/{fmt}: preprocessing max|d| {delta:.2e}")
    assert delta <= PRE_TOL
    assert c.processor.include_top == demos[name].imagenet_multiply
    # The same through the processor straight from PIL images (its own resize), as a user would call it.
    from tracer.families.efficientnet.family import default_images
    from tracer.families.efficientnet.processor import pixels_0_255

    images = default_images(c.spec, 2)
    direct = c.processor(images, return_tensors="np")["pixel_values"]
    raw = pixels_0_255(images, c.processor)
    assert np.abs(preprocessing_model(c.reference.model)(raw).numpy().transpose(0, 3, 1, 2) - direct).max() <= PRE_TOL


@pytest.mark.parametrize("name,fmt", [("b0", "h5"), ("b3", "tf"), ("b0_notop", "h5")])
def test_save_and_reload_bit_identical(demos, name, fmt, tmp_path):
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

    c = convert(demos, name, fmt)
    c.model.save_pretrained(tmp_path)
    c.processor.save_pretrained(tmp_path)
    auto = AutoModelForImageClassification if c.spec.include_top else AutoModel
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(c.model)
    before, after = c.model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert reloaded.config.depthwise_padding == list(c.spec.depthwise_padding)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    from tracer.families.efficientnet.processor import normalized

    assert np.array_equal(normalized(c.example.keras, processor), c.example.torch["pixel_values"].numpy())
    out = FAMILY.output_name(c.spec)
    assert np.array_equal(FAMILY.hf_outputs(reloaded, c.example)[out], c.torch[out])


def test_inputs_file(demos, tmp_path):
    c = convert(demos, "b0", "h5")
    path = tmp_path / "inputs.npz"
    np.savez(path, pixel_values=c.example.keras[:2], logits=c.keras["logits"][:2])
    options = types.SimpleNamespace(inputs_file=str(path))
    example = FAMILY.example(c.spec, c.processor, options)
    assert np.array_equal(example.keras, c.example.keras[:2])
    assert np.array_equal(example.reference["logits"], c.keras["logits"][:2])
    np.savez(path, pixel_values=c.example.keras[:2].transpose(0, 3, 1, 2))
    with pytest.raises(BadInputError, match="NCHW"):
        FAMILY.example(c.spec, c.processor, options)


@pytest.mark.parametrize("multiply,variance", [(False, "squared"), (True, "std"), (True, "squared")],
                         ids=["plain", "imagenet-file", "imagenet-multiply-on-adapted-stats"])
def test_processor_reproduces_keras_arithmetic(multiply, variance):
    """Every pixel value 0..255 through tf_keras' own Rescaling + Normalization (+ tf_keras' ImageNet multiply) vs
    the processor, for the three ways the statistics and the multiply combine (the last one folds the multiply)."""
    import math

    import tensorflow as tf
    import tf_keras
    from tf_keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    from tracer.families.efficientnet.processor import build_processor, derive_preprocessing, normalized

    std = np.float32(IMAGENET_STDDEV_RGB)
    stats = {"normalization/mean": np.float32([0.485, 0.456, 0.406]),
             "normalization/variance": std if variance == "std" else std * std, "normalization/count": np.int64(7)}
    spec = derive_spec(expected_shapes(VARIANTS[0], True, 10), image_size=32, imagenet_multiply=multiply)
    pre = derive_preprocessing(spec, stats.__getitem__)
    assert pre.include_top == (multiply and variance == "std")
    assert set(pre.accounted) == set(stats)
    # Every value 0..255 in every channel, at every position mod 256.
    pixels = (np.arange(3 * 32 * 32 * 3, dtype=np.float32).reshape(3, 32, 32, 3) * 7 % 256).astype(np.float32)
    x = tf_keras.layers.Rescaling(1.0 / 255.0)(pixels)
    x = tf_keras.layers.Normalization(mean=stats["normalization/mean"], variance=stats["normalization/variance"])(x)
    if multiply:
        x = tf.math.multiply(x, tf.reshape([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB], [1, 1, 1, 3]))
    keras = x.numpy().transpose(0, 3, 1, 2)
    ours = normalized(pixels, build_processor(spec, pre))
    print(f"multiply={multiply} variance={variance}: max|d| {np.abs(keras - ours).max():.2e}")
    assert np.abs(keras - ours).max() <= PRE_TOL
