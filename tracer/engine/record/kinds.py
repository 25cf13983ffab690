"""What a layer is, for pairing: a kind shared by both frameworks, found by `isinstance` on the base classes.

A subclass (transformers' `EfficientNetDepthwiseConv2d` is an `nn.Conv2d`, a user's `MyDense` a `Dense`) gets its
base's kind; a class that is none of these is a container (it is paired by its output and role, and its own
variables are looked for in the paired subtree).
"""

from __future__ import annotations

import re
from functools import lru_cache

# Activation names, one spelling per function (Keras' `swish` is torch's SiLU).
_ACTIVATION_ALIASES = {"silu": "swish", "gelu_python": "gelu", "gelu_pytorch_tanh": "gelu_new",
                       "gelu_python_tanh": "gelu_new"}


def activation_name(name: str | None) -> str | None:
    return None if name is None else _ACTIVATION_ALIASES.get(name, name)


@lru_cache(maxsize=1)
def _keras_kinds() -> tuple:
    import tf_keras
    from tf_keras.src.layers.core.tf_op_layer import TFOpLambda

    L = tf_keras.layers
    # Most specific first: DepthwiseConv2D is a Conv subclass.
    return (
        (L.DepthwiseConv2D, "depthwise"), (L.Conv2D, "conv"), (L.Dense, "linear"),
        (L.BatchNormalization, "batchnorm"), (L.LayerNormalization, "layernorm"), (L.Embedding, "embedding"),
        ((L.Activation, L.ReLU, L.Softmax, L.ELU, L.LeakyReLU, L.PReLU), "activation"),
        (L.ZeroPadding2D, "pad"), ((L.Rescaling, L.Normalization), "rescale"),
        ((L.Dropout, L.SpatialDropout2D, L.GaussianNoise), "dropout"),
        ((L.Reshape, L.Flatten, L.Permute), "reshape"), (L.Add, "add"), (L.Multiply, "multiply"),
        (L.Concatenate, "concat"),
        ((L.GlobalAveragePooling2D, L.GlobalMaxPooling2D, L.AveragePooling2D, L.MaxPooling2D), "pool"),
        (L.InputLayer, "input"), (TFOpLambda, "op"),
    )


@lru_cache(maxsize=1)
def _torch_kinds() -> tuple:
    from torch import nn

    import transformers.activations as hf_activations

    hf_acts = tuple({v if isinstance(v, type) else v[0] for v in hf_activations.ACT2CLS.values()})
    return (
        (nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.modules.batchnorm._BatchNorm, "batchnorm"),
        (nn.LayerNorm, "layernorm"), (nn.Embedding, "embedding"),
        ((nn.SiLU, nn.ReLU, nn.ReLU6, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.ELU, nn.LeakyReLU, nn.PReLU,
          nn.Hardswish, nn.Mish) + hf_acts, "activation"),
        ((nn.ZeroPad2d, nn.ConstantPad2d), "pad"),
        ((nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d), "pool"),
        ((nn.Dropout, nn.Dropout2d), "dropout"), ((nn.Flatten, nn.Identity, nn.Unflatten), "reshape"),
    )


def keras_kind(layer) -> str:
    for bases, kind in _keras_kinds():
        if isinstance(layer, bases):
            return kind
    return "container"


def torch_kind(module) -> str:
    for bases, kind in _torch_kinds():
        if isinstance(module, bases):
            if kind == "conv" and module.groups > 1 and module.groups == module.in_channels:
                return "depthwise"
            return kind
    return "container"


@lru_cache(maxsize=1)
def _torch_activation_names() -> dict:
    from torch import nn

    import transformers.activations as hf_activations

    names = {nn.SiLU: "swish", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
             nn.Softmax: "softmax", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.Hardswish: "hard_swish"}
    for name, cls in hf_activations.ACT2CLS.items():
        names.setdefault(cls if isinstance(cls, type) else cls[0], activation_name(name))
    return names


def torch_activation(module) -> str | None:
    """The Keras name of the function an activation module computes (None for other modules)."""
    from torch import nn

    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_new"
    for cls in type(module).__mro__:
        if cls in _torch_activation_names():
            return _torch_activation_names()[cls]
    return None


def keras_activation(layer) -> str | None:
    """The function a Keras layer applies (`Conv2D(activation=...)`, `Activation(...)`), by name."""
    fn = getattr(layer, "activation", None)
    return activation_name(getattr(fn, "__name__", None)) if fn is not None else None


_CAMEL = re.compile(r"[A-Z][a-z0-9]*|[a-z0-9]+")


def generic_role(cls: str) -> str:
    """A container's role across frameworks: its class name without the `TF` prefix TF classes carry
    (`TFBertLayer` and `BertLayer` are both `BertLayer`)."""
    return cls[2:] if cls.startswith("TF") and cls[2:3].isupper() else cls


def role_words(role: str) -> tuple[str, ...]:
    """A role's camel-case words after the first (the model's name): `AlignTextSelfOutput` -> (Text, Self,
    Output); one-word roles keep their word."""
    words = tuple(_CAMEL.findall(role))
    return words[1:] if len(words) > 1 else words


def roles_agree(a: str, b: str) -> float:
    """1 for the same role; where one's words end the other's (`BertSelfOutput` / `AlignTextSelfOutput`), the
    share of the longer's words they make up (2/3 there, 1/3 for `BertOutput`); else 0."""
    if a == b:
        return 1.0
    wa, wb = role_words(a), role_words(b)
    short, long = (wa, wb) if len(wa) <= len(wb) else (wb, wa)
    if short and long[len(long) - len(short):] == short:
        return len(short) / len(long)
    return 0.0
