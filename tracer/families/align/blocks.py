"""coyo's block names for ALIGN's report rows: `block3a` (HF `blocks.k`), `stem`, `pooling`, `layer_._i`,
`embeddings`, `pooler`, `projection`, or the tower itself for the containers around them."""

from __future__ import annotations

import re
from typing import Callable

from tracer.families.naming import BERT_LAYER, EFFICIENTNET_BLOCK, HF_BERT_LAYER, HF_EFFICIENTNET_BLOCK

# A Keras layer inside a block (`block3a_expand_conv`) or the block itself (`.../block3a`).
_VISION_BLOCK = re.compile(f"{EFFICIENTNET_BLOCK}(?:_|$)")
_TORCH_BLOCK = re.compile(HF_EFFICIENTNET_BLOCK)
_KERAS_LAYER = re.compile(BERT_LAYER)
_TORCH_LAYER = re.compile(HF_BERT_LAYER)


def block_of(tower: str, keras_path: str, torch_path: str, block_names: list[str]) -> str:
    """The block of a row of `tower` whose layers have these paths; `block_names`: the vision blocks by HF index."""
    if tower == "vision":
        if m := _VISION_BLOCK.search(keras_path):
            return "block" + m.group("block")
        if m := _TORCH_BLOCK.search(torch_path):
            return block_names[int(m.group("index"))]
        if "stem" in keras_path or "vision_model.embeddings" in torch_path:
            return "stem"
        if "pool" in keras_path or torch_path.endswith("pooler"):
            return "pooling"
        return "vision"
    if m := _KERAS_LAYER.search(keras_path) or _TORCH_LAYER.search(torch_path):
        return f"layer_._{m.group('layer')}"
    for name in ("embeddings", "pooler"):
        if name in keras_path or name in torch_path:
            return name
    if torch_path == "text_projection" or keras_path.endswith("/dense"):
        return "projection"
    return "text"


def align_blocks(block_names: list[str]) -> Callable:
    """`block_of(pair)` for `compare.layer_rows`, with the vision tower's block names."""
    return lambda pair: block_of(pair.tower, pair.keras.path if pair.keras else "",
                                 pair.torch.path if pair.torch else "", block_names)
