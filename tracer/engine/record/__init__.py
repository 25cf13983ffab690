"""What a recorder produces: one `Record` per layer call, in execution order, for either framework.

Both recorders emit post-order (a container after its children), so the two sequences can be aligned.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np

# Records hold read-only views of TF tensors; torch reads them without writing (comparisons, module re-runs).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

TOWERS = ("vision", "text")
FEATURES = {"vision": "image_features", "text": "text_features"}  # each tower's output, as AlignModel names it
PROBE_IMAGE_SIZE = 65  # the probe run's image side: call order and kinds do not depend on it (5 stride-2 steps: 65 -> 3)

# Class name -> normalised kind. Kinds are what pairing compares; classes not listed are containers.
LEAF_KINDS = {
    # Keras
    "Conv2D": "conv", "DepthwiseConv2D": "depthwise", "BatchNormalization": "batchnorm", "Dense": "linear",
    "LayerNormalization": "layernorm", "Embedding": "embedding", "Activation": "activation",
    "ZeroPadding2D": "pad", "Rescaling": "rescale", "Normalization": "rescale", "Dropout": "dropout",
    "Reshape": "reshape", "Add": "add", "Multiply": "multiply", "GlobalAveragePooling2D": "pool",
    "InputLayer": "input", "TFOpLambda": "op", "SlicingOpLambda": "op",
    # PyTorch
    "Conv2d": "conv", "AlignVisionDepthwiseConv2d": "depthwise", "BatchNorm2d": "batchnorm", "Linear": "linear",
    "LayerNorm": "layernorm", "ZeroPad2d": "pad", "AdaptiveAvgPool2d": "pool", "AvgPool2d": "pool",
    "SiLU": "activation", "Sigmoid": "activation", "Tanh": "activation", "GELUActivation": "activation",
    "GELU": "activation", "NewGELUActivation": "activation", "ReLU": "activation",
}
# Kinds that compute nothing worth pairing, or whose work the other framework does elsewhere.
GAP_KINDS = {"dropout", "reshape", "add", "multiply", "rescale", "input", "op", "container"}
# The layer settings a Record keeps in `config` (Keras `get_config()` names; torch attributes are renamed to these).
CONFIG_KEYS = ("epsilon", "padding", "strides", "kernel_size", "dilation_rate", "activation", "scale", "offset",
               "approximate")
WEIGHTED_KINDS = {"conv", "depthwise", "batchnorm", "linear", "layernorm", "embedding"}
_CLASS_PREFIXES = re.compile(r"^(TFBert|AlignText|AlignVision|Align|TF)")


def kind_of(class_name: str) -> str:
    return LEAF_KINDS.get(class_name, "container")


def role_of(class_name: str) -> str:
    """A container's role across frameworks: `TFBertSelfOutput` and `AlignTextSelfOutput` are both `SelfOutput`."""
    return _CLASS_PREFIXES.sub("", class_name)


@dataclass
class Record:
    framework: str  # "keras" | "torch"
    tower: str  # "vision" | "text"
    order: int  # execution order within the tower
    path: str  # Keras layer path, or torch module name
    cls: str  # class name
    kind: str  # normalised kind (see LEAF_KINDS), "container" otherwise
    shape: tuple[int, ...]  # first output's shape, in the framework's own layout
    dtype: str
    variables: dict[str, tuple[int, ...]] = field(default_factory=dict)  # own weights: name -> shape
    activation: str | None = None  # an activation fused into the layer (Keras `activation=`) or the function
    role: str = ""  # container role ("Layer", "SelfOutput", "block"); leaves use their kind
    output: np.ndarray | None = field(default=None, repr=False)
    input: np.ndarray | None = field(default=None, repr=False)  # the first tensor the layer received (Keras)
    inputs: tuple = field(default=(), repr=False)  # every positional tensor it received
    input_kwargs: dict = field(default_factory=dict, repr=False)  # tensors it received by name (attention_mask)
    module: object = field(default=None, repr=False, compare=False)  # the torch module, to re-run it locally
    layer: object = field(default=None, repr=False, compare=False)  # the Keras layer, to read its variables
    # Settings that change what the layer computes (epsilon, padding, strides, activation, rescale scale/offset),
    # from the Keras layer's `get_config()` or the torch module's attributes; see `CONFIG_KEYS`.
    config: dict = field(default_factory=dict, repr=False, compare=False)
    # Frees the memory the arrays live in when that is not this record's own (the Keras worker's shared ring).
    release: object = field(default=None, repr=False, compare=False)

    @property
    def is_container(self) -> bool:
        return self.kind == "container"

    @property
    def channels_first(self) -> bool:
        return self.framework == "torch" and len(self.shape) == 4


def largest_output(records: list[Record], tower: str, image_size: int) -> float:
    """Elements per example of the largest output among a probe run's `records`, in a run on `image_size` pixel
    images: a vision activation grows with the image's area, a text one does not."""
    largest = max((int(np.prod(r.shape[1:])) for r in records if r.shape), default=1)
    return largest * ((image_size / PROBE_IMAGE_SIZE) ** 2 if tower == "vision" else 1.0)


def nhwc_shape(record: Record) -> tuple[int, ...]:
    """The record's output shape in Keras (channels-last) layout."""
    s = record.shape
    return (s[0], s[2], s[3], s[1]) if record.channels_first else s


def first_tensor(value):
    """The first tensor in a layer's output (tensor, tuple, dict or ModelOutput), or None."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, dict):
        return value
    if isinstance(value, dict):
        values = list(value.values())
    elif isinstance(value, (tuple, list)):
        values = list(value)
    elif hasattr(value, "to_tuple"):
        values = list(value.to_tuple())
    else:
        return None
    for v in values:
        found = first_tensor(v)
        if found is not None:
            return found
    return None


def to_numpy(tensor) -> np.ndarray | None:
    """A TF or torch tensor as numpy; None for a tensor with no data (torch's meta device)."""
    if tensor is None or getattr(tensor, "is_meta", False):
        return None
    if hasattr(tensor, "detach"):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)  # a read-only view of a TF tensor's buffer (`.numpy()` would copy it)


def first_array(value) -> np.ndarray | None:
    """The first tensor in a layer's output, as numpy."""
    return to_numpy(first_tensor(value))
