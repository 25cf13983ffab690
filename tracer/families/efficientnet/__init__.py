"""tf_keras.applications EfficientNetB0-B7 -> transformers EfficientNet(ForImageClassification|Model)."""
