"""coyo-align's text tower is transformers 4.x `TFBertModel`: the BERT family's tf_keras reference, re-exported.

The implementation lives in `tracer.families.bert.keras_ref` (it takes any spec with BERT's sizes, ALIGN's
`TextSpec` included); this module keeps the names ALIGN's code and tests import from here.
"""

from tracer.families.bert.keras_ref import (  # noqa: F401
    ATTENTION_DROPOUT,
    HIDDEN_DROPOUT,
    INITIALIZER_RANGE,
    MASK_VALUE,
    TFBertAttention,
    TFBertEmbeddings,
    TFBertEncoder,
    TFBertIntermediate,
    TFBertLayer,
    TFBertMainLayer,
    TFBertModel,
    TFBertOutput,
    TFBertPooler,
    TFBertSelfAttention,
    TFBertSelfOutput,
    _INPUT_KEYS,
    _ResidualOutput,
    _build_child,
    _dense,
    _init,
    gelu,
)
