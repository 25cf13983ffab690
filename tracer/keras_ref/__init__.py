"""tf_keras (Keras 2) rebuild of coyo-align's original ALIGN model: the reference a conversion is checked against.

Importing this package imports TensorFlow; nothing else in `tracer` needs to.
"""

from .align import (
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
from .bert import TFBertModel
from .eager import Container, EagerReference
from .efficientnet import build_efficientnet

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
