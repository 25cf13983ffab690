"""Recording ALIGN's towers: the eager reference's tower calls and `AlignModel`'s tower forwards, with the
engine's recorders. Each tower is a part of its own; the Keras records come in post-order, each EfficientNet block's
container right after the block's last layer, the EfficientNet container last in the vision tower; in the text
tower every BERT sub-layer, the TFBertModel, then the projection Dense."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from tracer.engine.record import Record, to_numpy
from tracer.engine.record.keras import Recorder
from tracer.families.align.towers import TOWERS, tower_of

if TYPE_CHECKING:  # the Keras worker records with this module and must not import torch (1.7 s on its start)
    import torch


def record_keras(model, inputs, keep_outputs: bool = True, sink: Callable[[Record], None] | None = None,
                 towers: Iterable[str] = TOWERS) -> list[Record]:
    """Records of the reference's towers (vision first), each tower in execution order, orders final.

    `model` is a `keras_ref.EagerReference` (a tower not built yet is built by this run) or a functional `ALIGN`
    from `build_reference` (copied into an eager one first). `inputs` is a `tracer.families.align.inputs.Inputs`.
    With `sink`, each record is passed to it as soon as it is made, fully built; the recorder never touches it again
    (the sink may drop its arrays). `keep_outputs=False` keeps shapes only (no arrays at all).
    """
    from tracer.families.align.keras_ref.eager import EagerReference, check_tower

    reference = model if isinstance(model, EagerReference) else EagerReference.from_model(model)
    records: list[Record] = []
    for tower in map(check_tower, towers):
        recorder = Recorder(tower, keep_outputs, sink)
        if tower == "vision":
            reference.image_features(inputs.pixel_values_nhwc, hook=recorder)
        else:
            reference.text_features(**inputs.numpy_text(np.int32), hook=recorder)
        records.extend(recorder.records)
    return records


def record_torch(model: torch.nn.Module, inputs, keep_outputs: bool = True,
                 sink: Callable[[Record], None] | None = None, towers=TOWERS) -> tuple[list[Record], dict]:
    """One forward per tower, as `AlignModel.forward` computes them: records for the towers, and the towers'
    features (`image_features`, `text_features`, numpy) so no second forward is needed."""
    from tracer.engine.record.torch import recording
    from tracer.families.align.hf import tower_features

    with recording(model, keep_outputs, sink, part_of=tower_of) as records:
        features = tower_features(model, inputs, towers)
    return records, {k: to_numpy(v) for k, v in features.items()}
