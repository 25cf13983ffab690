"""One row of the layer table: a paired (or unpaired) layer, its divergence figures, its status and its hints.

`compare.layer_rows` builds them; the sensitivity pass adds the reference's own figures, the diagnosis the hints
(and may call a sub-tolerance activation fault diverged); the report writes `record()`, the columns of
layers.csv."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from tracer.engine.hint import Hint

NAN = float("nan")


class Status(enum.StrEnum):
    OK = "ok"
    AMPLIFIED = "amplified"  # over the accumulated tolerance, its own computation within the local one
    DIVERGED = "diverged"  # its own computation is off (or one side computed no number)
    UNPAIRED = "unpaired"  # a layer of one model only


@dataclass(eq=False)
class LayerRow:
    tower: str
    order: int  # within its tower, in execution order
    block: str = ""
    keras_layer: str = ""
    keras_class: str = ""
    hf_module: str = ""
    hf_class: str = ""
    keras_shape: str = ""  # "1x56x56x24"
    hf_shape: str = ""
    max_abs: float = NAN  # accumulated: carried from the input
    mean_abs: float = NAN
    rel_l2: float = NAN
    cosine: float = NAN
    local_max_abs: float = NAN  # local: the HF module re-run on the Keras layer's own input
    local_rel_l2: float = NAN
    growth: float = NAN  # rel_l2 over the previous row's
    reference_sensitivity: float = NAN  # the Keras model's own rel_l2 under round-off of its input (`sensitivity`)
    reference_sensitivity_max_abs: float = NAN
    status: Status = Status.UNPAIRED
    weights: str = ""  # "variable -> parameter; ..."
    mapping_source: str = ""
    hints: list[Hint] = field(default_factory=list)
    pair: object = field(default=None, repr=False)  # the `pairing.Pair` it was measured on

    @property
    def hint(self) -> str:
        return " | ".join(map(str, self.hints))

    @property
    def diverged(self) -> bool:
        return self.status == Status.DIVERGED

    @property
    def hint_classes(self) -> list[str]:
        return [h.cls for h in self.hints]

    def record(self) -> dict:
        """Its layers.csv row (the status as plain text)."""
        return {**{c: getattr(self, c) for c in COLUMNS}, "status": str(self.status)}


# layers.csv's columns, in field order: every field but the pair, the hints as their text.
COLUMNS = ["hint" if f.name == "hints" else f.name for f in fields(LayerRow) if f.name != "pair"]
