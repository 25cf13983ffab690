"""Checkpoint readers: TF bundles (object-based and name-based) and Keras/transformers HDF5, without TensorFlow."""
