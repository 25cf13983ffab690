"""What a model family gives the converter: the adapter interface.

The CLI opens a checkpoint, asks each family whether it is one of theirs (`detect`), and drives the one that is
(or the one `--model_type` names) through these steps; the engine (record, pair, infer, transfer, compare,
diagnose, report) never names a model. A family costs one folder under `tracer/families/` with a `Family`
subclass registered in `tracer.families.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Example:
    """The inputs both models are run on, as each side takes them, and what the original computed on them.

    `keras`: what the Keras model is called with (an array, a list or a dict of arrays). `torch`: the keyword
    arguments of the HF model's forward (tensors). `reference`: outputs of the original model on these inputs
    (from an `--inputs` file), by output name; empty when none were given. `source`: where they came from, for
    messages."""

    keras: Any
    torch: dict
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""


@dataclass
class KerasReference:
    """The original model rebuilt in tf_keras with the checkpoint's weights, strictly: `consumed` names every
    checkpoint weight it took (each exactly once); the converter fails on any checkpoint weight left out."""

    model: Any  # a tf_keras Model (`Family.plain_reference` may give another callable)
    consumed: list[str]


class Family:
    """One model family's adapter. Subclasses set `name` and implement the methods; defaults are noted."""

    name: str = ""
    # Output name -> absolute tolerance on it (what `outputs` returns is compared key by key).
    tolerances: dict[str, float] = {}
    # Whether `--float64` can compare this family at float64 round-off: both sides' inputs must be the same float64
    # numbers (a processor that rounds them to float32 first cannot).
    float64: bool = True

    def detect(self, names: dict[str, tuple[int, ...]], extra: dict[str, Any]) -> bool:
        """Whether a checkpoint with these weights (name -> shape) is this family's. `extra`: files found beside
        it, already parsed (`config.json`, `bert_config.json`: dicts), by file name."""
        raise NotImplementedError

    def derive(self, checkpoint, options) -> Any:
        """The family's spec (sizes, variant, heads) from the checkpoint's names and shapes (and its config files):
        nothing hard-coded; a contradiction is a `ConversionError` naming it."""
        raise NotImplementedError

    def weight_names(self, checkpoint, spec) -> dict[str, str]:
        """Checkpoint name -> the name the Keras reference gives that weight (reader quirks: TF1 `bert/...` names
        vs TFBertModel's). Default: the same names."""
        return {name: name for name in checkpoint.shapes()}

    def stored_transposed(self, spec) -> set[str]:
        """Reference names whose checkpoint value is the transpose of the Keras variable (TF1 BERT's
        `output_weights`): the converter reads them transposed, so rules and inference see Keras' layout."""
        return set()

    def build_hf(self, spec, options) -> Any:
        """The transformers model for `spec`, on the meta device (no memory, no initialisation), in eval mode; its
        config carries what saving needs (`id2label`, ...)."""
        raise NotImplementedError

    def rules(self, spec) -> tuple:
        """The rename table as data (`mapping.Rule`s over the Keras reference's names)."""
        raise NotImplementedError

    def accounted(self, spec) -> dict[str, str]:
        """Checkpoint weights that are no model weights, and what became of them (EfficientNet's Normalization
        statistics: the image processor). Default: none."""
        return {}

    def hf_writer(self, model):
        """What writes the HF model's tensors strictly (`engine.state.StateWriter`; BERT's ties its MLM decoder)."""
        from tracer.engine.state import StateWriter

        return StateWriter(model)

    def output_filter(self, example: Example):
        """A function applied to both sides' outputs (`[(name, array)]`) before they are compared (BERT: padded
        positions zeroed), or None."""
        return None

    def block_index(self, spec) -> dict[str, int]:
        """Values for a rule's `{block}` group (ALIGN: coyo's `3a` -> HF's running index). Default: none."""
        return {}

    def processor(self, spec, options) -> Any:
        """What is saved beside the model to prepare inputs (image processor, tokenizer, or a processor)."""
        raise NotImplementedError

    def example(self, spec, processor, options) -> Example:
        """The inputs to compare on: `--inputs` arrays, `--image`/`--text`, or the family's defaults."""
        raise NotImplementedError

    def keras_reference(self, spec, read: Callable[[str], np.ndarray]) -> KerasReference:
        """The original model in tf_keras, its weights read by (Keras-side) name, in Keras' layout, through `read`."""
        raise NotImplementedError

    def plain_reference(self, spec, read: Callable[[str], np.ndarray]) -> KerasReference:
        """What a plain (untraced) conversion compares the HF model against: by default the tf_keras reference; a
        family may compute the same outputs without TensorFlow (BERT: `bert.np_ref`). `keras_outputs` runs it."""
        return self.keras_reference(spec, read)

    def keras_outputs(self, reference: KerasReference, example: Example) -> dict[str, np.ndarray]:
        """The Keras model's outputs on `example`, by output name (those of `tolerances`)."""
        raise NotImplementedError

    def hf_outputs(self, model, example: Example) -> dict[str, np.ndarray]:
        """The HF model's outputs on `example`, by the same names as `keras_outputs`."""
        raise NotImplementedError

    def describe(self, spec) -> str:
        """One line for the log: what was derived."""
        return str(spec)
