"""The BERT family: google-research TF1 checkpoints and transformers 4 `tf_model.h5` to transformers 5 BERT.

Importing the package imports neither TensorFlow nor torch; `keras_ref` and `hf` do.
"""

from tracer.families.bert.family import BertFamily
from tracer.families.bert.spec import BertSpec, derive_spec

__all__ = ["BertFamily", "BertSpec", "derive_spec"]
