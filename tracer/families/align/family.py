"""ALIGN as a family the CLI can detect. Its conversion keeps its own tuned path (`tracer.pipeline.convert`: the
Keras towers in a worker process, tower by tower), built on the same engine."""

from __future__ import annotations

from typing import Any

from tracer.families.align.spec import _BERT_LAYER, _BLOCK, TEMPERATURE_NAMES
from tracer.families.base import Family


class AlignFamily(Family):
    name = "align"

    def detect(self, names: dict[str, tuple[int, ...]], extra: dict[str, Any]) -> bool:
        """An EfficientNet's blocks, a BERT's layers and a scalar temperature, in one checkpoint."""
        return (any(_BLOCK.match(n) for n in names) and any(_BERT_LAYER.match(n) for n in names)
                and any(n in names and len(names[n]) == 0 for n in TEMPERATURE_NAMES))
