"""A torch model in float64 for a `--float64` trace: parameters and buffers in double, and its attention's softmax
in float64 too.

transformers' eager attention (`eager_attention_forward`, BERT's and ALIGN's text tower's) takes its softmax in
float32 whatever the model's dtype (`softmax(..., dtype=torch.float32)`, for float16/bfloat16 stability); in a
float64 model that alone leaves ~5e-8 of float32 round-off in every attention layer and hides what float64 is for.
`to_float64` points the model's attention at the same computation with the softmax in the activations' dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ATTENTION = "tracer_float64_eager"


def _eager_attention_float64(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                             **kwargs):
    """transformers' `eager_attention_forward`, its softmax in the query's dtype."""
    import torch  # here, so that the Keras worker can import this module without torch

    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register() -> None:
    """The attention, and its mask built as for transformers' eager attention (an additive float mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    AttentionInterface.register(ATTENTION, _eager_attention_float64)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _configs(model: torch.nn.Module) -> list:
    """Every config the model's modules hold, with their text/vision sub-configs (ALIGN), each once."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for config in list(configs.values()):
        for sub in (getattr(config, name, None) for name in ("text_config", "vision_config")):
            if sub is not None:
                configs[id(sub)] = sub
    return list(configs.values())


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in double (also on the meta device: the weights then arrive cast), its eager attention in float64."""
    model = model.double()
    eager = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) in (None, "eager")]
    if eager:
        _register()
        for config in eager:
            config._attn_implementation = ATTENTION
    return model


def to_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Back to the checkpoint's float32 and transformers' own eager attention (what is saved)."""
    model = model.float()
    for config in _configs(model):
        if getattr(config, "_attn_implementation", None) == ATTENTION:
            config._attn_implementation = "eager"
    return model


@contextmanager
def keras_dtype(name: str):
    """Keras layers made inside take `name` as their dtype; the process's own setting is restored afterwards."""
    import tf_keras

    before = tf_keras.backend.floatx()
    tf_keras.backend.set_floatx(name)
    try:
        yield
    finally:
        tf_keras.backend.set_floatx(before)


@contextmanager
def keras_floatx(float64: bool):
    """`keras_dtype('float64')` with `float64`; else nothing changes."""
    if not float64:
        yield
        return
    with keras_dtype("float64"):
        yield


def keras_float64(model):
    """A tf_keras model in float64: itself when every float weight already is; else a functional or Sequential
    model rebuilt layer by layer (same layer names) in float64, its weights cast from the original's. A subclassed
    model cannot be rebuilt from outside: `BadInputError`, build it under `tf_keras.backend.set_floatx('float64')`."""
    import numpy as np
    import tf_keras

    from tracer.errors import BadInputError

    floats = [w for w in model.weights if w.dtype.is_floating]
    if all(w.dtype.name == "float64" for w in floats) and getattr(model, "dtype", "float64") == "float64":
        return model
    if not isinstance(model, (tf_keras.Sequential, tf_keras.Model)) or not getattr(model, "_is_graph_network",
                                                                                  isinstance(model, tf_keras.Sequential)):
        raise BadInputError(f"float64=True needs the Keras model in float64, and a subclassed "
                            f"{type(model).__name__} cannot be rebuilt from outside: build it under "
                            "tf_keras.backend.set_floatx('float64') and pass that")

    def clone(layer):
        return type(layer).from_config({**layer.get_config(), "dtype": "float64"})

    with keras_floatx(True):
        copy = tf_keras.models.clone_model(model, clone_function=clone)
    copy.set_weights([np.asarray(w, np.float64) if np.asarray(w).dtype.kind == "f" else w
                      for w in model.get_weights()])
    return copy
