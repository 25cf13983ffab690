"""The EfficientNet rename table: keras.applications variable names -> transformers EfficientNet parameters.

Rules are (pattern, target, transform) over the Keras variable name without `:0` (see `tracer.engine.mapping`);
`{block}` is Keras' `2b` translated to HF's running block number (`EfficientNetSpec.block_index`), `{param}` a
BatchNorm/Dense leaf translated to torch's name. The Normalization layer's mean/variance/count are no model weights:
they become the image processor (`PROCESSOR_WEIGHTS`, see processor.py).
"""

from __future__ import annotations

from tracer.engine.mapping import Rule
from tracer.families.naming import EFFICIENTNET_BLOCK
from tracer.families.efficientnet.spec import NORMALIZATION

BLOCK = EFFICIENTNET_BLOCK + "_"
BN = r"(?P<param>gamma|beta|moving_mean|moving_variance)"
HF_BLOCK = "encoder.blocks.{block}."
# The Normalization layer's variables: the processor's image_mean / image_std (count is only its adapt() state).
PROCESSOR_WEIGHTS = NORMALIZATION


def _conv(pattern: str, target: str) -> tuple[Rule, ...]:
    return (Rule(pattern + "/kernel", target + ".weight", "conv"), Rule(pattern + "/bias", target + ".bias", "identity"))


def _base(prefix: str) -> tuple[Rule, ...]:
    """The rules for `EfficientNetModel`'s weights, whose names start with `prefix`."""
    p = prefix
    return (
        Rule("stem_conv/kernel", f"{p}embeddings.convolution.weight", "conv"),
        Rule(f"stem_bn/{BN}", f"{p}embeddings.batchnorm.{{param}}", "identity"),
        Rule(BLOCK + "expand_conv/kernel", p + HF_BLOCK + "expansion.expand_conv.weight", "conv"),
        Rule(BLOCK + f"expand_bn/{BN}", p + HF_BLOCK + "expansion.expand_bn.{param}", "identity"),
        Rule(BLOCK + "dwconv/depthwise_kernel", p + HF_BLOCK + "depthwise_conv.depthwise_conv.weight", "depthwise"),
        Rule(BLOCK + f"bn/{BN}", p + HF_BLOCK + "depthwise_conv.depthwise_norm.{param}", "identity"),
        *_conv(BLOCK + "se_reduce", p + HF_BLOCK + "squeeze_excite.reduce"),
        *_conv(BLOCK + "se_expand", p + HF_BLOCK + "squeeze_excite.expand"),
        Rule(BLOCK + "project_conv/kernel", p + HF_BLOCK + "projection.project_conv.weight", "conv"),
        Rule(BLOCK + f"project_bn/{BN}", p + HF_BLOCK + "projection.project_bn.{param}", "identity"),
        Rule("top_conv/kernel", f"{p}encoder.top_conv.weight", "conv"),
        Rule(f"top_bn/{BN}", f"{p}encoder.top_bn.{{param}}", "identity"),
    )


# EfficientNetModel (a checkpoint without `predictions`): the parameters have no prefix.
BACKBONE_RULES: tuple[Rule, ...] = _base("")
# EfficientNetForImageClassification: the backbone under `efficientnet.`, the Dense head as `classifier`.
CLASSIFIER_RULES: tuple[Rule, ...] = _base("efficientnet.") + (
    Rule("predictions/kernel", "classifier.weight", "dense"),
    Rule("predictions/bias", "classifier.bias", "identity"),
)


def efficientnet_rules(include_top: bool) -> tuple[Rule, ...]:
    return CLASSIFIER_RULES if include_top else BACKBONE_RULES
