"""tracer: convert TF/Keras checkpoints to HuggingFace PyTorch models and prove layer by layer that they match."""

import os

# TensorFlow reads these at import, and any tracer module may import it, so they are set here, first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # its C++ start-up chatter hides our progress
# The project's only Keras is Keras 2 (tf_keras): without this TensorFlow also imports Keras 3, and scikit-learn
# through it, at start-up (about 2 s of every traced run).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def trace(keras_model, torch_model, inputs, **options):
    """Trace a tf_keras model against a torch module layer by layer: see `tracer.api.trace`."""
    from tracer.api import trace as _trace

    return _trace(keras_model, torch_model, inputs, **options)


__all__ = ["trace"]
