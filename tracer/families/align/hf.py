"""The transformers side: `AlignConfig` from the spec, a model built without initialisation, strict state writing."""

from __future__ import annotations

import logging

import torch
from transformers import AlignConfig, AlignModel, AlignTextConfig, AlignVisionConfig

from tracer.engine.state import (StateWriter, build_on_meta, expected_state, hf_shapes, materialize_uninitialized,  # noqa: F401
                                 rebuild_buffers, write_state)
from tracer.errors import BadInputError
from tracer.families.align.towers import FEATURES, TOWERS
from tracer.families.align.spec import AlignSpec
from tracer.families.bert.hf import encoder_fields

logger = logging.getLogger(__name__)


def align_config(spec: AlignSpec, temperature: float = 1.0) -> AlignConfig:
    v, t = spec.vision, spec.text
    vision = AlignVisionConfig(
        width_coefficient=v.width_coefficient,
        depth_coefficient=v.depth_coefficient,
        image_size=v.image_size,
        hidden_dim=v.hidden_dim,  # coyo has no top conv: the pooled features are the last block's channels
        depthwise_padding=[],  # coyo's EfficientNet is built for an unknown input size: every stride-2 pad is asymmetric
        batch_norm_eps=v.batch_norm_eps,
        hidden_act="swish",
        pooling_type="mean",
    )
    text = AlignTextConfig(**encoder_fields(t), hidden_act="gelu")
    return AlignConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=spec.embed_dim,
        temperature_init_value=temperature,
    )


def override_config(config: AlignConfig, overrides: list[str]) -> None:
    """Apply `section.key=value` overrides (e.g. `vision_config.batch_norm_eps=1e-5`) to test a hypothesis
    about a port: the value is parsed as JSON when it can be, else kept as a string."""
    import json

    for item in overrides:
        key, sep, raw = item.partition("=")
        section, _, name = key.rpartition(".")
        target = getattr(config, section) if section else config
        if not sep or not name or target is None or not hasattr(target, name):
            raise BadInputError(f"--hf_config {item!r}: expected SECTION.KEY=VALUE with an existing key, e.g. "
                                "vision_config.batch_norm_eps=1e-5")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        logger.warning("overriding the derived config: %s = %r (was %r)", key, value, getattr(target, name))
        setattr(target, name, value)


def build_empty(config: AlignConfig) -> AlignModel:
    """The model on the meta device: no memory, no random initialisation that would be overwritten anyway."""
    return build_on_meta(AlignModel, config)


def tower_features(model: AlignModel, inputs, towers=TOWERS) -> dict[str, torch.Tensor]:
    """One forward per tower, as `AlignModel.forward` computes them (image and text may differ in number)."""
    out = {}
    with torch.inference_mode():
        if "vision" in towers:
            out[FEATURES["vision"]] = model.get_image_features(pixel_values=inputs.torch_pixel_values()).pooler_output
        if "text" in towers:
            out[FEATURES["text"]] = model.get_text_features(**inputs.torch_text()).pooler_output
    return out


def tower_modules(model: AlignModel, tower: str) -> list[torch.nn.Module]:
    """The modules that hold a tower's weights (the text projection belongs to the text tower)."""
    return [model.vision_model] if tower == "vision" else [model.text_model, model.text_projection]
