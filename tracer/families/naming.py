"""The block-index names that the Keras models of the families write, defined once: the specs count blocks with
them, the rename tables translate them, ALIGN's report rows are grouped by them."""

# keras.applications' and coyo's EfficientNet block: `block3a_...` is stage 3's first repeat; `block` is the whole
# "3a" (the rename tables' field, translated to HF's running index).
EFFICIENTNET_BLOCK = r"block(?P<block>(?P<stage>\d+)(?P<letter>[a-z]))"
# transformers' TF BERT encoder layer, `.../encoder/layer_._3/...`.
BERT_LAYER = r"layer_\._(?P<layer>\d+)"
# Their transformers (PyTorch) counterparts: `...encoder.blocks.12...`, `...encoder.layer.3...`.
HF_EFFICIENTNET_BLOCK = r"encoder\.blocks\.(?P<index>\d+)"
HF_BERT_LAYER = r"encoder\.layer\.(?P<layer>\d+)"
