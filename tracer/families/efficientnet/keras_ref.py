"""The original model: `tf_keras.applications.EfficientNetB{n}(weights=None, ...)` with the checkpoint loaded strictly.

Models built with `weights="imagenet"` carry one more layer, tf_keras' `tf.math.multiply` after the Normalization
(see processor.py); `weights=None` cannot build it (and weights="imagenet" downloads), so when the checkpoint had it
the reference is the application's graph with that exact multiply spliced in (same layers, same variable names).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from tracer.errors import ConversionError
from tracer.families.base import KerasReference
from tracer.families.efficientnet.spec import NORMALIZATION, EfficientNetSpec

CANONICAL_NORMALIZATION = "normalization"  # the reference's variables are read under this layer name


def build_application(spec: EfficientNetSpec):
    """The tf_keras application for the spec, randomly initialised, logits (no softmax) when it has a top."""
    import tf_keras

    build = getattr(tf_keras.applications, spec.keras_class)
    kwargs = dict(weights=None, include_top=spec.include_top, input_shape=(spec.image_size, spec.image_size, 3))
    if spec.include_top:
        kwargs.update(classes=spec.num_labels, classifier_activation=None)
    model = build(**kwargs)
    if spec.imagenet_multiply:
        model = _with_imagenet_multiply(model)
    return model


def _with_imagenet_multiply(model):
    """`model` with keras.applications' ImageNet multiply between its Normalization and stem padding, as tf_keras
    builds it for weights="imagenet": the same op and constant, and a flat layer list (input, rescaling,
    normalization, tf.math.multiply, stem_conv_pad, ...) like the application's, so that checkpoints it writes are
    laid out as a weights="imagenet" model's. Every layer after the multiply is the application's own, re-called."""
    import tensorflow as tf
    import tf_keras
    from tf_keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    first = model.layers.index(model.get_layer("stem_conv_pad"))
    normalized = model.layers[first].get_input_at(0)
    new = {id(normalized): tf.math.multiply(
        normalized, tf.reshape([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB], [1, 1, 1, 3]))}
    for layer in model.layers[first:]:
        inputs = layer.get_input_at(0)
        args = [new[id(t)] for t in inputs] if isinstance(inputs, list) else new[id(inputs)]
        new[id(layer.get_output_at(0))] = layer(args)
    return tf_keras.Model(model.input, new[id(model.output)], name=model.name)


def preprocessing_model(model):
    """The Keras model's own preprocessing: raw pixels -> what the stem conv's padding receives."""
    import tf_keras

    multiply = [layer for layer in model.layers if layer.name.startswith("tf.math.multiply")]
    if multiply:
        return tf_keras.Model(model.input, multiply[0].output)
    return tf_keras.Model(model.input, model.get_layer("stem_conv_pad").input)


def reference_name(variable) -> str:
    """The checkpoint-side name the reference reads a variable by (Normalization under its canonical name)."""
    name = variable.name.split(":")[0]
    if m := NORMALIZATION.match(name):
        return f"{CANONICAL_NORMALIZATION}/{m.group('leaf')}"
    return name


def load_reference(spec: EfficientNetSpec, read: Callable[[str], np.ndarray]) -> KerasReference:
    """Build the reference and give every variable its checkpoint value by name; `consumed` lists them in order."""
    model = build_application(spec)
    consumed, seen = [], set()
    for variable in model.weights:
        name = reference_name(variable)
        if name in seen:
            raise ConversionError(f"the tf_keras model has two variables named `{name}`; build it in a fresh process")
        seen.add(name)
        value = np.asarray(read(name))
        if tuple(value.shape) != tuple(variable.shape):
            raise ConversionError(f"`{name}`: checkpoint shape {value.shape}, but {spec.keras_class} needs "
                                  f"{tuple(variable.shape)}; the checkpoint does not fit the derived variant")
        variable.assign(value.astype(variable.dtype.as_numpy_dtype, copy=False))
        consumed.append(name)
    # Normalization caches its broadcast mean/variance when built; load_weights refreshes them the same way.
    for layer in model.submodules:
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()
    return KerasReference(model=model, consumed=consumed)


def keras_logits(model, pixels_nhwc: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """The model's output (logits, or pooled features) on raw 0..255 pixels, in inference mode."""
    import tensorflow as tf

    outs = [model(tf.constant(pixels_nhwc[i:i + batch_size]), training=False).numpy()
            for i in range(0, len(pixels_nhwc), batch_size)]
    return np.concatenate(outs)
