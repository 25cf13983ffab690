"""The BERT rename table: the Keras reference's names (transformers 4 TF) -> transformers 5 parameters.

Rules are (pattern, target, transform) as in `tracer.engine.mapping`; patterns full-match the reference's names
(`{model scope}/bert/...`, any scope: it depends on the class), targets name the chosen class's parameters (`bert.`
prefixed except in `BertModel`). The MLM decoder has no rule: its weight is the word-embedding table and its bias is
`cls.predictions.bias`, tied by transformers (see `hf.TiedStateWriter`, which checks the tie).
"""

from __future__ import annotations

from tracer.engine.mapping import Rule
from tracer.families.bert.spec import BertSpec
from tracer.families.naming import BERT_LAYER

SCOPE = r"[^/]+/"
LN = r"LayerNorm/(?P<param>gamma|beta)"
ENCODER_LAYER = f"bert/encoder/{BERT_LAYER}/"

# (part, pattern after the scope, target after the class's prefix, transform). `{P}` is the base model's prefix.
TABLE = (
    ("base", r"bert/embeddings/word_embeddings/weight", "{P}embeddings.word_embeddings.weight", "identity"),
    ("base", r"bert/embeddings/(?P<kind>position|token_type)_embeddings/embeddings",
     "{P}embeddings.{kind}_embeddings.weight", "identity"),
    ("base", r"bert/embeddings/" + LN, "{P}embeddings.LayerNorm.{param}", "identity"),
    ("base", ENCODER_LAYER + r"attention/self/(?P<qkv>query|key|value)/kernel",
     "{P}encoder.layer.{layer}.attention.self.{qkv}.weight", "dense"),
    ("base", ENCODER_LAYER + r"attention/self/(?P<qkv>query|key|value)/bias",
     "{P}encoder.layer.{layer}.attention.self.{qkv}.bias", "identity"),
    *(
        row
        for keras, torch in (("attention/output", "attention.output"), ("intermediate", "intermediate"),
                             ("output", "output"))
        for row in (
            ("base", rf"{ENCODER_LAYER}{keras}/dense/kernel",
             f"{{P}}encoder.layer.{{layer}}.{torch}.dense.weight", "dense"),
            ("base", rf"{ENCODER_LAYER}{keras}/dense/bias",
             f"{{P}}encoder.layer.{{layer}}.{torch}.dense.bias", "identity"),
        )
    ),
    ("base", ENCODER_LAYER + r"attention/output/" + LN,
     "{P}encoder.layer.{layer}.attention.output.LayerNorm.{param}", "identity"),
    ("base", ENCODER_LAYER + r"output/" + LN,
     "{P}encoder.layer.{layer}.output.LayerNorm.{param}", "identity"),
    ("pooler", r"bert/pooler/dense/kernel", "{P}pooler.dense.weight", "dense"),
    ("pooler", r"bert/pooler/dense/bias", "{P}pooler.dense.bias", "identity"),
    ("mlm", r"mlm___cls/predictions/transform/dense/kernel", "cls.predictions.transform.dense.weight", "dense"),
    ("mlm", r"mlm___cls/predictions/transform/dense/bias", "cls.predictions.transform.dense.bias", "identity"),
    ("mlm", r"mlm___cls/predictions/transform/" + LN, "cls.predictions.transform.LayerNorm.{param}", "identity"),
    ("mlm", r"mlm___cls/predictions/bias", "cls.predictions.bias", "identity"),
    ("nsp", r"nsp___cls/seq_relationship/kernel", "cls.seq_relationship.weight", "dense"),
    ("nsp", r"nsp___cls/seq_relationship/bias", "cls.seq_relationship.bias", "identity"),
    ("classifier", r"classifier/kernel", "classifier.weight", "dense"),
    ("classifier", r"classifier/bias", "classifier.bias", "identity"),
    ("qa", r"qa_outputs/kernel", "qa_outputs.weight", "dense"),
    ("qa", r"qa_outputs/bias", "qa_outputs.bias", "identity"),
)


def bert_rules(spec: BertSpec) -> tuple[Rule, ...]:
    """The rules for the spec's class and the parts it uses, over the reference's names and layout (a kernel TF1
    stores (out, in), `output_weights`, is read transposed: `BertFamily.stored_transposed`)."""
    prefix = "" if spec.model_class == "BertModel" else "bert."
    used = set(spec.used_parts)
    rules = []
    for part, pattern, target, transform in TABLE:
        if part not in used:
            continue
        rules.append(Rule(SCOPE + pattern, target.replace("{P}", prefix), transform))
    return tuple(rules)
