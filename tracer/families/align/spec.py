"""Derive the model description (EfficientNet width/depth, BERT sizes, projection) from variable names and shapes.

Nothing here knows about ALIGN-base: every size comes from the checkpoint, so the same code serves B0-B7 and
any BERT. Only what the weights cannot tell (input resolution, sequence length) has a default, taken from coyo.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from tracer.errors import ConversionError
from tracer.families.naming import BERT_LAYER, EFFICIENTNET_BLOCK

# EfficientNet's base stages (Tan & Le 2019), shared by Keras, coyo and HF: (kernel, repeats, in, out, expand, stride).
BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
DEPTH_DIVISOR = 8
SE_RATIO = 0.25
# (width, depth) of the named variants, preferred when several coefficients build the same network.
NAMED_VARIANTS = {
    "b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4),
    "b4": (1.4, 1.8), "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1),
}
BERT_HEAD_SIZE = 64  # coyo builds BertConfig(num_attention_heads=hidden // 64)

TEMPERATURE_NAMES = ("Variable", "temperature")
_BLOCK = re.compile(f"^{EFFICIENTNET_BLOCK}_")
_BERT_LAYER = re.compile(f"^(?P<scope>.+?/bert)/encoder/{BERT_LAYER}/")
_DENSE_KERNEL = re.compile(r"^dense(_\d+)?/kernel$")
NOT_ALIGN = ("is this a coyo-align ALIGN checkpoint? Pass the weights its training saved (model.save_weights); a "
             "checkpoint of another architecture cannot be converted to AlignModel")


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """EfficientNet's channel rounding, as Keras and HF both write it."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class VisionSpec:
    width_coefficient: float
    depth_coefficient: float
    image_size: int = 289
    batch_norm_eps: float = 1e-3
    virtual_batch_size: int = 16

    @property
    def stage_repeats(self) -> list[int]:
        return [round_repeats(s[1], self.depth_coefficient) for s in BASE_STAGES]

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_repeats)

    @property
    def hidden_dim(self) -> int:
        """Channels of the last block: coyo's EfficientNet has no top conv, so this is the image embedding size."""
        return round_filters(BASE_STAGES[-1][3], self.width_coefficient)

    @property
    def variant(self) -> str | None:
        for name, wd in NAMED_VARIANTS.items():
            if wd == (self.width_coefficient, self.depth_coefficient):
                return name
        return None

    def block_names(self) -> list[str]:
        """coyo's block prefixes (`block3a`) in execution order; their position is HF's running block index."""
        return [f"block{i + 1}{chr(97 + j)}" for i, n in enumerate(self.stage_repeats) for j in range(n)]

    def block_index(self) -> dict[str, int]:
        """coyo's block id (`3a`) -> HF's running index in `vision_model.encoder.blocks`."""
        return {name[len("block"):]: i for i, name in enumerate(self.block_names())}


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    seq_length: int = 64
    layer_norm_eps: float = 1e-12
    scope: str = "tf_bert_model/bert"


@dataclass(frozen=True)
class AlignSpec:
    vision: VisionSpec
    text: TextSpec
    embed_dim: int
    temperature_name: str = "Variable"
    projection_name: str = "dense"
    extras: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def _coefficient(candidates: Sequence[float], fits) -> float | None:
    for c in candidates:
        if fits(c):
            return c
    return None


def _grid(lo: float, hi: float, step: float) -> list[float]:
    return [round(lo + k * step, 2) for k in range(int(round((hi - lo) / step)) + 1)]


def derive_vision(shapes: Mapping[str, Sequence[int]], image_size: int = 289) -> VisionSpec:
    blocks: dict[int, set[str]] = {}
    for name in shapes:
        m = _BLOCK.match(name)
        if m:
            blocks.setdefault(int(m.group("stage")), set()).add(m.group("letter"))
    if "stem_conv/kernel" not in shapes or not blocks:
        raise ConversionError("no EfficientNet image tower found: expected `stem_conv/kernel` and `block1a_*` "
                              f"variables; {NOT_ALIGN}")
    if sorted(blocks) != list(range(1, len(BASE_STAGES) + 1)):
        raise ConversionError(f"EfficientNet stages found: {sorted(blocks)}; expected 1..{len(BASE_STAGES)}: the image "
                              f"tower is incomplete or not an EfficientNet; {NOT_ALIGN}")
    repeats = [len(blocks[i + 1]) for i in range(len(BASE_STAGES))]
    for i, letters in blocks.items():
        if sorted(letters) != [chr(97 + j) for j in range(len(letters))]:
            raise ConversionError(f"EfficientNet stage {i} has non-contiguous blocks: {sorted(letters)}: variables of "
                                  "the missing blocks were lost; use a complete checkpoint")

    channels = [(STEM_FILTERS, shapes["stem_conv/kernel"][-1])]
    for i, stage in enumerate(BASE_STAGES):
        kernel = shapes.get(f"block{i + 1}a_project_conv/kernel")
        if kernel is None:
            raise ConversionError(f"missing `block{i + 1}a_project_conv/kernel`, needed to derive the EfficientNet "
                                  "width: the checkpoint is incomplete; use a complete checkpoint")
        channels.append((stage[3], kernel[-1]))

    named_w = sorted({w for w, _ in NAMED_VARIANTS.values()})
    named_d = sorted({d for _, d in NAMED_VARIANTS.values()})
    width = _coefficient(
        named_w + _grid(0.1, 4.0, 0.1) + _grid(0.05, 4.0, 0.05),
        lambda w: all(round_filters(base, w) == found for base, found in channels),
    )
    # Repeats are ceil(depth * base), so the fitting depths form an interval (lo, hi]: take its roundest top.
    depth = _coefficient(
        named_d + _grid(0.1, 6.0, 0.1)[::-1] + _grid(0.05, 6.0, 0.05)[::-1],
        lambda d: [round_repeats(s[1], d) for s in BASE_STAGES] == repeats,
    )
    if width is None:
        raise ConversionError(f"no EfficientNet width coefficient gives these channel counts (base, found): "
                              f"{channels}; AlignModel only builds EfficientNets scaled by a width coefficient, so it "
                              "cannot hold this image tower")
    if depth is None:
        raise ConversionError(f"no EfficientNet depth coefficient gives these block repeats: {repeats}; AlignModel "
                              "only builds EfficientNets scaled by a depth coefficient, so it cannot hold this image "
                              "tower")
    # Keras adds a residual to any stride-1 block whose width is unchanged; HF's AlignVision never does in a
    # stage's first block. Such a network (very narrow widths) has no AlignModel equivalent.
    for i, (_, _, f_in, f_out, _, stride) in enumerate(BASE_STAGES):
        if stride == 1 and round_filters(f_in, width) == round_filters(f_out, width):
            raise ConversionError(
                f"block{i + 1}a keeps {round_filters(f_in, width)} channels at stride 1, so the Keras EfficientNet adds a "
                "residual there, which transformers' AlignVision never adds to a stage's first block: AlignModel "
                f"cannot reproduce this network (width coefficient {width}); it cannot be converted"
            )
    # Prefer a named variant's pair when both coefficients fit it.
    for w, d in NAMED_VARIANTS.values():
        if all(round_filters(b, w) == f for b, f in channels) and [round_repeats(s[1], d) for s in BASE_STAGES] == repeats:
            width, depth = w, d
            break
    return VisionSpec(width_coefficient=width, depth_coefficient=depth, image_size=image_size)


def derive_text(shapes: Mapping[str, Sequence[int]], seq_length: int = 64) -> TextSpec:
    layers: dict[str, set[int]] = {}
    for name in shapes:
        m = _BERT_LAYER.match(name)
        if m:
            layers.setdefault(m.group("scope"), set()).add(int(m.group("layer")))
    if not layers:
        raise ConversionError(f"no BERT text tower found: expected `…/bert/encoder/layer_._N/…` variables; {NOT_ALIGN}")
    if len(layers) > 1:
        raise ConversionError(f"more than one BERT found in the checkpoint: {sorted(layers)}; AlignModel has one "
                              "text tower, so it cannot hold this checkpoint")
    scope, indices = next(iter(layers.items()))
    if sorted(indices) != list(range(len(indices))):
        raise ConversionError(f"BERT encoder layers are not contiguous: {sorted(indices)}: variables of the missing "
                              "layers were lost; use a complete checkpoint")

    def shape(suffix: str) -> Sequence[int]:
        name = f"{scope}/{suffix}"
        if name not in shapes:
            raise ConversionError(f"missing BERT variable `{name}`, needed to derive the BERT sizes: the checkpoint "
                                  "is incomplete; use a complete checkpoint")
        return shapes[name]

    vocab, hidden = shape("embeddings/word_embeddings/weight")
    if hidden % BERT_HEAD_SIZE:
        raise ConversionError(f"BERT hidden size {hidden} is not a multiple of {BERT_HEAD_SIZE}: the number of "
                              f"attention heads cannot be derived (coyo builds hidden // {BERT_HEAD_SIZE} heads, and the "
                              "weights do not record it), so this text tower cannot be converted")
    return TextSpec(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_layers=len(indices),
        num_heads=int(hidden) // BERT_HEAD_SIZE,
        intermediate_size=int(shape("encoder/layer_._0/intermediate/dense/kernel")[1]),
        max_position_embeddings=int(shape("embeddings/position_embeddings/embeddings")[0]),
        type_vocab_size=int(shape("embeddings/token_type_embeddings/embeddings")[0]),
        seq_length=seq_length,
        scope=scope,
    )


def derive_spec(shapes: Mapping[str, Sequence[int]], image_size: int = 289, seq_length: int = 64) -> AlignSpec:
    """The model description from `{variable name: shape}` (names without `:0`, weights only)."""
    vision = derive_vision(shapes, image_size)
    text = derive_text(shapes, seq_length)

    # Never pick a projection by name: coyo's B0-B6 models name the image tower's Dense `dense` and the text one
    # `dense_1`, so `dense/kernel` is not always the text projection.
    dense = sorted(n for n in shapes if _DENSE_KERNEL.match(n))
    text_dense = [n for n in dense if shapes[n][0] == text.hidden_size]
    if len(dense) > 1:
        listing = ", ".join(f"{n} {tuple(shapes[n])}" for n in dense)
        image = [n for n in dense if n not in text_dense] or dense
        raise ConversionError(
            f"the checkpoint has {len(dense)} Dense projections ({listing}): the image tower has its own Dense "
            f"projection ({', '.join(image)} takes the image features, {vision.hidden_dim} wide), as coyo builds for "
            "EfficientNet B0-B6; transformers' AlignModel has no image projection, so it cannot hold this checkpoint "
            "(only coyo's B7 layout, one text projection, converts)"
        )
    if len(text_dense) != 1:
        found = ", ".join(f"{n} {tuple(shapes[n])}" for n in dense) or "none"
        raise ConversionError(f"expected one text projection Dense `dense/kernel` with input size {text.hidden_size} "
                              f"(the BERT hidden size), found: {found}; the checkpoint is incomplete or not ALIGN")
    projection = text_dense[0].rsplit("/", 1)[0]

    temperature = [n for n in TEMPERATURE_NAMES if n in shapes and len(shapes[n]) == 0]
    if not temperature:
        raise ConversionError(f"no scalar temperature variable found (looked for {', '.join(TEMPERATURE_NAMES)}); "
                              "the checkpoint is incomplete or not an ALIGN checkpoint")
    return AlignSpec(
        vision=vision,
        text=text,
        embed_dim=int(shapes[f"{projection}/kernel"][1]),
        temperature_name=temperature[0],
        projection_name=projection,
    )
