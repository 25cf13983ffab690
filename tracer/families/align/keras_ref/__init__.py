"""tf_keras (Keras 2) rebuild of coyo-align's original ALIGN model: the reference a conversion is checked against.

Importing this package imports TensorFlow; nothing else in `tracer` needs to.
"""

from tracer.families.align.keras_ref.align import (
    ALIGN,
    assign_weights,
    build_reference,
    create_text_encoder,
    create_vision_encoder,
    embed,
    metric_variables,
    model_weights,
    reference_variables,
)
from tracer.families.align.keras_ref.bert import TFBertModel
from tracer.families.align.keras_ref.eager import Container, EagerReference
from tracer.families.align.keras_ref.efficientnet import build_efficientnet

__all__ = [
    "ALIGN",
    "Container",
    "EagerReference",
    "TFBertModel",
    "assign_weights",
    "build_efficientnet",
    "build_reference",
    "create_text_encoder",
    "create_vision_encoder",
    "embed",
    "metric_variables",
    "model_weights",
    "reference_variables",
]
