"""Derive a keras.applications EfficientNet's description (variant, head, widths, padding) from its weights.

Everything comes from the checkpoint's names and shapes: the variant is the one row of `VARIANTS` whose rounded
channel counts and block counts reproduce the checkpoint's exactly; `depthwise_padding` is computed from the input
resolution the way Keras pads (`imagenet_utils.correct_pad`), not looked up.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

from tracer.errors import BadInputError, ConversionError
from tracer.families.naming import EFFICIENTNET_BLOCK
# The base stages and channel rounding are EfficientNet's own, shared with ALIGN's image tower.
from tracer.families.align.spec import BASE_STAGES, SE_RATIO, STEM_FILTERS, round_filters, round_repeats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One `tf_keras.applications.EfficientNetB{n}`: the arguments it passes to `EfficientNet(...)`."""

    name: str
    width_coefficient: float
    depth_coefficient: float
    default_size: int
    dropout_rate: float


# As tf_keras' EfficientNetB0..B7 call EfficientNet(width, depth, default_size, dropout_rate) (checked against
# tf_keras itself in the tests).
VARIANTS: tuple[Variant, ...] = (
    Variant("b0", 1.0, 1.0, 224, 0.2),
    Variant("b1", 1.0, 1.1, 240, 0.2),
    Variant("b2", 1.1, 1.2, 260, 0.3),
    Variant("b3", 1.2, 1.4, 300, 0.3),
    Variant("b4", 1.4, 1.8, 380, 0.4),
    Variant("b5", 1.6, 2.2, 456, 0.4),
    Variant("b6", 1.8, 2.6, 528, 0.5),
    Variant("b7", 2.0, 3.1, 600, 0.5),
)
TOP_FILTERS = 1280  # keras.applications' top conv: round_filters(1280)
DROP_CONNECT_RATE = 0.2
BATCH_NORM_EPS = 1e-3  # tf_keras BatchNormalization's default, which keras.applications keeps

_BLOCK = re.compile(f"^{EFFICIENTNET_BLOCK}_")
# keras.applications leaves the Normalization layer unnamed: `normalization`, or `normalization_N` when other models
# were built first in the same session.
NORMALIZATION = re.compile(r"^(?P<layer>normalization(?:_\d+)?)/(?P<leaf>mean|variance|count)$")
NOT_EFFICIENTNET = ("is this a tf_keras.applications EfficientNetB0-B7 checkpoint (model.save_weights / model.save "
                    "of EfficientNetB{n}(...))? Other architectures cannot be converted by this family")


@dataclass(frozen=True)
class Preprocessing:
    """What the Keras model's first layers compute, as the HF image processor's arguments (see processor.py)."""

    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    include_top: bool  # the processor divides by image_std a second time (the ImageNet multiply)
    accounted: dict[str, str]  # checkpoint weight -> what it became (they are no model weights)


@dataclass(frozen=True)
class EfficientNetSpec:
    variant: str  # "b0".."b7"
    width_coefficient: float
    depth_coefficient: float
    default_size: int
    dropout_rate: float
    image_size: int  # the input resolution the converted model is checked (and padded) at
    include_top: bool
    num_labels: int  # 0 without the `predictions` layer
    hidden_dim: int  # the top conv's width: round_filters(1280)
    depthwise_padding: tuple[int, ...]  # blocks whose stride-2 depthwise conv Keras pads symmetrically
    block_names: tuple[str, ...]  # "1a", "2a", "2b", ... in network order
    normalization_layer: str = "normalization"  # the checkpoint's name for it
    imagenet_multiply: bool = False  # the model was built with weights="imagenet": an extra 1/sqrt(std) multiply
    batch_norm_eps: float = BATCH_NORM_EPS
    preprocessing: Preprocessing | None = None  # from the checkpoint's Normalization values (family.derive)

    @property
    def stage_repeats(self) -> list[int]:
        return [round_repeats(s[1], self.depth_coefficient) for s in BASE_STAGES]

    @property
    def block_strides(self) -> list[int]:
        return [s[5] if j == 0 else 1 for s, n in zip(BASE_STAGES, self.stage_repeats) for j in range(n)]

    @property
    def block_index(self) -> dict[str, int]:
        """Keras' `2b` -> HF's running block number."""
        return {name: i for i, name in enumerate(self.block_names)}

    @property
    def keras_class(self) -> str:
        return f"EfficientNetB{self.variant[1:]}"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        head = f"{self.num_labels} labels" if self.include_top else "no top"
        return (f"EfficientNet-{self.variant.upper()} (width {self.width_coefficient}, depth {self.depth_coefficient}, "
                f"{len(self.block_names)} blocks, hidden {self.hidden_dim}), {head}, input {self.image_size}x"
                f"{self.image_size}, symmetric stride-2 padding at blocks {list(self.depthwise_padding)}"
                + (", ImageNet input scaling" if self.imagenet_multiply else ""))


def block_names(depth: float) -> tuple[str, ...]:
    return tuple(f"{i + 1}{chr(97 + j)}" for i, s in enumerate(BASE_STAGES) for j in range(round_repeats(s[1], depth)))


def depthwise_padding(image_size: int, block_strides: Sequence[int]) -> tuple[int, ...]:
    """The blocks whose stride-2 depthwise conv Keras pads symmetrically at this input size.

    keras.applications pads before every stride-2 conv with `correct_pad`: (k//2 - 1, k//2) on an even input (HF's
    default, `adjust_padding`), (k//2, k//2) on an odd one (HF: the block is in `depthwise_padding`). Both give
    ceil(size / 2) outputs; the stem halves the input the same way.
    """
    size = math.ceil(image_size / 2)
    out = []
    for index, stride in enumerate(block_strides):
        if stride == 2:
            if size % 2:
                out.append(index)
            size = math.ceil(size / 2)
    return tuple(out)


def expected_shapes(variant: Variant, include_top: bool, num_labels: int = 1000,
                    normalization_layer: str = "normalization") -> dict[str, tuple[int, ...]]:
    """Every weight `EfficientNetB{n}(weights=None, include_top=..., classes=num_labels)` has, name -> shape, in
    the model's order (what the architecture implies; the tests check it against tf_keras itself)."""
    w, d = variant.width_coefficient, variant.depth_coefficient
    shapes: dict[str, tuple[int, ...]] = {f"{normalization_layer}/mean": (3,), f"{normalization_layer}/variance": (3,),
                                          f"{normalization_layer}/count": ()}

    def bn(prefix: str, c: int) -> None:
        for leaf in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"{prefix}/{leaf}"] = (c,)

    stem = round_filters(STEM_FILTERS, w)
    shapes["stem_conv/kernel"] = (3, 3, 3, stem)
    bn("stem_bn", stem)
    for i, (kernel, repeats, c_in, c_out, expand, _stride) in enumerate(BASE_STAGES):
        c_in, c_out = round_filters(c_in, w), round_filters(c_out, w)
        for j in range(round_repeats(repeats, d)):
            name = f"block{i + 1}{chr(97 + j)}_"
            cin = c_in if j == 0 else c_out
            filters = cin * expand
            if expand != 1:
                shapes[name + "expand_conv/kernel"] = (1, 1, cin, filters)
                bn(name + "expand_bn", filters)
            shapes[name + "dwconv/depthwise_kernel"] = (kernel, kernel, filters, 1)
            bn(name + "bn", filters)
            se = max(1, int(cin * SE_RATIO))
            shapes[name + "se_reduce/kernel"] = (1, 1, filters, se)
            shapes[name + "se_reduce/bias"] = (se,)
            shapes[name + "se_expand/kernel"] = (1, 1, se, filters)
            shapes[name + "se_expand/bias"] = (filters,)
            shapes[name + "project_conv/kernel"] = (1, 1, filters, c_out)
            bn(name + "project_bn", c_out)
        last = c_out
    top = round_filters(TOP_FILTERS, w)
    shapes["top_conv/kernel"] = (1, 1, last, top)
    bn("top_bn", top)
    if include_top:
        shapes["predictions/kernel"] = (top, num_labels)
        shapes["predictions/bias"] = (num_labels,)
    return shapes


def looks_like_efficientnet(names: Mapping[str, Sequence[int]]) -> bool:
    """keras.applications' stem, top conv and block layout, and nothing of another model (ALIGN's BERT)."""
    return ("stem_conv/kernel" in names and "top_conv/kernel" in names and "block1a_dwconv/depthwise_kernel" in names
            and all(_BLOCK.match(n) or n.split("/")[0] in ("stem_conv", "stem_bn", "top_conv", "top_bn", "predictions")
                    or NORMALIZATION.match(n) for n in names))


def normalization_layer(names: Mapping[str, Sequence[int]]) -> str:
    layers = sorted({m.group("layer") for n in names if (m := NORMALIZATION.match(n))})
    if len(layers) != 1:
        raise ConversionError(f"expected one Normalization layer (`normalization/mean`, `/variance`, `/count`), found "
                              f"{layers or 'none'}; " + NOT_EFFICIENTNET)
    missing = [leaf for leaf in ("mean", "variance", "count") if f"{layers[0]}/{leaf}" not in names]
    if missing:
        raise ConversionError(f"the Normalization layer `{layers[0]}` lacks {missing}: the checkpoint is incomplete; "
                              "use the complete file model.save_weights wrote")
    return layers[0]


def _diff(actual: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]) -> str:
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    wrong = [f"{n}: {tuple(actual[n])} (expected {expected[n]})" for n in expected
             if n in actual and tuple(actual[n]) != tuple(expected[n])]
    parts = [f"{len(missing)} missing {missing[:6]}" if missing else "", f"{len(extra)} unexpected {extra[:6]}"
             if extra else "", f"{len(wrong)} with other shapes {wrong[:6]}" if wrong else ""]
    return "; ".join(p for p in parts if p)


def derive_spec(names: Mapping[str, Sequence[int]], image_size: int | None = None,
                imagenet_multiply: bool = False) -> EfficientNetSpec:
    """The spec from name -> shape. `image_size`: the input resolution (default: the variant's own)."""
    names = {n: tuple(s) for n, s in names.items()}
    if not looks_like_efficientnet(names):
        raise ConversionError("the checkpoint's names are not keras.applications EfficientNet's (stem_conv, "
                              "block{N}{a..}_*, top_conv[, predictions]); " + NOT_EFFICIENTNET)
    norm = normalization_layer(names)
    include_top = "predictions/kernel" in names
    num_labels = int(names["predictions/kernel"][1]) if include_top else 0
    if include_top and names.get("predictions/bias") != (num_labels,):
        raise ConversionError(f"`predictions/bias` is {names.get('predictions/bias')}, the kernel says ({num_labels},): "
                              "the checkpoint is inconsistent; re-export it")
    fits = {v.name: _diff(names, expected_shapes(v, include_top, max(num_labels, 1), norm)) for v in VARIANTS}
    matching = [v for v in VARIANTS if not fits[v.name]]
    if not matching:
        stages = {}
        for n in names:
            if m := _BLOCK.match(n):
                stages.setdefault(int(m.group("stage")), set()).add(m.group("letter"))
        closest = min(VARIANTS, key=lambda v: len(fits[v.name]))
        raise ConversionError(
            f"no EfficientNetB0-B7 has these weights: blocks per stage {[len(stages[k]) for k in sorted(stages)]}, "
            f"stem width {names['stem_conv/kernel'][-1]}, top width {names['top_conv/kernel'][-1]}; closest is "
            f"{closest.name.upper()}: {fits[closest.name]}. " + NOT_EFFICIENTNET + " (custom width/depth coefficients "
            "or block arguments are not supported)")
    variant = matching[0]
    size = int(image_size or variant.default_size)
    if size < 32:
        raise BadInputError(f"image size {size} is below keras.applications' minimum of 32; pass a larger --image_size")
    if size % 2:
        raise BadInputError(f"image size {size} is odd: Keras then pads the stem symmetrically, but transformers' "
                            "EfficientNet stem always pads right/bottom only, so the two cannot match; pass an even "
                            "--image_size")
    if image_size and size != variant.default_size:
        logger.info("EfficientNet-%s at %dx%d instead of its default %d", variant.name.upper(), size, size,
                    variant.default_size)
    spec = EfficientNetSpec(
        variant=variant.name, width_coefficient=variant.width_coefficient,
        depth_coefficient=variant.depth_coefficient, default_size=variant.default_size,
        dropout_rate=variant.dropout_rate, image_size=size, include_top=include_top, num_labels=num_labels,
        hidden_dim=round_filters(TOP_FILTERS, variant.width_coefficient), depthwise_padding=(),
        block_names=block_names(variant.depth_coefficient), normalization_layer=norm,
        imagenet_multiply=bool(imagenet_multiply))
    return _with_padding(spec)


def _with_padding(spec: EfficientNetSpec) -> EfficientNetSpec:
    return replace(spec, depthwise_padding=depthwise_padding(spec.image_size, spec.block_strides))


def at_size(spec: EfficientNetSpec, image_size: int) -> EfficientNetSpec:
    """The same network checked at another input size (the padding follows)."""
    if image_size % 2 or image_size < 32:
        raise BadInputError(f"image size {image_size}: must be even and at least 32 (see derive_spec)")
    return _with_padding(replace(spec, image_size=int(image_size)))


# ----------------------------------------------------------------------------------------------- the input scaling

# tf_keras names the weights="imagenet" models' extra `tf.math.multiply(x, 1/sqrt(IMAGENET_STDDEV_RGB))` layer so.
_MULTIPLY_LAYER = re.compile(r"^tf\.math\.multiply(_\d+)?$")


def _h5_layer_names(path: str) -> list[str] | None:
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        attrs = root.attrs
        if "layer_names" in attrs:
            values = list(np.atleast_1d(attrs["layer_names"]))
        elif "layer_names0" in attrs:  # Keras splits attributes over 64 KB into layer_names0, layer_names1, ...
            values, i = [], 0
            while f"layer_names{i}" in attrs:
                values.extend(np.atleast_1d(attrs[f"layer_names{i}"]))
                i += 1
        else:
            return None
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _tf_layers_between_normalization_and_stem(prefix: str) -> int | None:
    """How many layers the checkpoint's model has between its first two layers with weights (Normalization and
    stem_conv): 1 (stem_conv_pad) for weights=None models, 2 when the ImageNet multiply sits between them. The object
    graph names a functional model's layers `layer-N` and, again, those with weights `layer_with_weights-M`."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        raw = tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    except (tf.errors.OpError, ValueError):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(raw)
    # The root, or a node holding the model's layers when the checkpoint is a tf.train.Checkpoint(model=...).
    for node in graph.nodes:
        children = {c.local_name: c.node_id for c in node.children}
        if "layer_with_weights-0" in children and "layer_with_weights-1" in children:
            position = {node_id: int(name[6:]) for name, node_id in children.items() if re.fullmatch(r"layer-\d+", name)}
            first, second = children["layer_with_weights-0"], children["layer_with_weights-1"]
            if first in position and second in position:
                return position[second] - position[first] - 1
    return None


def detect_imagenet_multiply(path: str, format: str) -> bool | None:
    """Whether the saved model applied keras.applications' ImageNet multiply after its Normalization layer (built
    with weights="imagenet"): from the HDF5 file's layer names, or the TF checkpoint's object graph. None when the
    file does not say."""
    if format == "h5":
        layers = _h5_layer_names(path)
        return None if layers is None else any(_MULTIPLY_LAYER.match(n) for n in layers)
    between = _tf_layers_between_normalization_and_stem(path)
    return {1: False, 2: True}.get(between) if between is not None else None
