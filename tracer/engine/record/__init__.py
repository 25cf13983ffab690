"""What a recorder produces: one `Record` per layer call, in execution order, for either framework.

Both recorders emit post-order (a container after its children), so the two sequences can be aligned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

# Records hold read-only views of TF tensors; torch reads them without writing (comparisons, module re-runs).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Kinds that compute nothing worth pairing, or whose work the other framework does elsewhere.
GAP_KINDS = {"dropout", "reshape", "add", "multiply", "concat", "rescale", "input", "op", "container"}
# The layer settings a Record keeps in `config` (Keras `get_config()` names; torch attributes are renamed to these).
CONFIG_KEYS = ("epsilon", "padding", "strides", "kernel_size", "dilation_rate", "activation", "scale", "offset",
               "approximate")
WEIGHTED_KINDS = {"conv", "depthwise", "batchnorm", "linear", "layernorm", "embedding"}


@dataclass
class Record:
    framework: str  # "keras" | "torch"
    tower: str  # the part of the model it belongs to (ALIGN: "vision" | "text"; a single-part model: "model")
    order: int  # execution order within the part
    path: str  # Keras layer path, or torch module name
    cls: str  # class name
    kind: str  # the kind both frameworks share (`kinds.keras_kind` / `kinds.torch_kind`), "container" otherwise
    shape: tuple[int, ...]  # first output's shape, in the framework's own layout
    dtype: str
    variables: dict[str, tuple[int, ...]] = field(default_factory=dict)  # own weights: name -> shape
    activation: str | None = None  # an activation fused into the layer (Keras `activation=`) or the function
    role: str = ""  # container role ("Layer", "SelfOutput", "block"); leaves use their kind
    output: np.ndarray | None = field(default=None, repr=False)
    input: np.ndarray | None = field(default=None, repr=False)  # the first tensor the layer received (Keras)
    input_shape: tuple[int, ...] = ()  # that tensor's shape (both sides: it tells a layer's input layout)
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


def nchw_to_nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 4-D shape read as NCHW, in NHWC order (other ranks as they are)."""
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without its batch axis and its singleton axes (Keras pools to (N, C) where torch keeps (N, C, 1, 1);
    a recording may use a smaller batch)."""
    return tuple(d for d in shape[1:] if d != 1)


def output_layout(keras_shape: tuple[int, ...], torch_shape: tuple[int, ...], prefer_nchw: bool = False) -> str | None:
    """How the torch output is laid out against the Keras one: `same`, `nchw` (torch NCHW where Keras is NHWC),
    or None when the shapes do not correspond. Where both readings fit (H = W = C), `prefer_nchw` decides."""
    same = squeezed(keras_shape) == squeezed(torch_shape)
    nchw = len(torch_shape) == 4 and squeezed(keras_shape) == squeezed(nchw_to_nhwc(torch_shape))
    if same and nchw:
        return "nchw" if prefer_nchw else "same"
    return "same" if same else "nchw" if nchw else None


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
