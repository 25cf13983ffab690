"""Model families: one adapter each (reader quirks, spec, reference model, rules, HF config, preprocessing)."""
