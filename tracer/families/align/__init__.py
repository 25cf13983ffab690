"""coyo-align ALIGN (EfficientNet + TFBertModel) -> transformers AlignModel."""
