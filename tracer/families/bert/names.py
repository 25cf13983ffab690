"""The name quirks of BERT checkpoints: every reader's names brought to one scope-free form, the Keras reference's.

The Keras reference names its variables like transformers 4's TF classes (`tf_bert_model/bert/encoder/layer_._0/
attention/self/query/kernel`). Stripped of the model's scope (the first component, which depends on the class) that
is the *canonical* name (`bert/encoder/layer_._0/...`, `mlm___cls/predictions/bias`, `classifier/kernel`), and the
reference's name is `{its scope}/{canonical}`. The readers differ:

* transformers `tf_model.h5` and TF2 `save_weights` of a `TFBert...` model: `{scope}/{canonical}` already; one shard
  of a sharded h5 has the canonical name itself;
* google-research TF1 checkpoints: `bert/embeddings/word_embeddings` (no `/weight`), `layer_0` (not `layer_._0`),
  `cls/predictions/...` for the MLM head with `output_bias` for its bias, `cls/seq_relationship/output_weights`,
  run_classifier's `output_weights` and run_squad's `cls/squad/output_weights`: these three are stored (out, in),
  as torch stores a Linear, not as a Keras kernel (in, out).
"""

from __future__ import annotations

import re

# The first component of a canonical name: the top-level layers of transformers 4's TF BERT classes.
TOP_LAYERS = ("bert", "mlm___cls", "nsp___cls", "classifier", "qa_outputs")

# TF1 name -> canonical name, and whether the tensor is stored (out, in).
_TF1_RULES: tuple[tuple[re.Pattern, str, bool], ...] = tuple(
    (re.compile(pattern), target, transposed)
    for pattern, target, transposed in (
        (r"bert/embeddings/word_embeddings", "bert/embeddings/word_embeddings/weight", False),
        (r"bert/embeddings/(position|token_type)_embeddings", r"bert/embeddings/\1_embeddings/embeddings", False),
        (r"bert/embeddings/LayerNorm/(gamma|beta)", r"bert/embeddings/LayerNorm/\1", False),
        (r"bert/encoder/layer_(\d+)/(.+)", r"bert/encoder/layer_._\1/\2", False),
        (r"bert/pooler/dense/(kernel|bias)", r"bert/pooler/dense/\1", False),
        (r"cls/predictions/transform/(.+)", r"mlm___cls/predictions/transform/\1", False),
        (r"cls/predictions/output_bias", "mlm___cls/predictions/bias", False),
        (r"cls/seq_relationship/output_weights", "nsp___cls/seq_relationship/kernel", True),
        (r"cls/seq_relationship/output_bias", "nsp___cls/seq_relationship/bias", False),
        (r"output_weights", "classifier/kernel", True),  # google-research run_classifier.py
        (r"output_bias", "classifier/bias", False),
        (r"cls/squad/output_weights", "qa_outputs/kernel", True),  # run_squad.py
        (r"cls/squad/output_bias", "qa_outputs/bias", False),
    )
)


def canonical(name: str, format: str) -> tuple[str, bool] | None:
    """(canonical name, stored transposed) of a checkpoint weight, or None when it is no BERT weight."""
    if format == "tf1":
        for pattern, target, transposed in _TF1_RULES:
            if pattern.fullmatch(name):
                return pattern.sub(target, name), transposed
        return None
    parts = name.split("/")
    if parts[0] in TOP_LAYERS:  # a shard of a sharded tf_model.h5: no model scope
        return name, False
    if len(parts) > 2 and parts[1] in TOP_LAYERS:
        return "/".join(parts[1:]), False
    return None


def to_tf1(canonical_name: str) -> tuple[str, bool]:
    """The inverse of `canonical` for TF1 (the writers use it): (TF1 name, stored transposed)."""
    replacements = (
        (r"bert/embeddings/word_embeddings/weight", "bert/embeddings/word_embeddings", False),
        (r"bert/embeddings/(position|token_type)_embeddings/embeddings", r"bert/embeddings/\1_embeddings", False),
        (r"bert/encoder/layer_\._(\d+)/(.+)", r"bert/encoder/layer_\1/\2", False),
        (r"mlm___cls/predictions/transform/(.+)", r"cls/predictions/transform/\1", False),
        (r"mlm___cls/predictions/bias", "cls/predictions/output_bias", False),
        (r"nsp___cls/seq_relationship/kernel", "cls/seq_relationship/output_weights", True),
        (r"nsp___cls/seq_relationship/bias", "cls/seq_relationship/output_bias", False),
        (r"classifier/kernel", "output_weights", True),
        (r"classifier/bias", "output_bias", False),
        (r"qa_outputs/kernel", "cls/squad/output_weights", True),
        (r"qa_outputs/bias", "cls/squad/output_bias", False),
    )
    for pattern, target, transposed in replacements:
        if re.fullmatch(pattern, canonical_name):
            return re.sub(pattern, target, canonical_name), transposed
    return canonical_name, False


def part_of(canonical_name: str) -> str:
    """Which part of a BERT a canonical name belongs to: base, pooler, mlm, nsp, classifier, qa."""
    if canonical_name.startswith("bert/pooler/"):
        return "pooler"
    return {"bert": "base", "mlm___cls": "mlm", "nsp___cls": "nsp", "classifier": "classifier",
            "qa_outputs": "qa"}[canonical_name.split("/", 1)[0]]
