"""The ALIGN rename table: coyo-align (tf_keras) variable names -> transformers `AlignModel` parameters.

Each rule is (pattern, target, transform). Patterns are full-match regexes over the variable name (without
`:0`); targets are templates whose fields are the pattern's named groups, translated by `mapping.GROUP_NAMES`
(`param`: Keras -> torch parameter names; `block`: coyo's `3a` -> HF's running block index).
"""

from __future__ import annotations

from tracer.engine.mapping import Rule
from tracer.families.naming import BERT_LAYER, EFFICIENTNET_BLOCK

V = "vision_model"
T = "text_model"
BLOCK = EFFICIENTNET_BLOCK + "_"
BN = r"(?P<param>gamma|beta|moving_mean|moving_variance)"
LN = r"LayerNorm/(?P<param>gamma|beta)"
BERT = r"(?:[^/]+/)?bert/"
LAYER = BERT + f"encoder/{BERT_LAYER}/"
HF_BLOCK = f"{V}.encoder.blocks.{{block}}."
HF_LAYER = f"{T}.encoder.layer.{{layer}}."


def _conv(pattern: str, target: str) -> tuple[Rule, ...]:
    return (Rule(pattern + "/kernel", target + ".weight", "conv"), Rule(pattern + "/bias", target + ".bias", "identity"))


def _dense(pattern: str, target: str) -> tuple[Rule, ...]:
    return (Rule(pattern + "/kernel", target + ".weight", "dense"), Rule(pattern + "/bias", target + ".bias", "identity"))


ALIGN_RULES: tuple[Rule, ...] = (
    # Image tower: stem.
    Rule("stem_conv/kernel", f"{V}.embeddings.convolution.weight", "conv"),
    Rule(f"stem_bn/{BN}", f"{V}.embeddings.batchnorm.{{param}}", "bn_squeeze"),
    # Image tower: blocks.
    Rule(BLOCK + "expand_conv/kernel", HF_BLOCK + "expansion.expand_conv.weight", "conv"),
    Rule(BLOCK + f"expand_bn/{BN}", HF_BLOCK + "expansion.expand_bn.{param}", "bn_squeeze"),
    Rule(BLOCK + "dwconv/depthwise_kernel", HF_BLOCK + "depthwise_conv.depthwise_conv.weight", "depthwise"),
    Rule(BLOCK + f"bn/{BN}", HF_BLOCK + "depthwise_conv.depthwise_norm.{param}", "bn_squeeze"),
    *_conv(BLOCK + "se_reduce", HF_BLOCK + "squeeze_excite.reduce"),
    *_conv(BLOCK + "se_expand", HF_BLOCK + "squeeze_excite.expand"),
    Rule(BLOCK + "project_conv/kernel", HF_BLOCK + "projection.project_conv.weight", "conv"),
    Rule(BLOCK + f"project_bn/{BN}", HF_BLOCK + "projection.project_bn.{param}", "bn_squeeze"),
    # Text tower: embeddings.
    Rule(BERT + "embeddings/word_embeddings/weight", f"{T}.embeddings.word_embeddings.weight", "identity"),
    Rule(BERT + "embeddings/position_embeddings/embeddings", f"{T}.embeddings.position_embeddings.weight", "identity"),
    Rule(BERT + "embeddings/token_type_embeddings/embeddings", f"{T}.embeddings.token_type_embeddings.weight", "identity"),
    Rule(BERT + f"embeddings/{LN}", f"{T}.embeddings.LayerNorm.{{param}}", "identity"),
    # Text tower: every encoder layer.
    *_dense(LAYER + "attention/self/(?P<qkv>query|key|value)", HF_LAYER + "attention.self.{qkv}"),
    *_dense(LAYER + "attention/output/dense", HF_LAYER + "attention.output.dense"),
    Rule(LAYER + f"attention/output/{LN}", HF_LAYER + "attention.output.LayerNorm.{param}", "identity"),
    *_dense(LAYER + "intermediate/dense", HF_LAYER + "intermediate.dense"),
    *_dense(LAYER + "output/dense", HF_LAYER + "output.dense"),
    Rule(LAYER + f"output/{LN}", HF_LAYER + "output.LayerNorm.{param}", "identity"),
    # Text tower: pooler, then the projection on the [CLS] state.
    *_dense(BERT + "pooler/dense", f"{T}.pooler.dense"),
    *_dense(r"dense(?:_\d+)?", "text_projection"),
    # coyo's temperature is an unnamed tf.Variable, so its name is `Variable`.
    Rule("Variable|temperature", "temperature", "scalar"),
)
