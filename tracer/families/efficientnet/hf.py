"""The transformers side: `EfficientNetConfig` from the spec, the model built on the meta device, labels."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import EfficientNetConfig, EfficientNetForImageClassification, EfficientNetModel

from tracer.errors import BadInputError
from tracer.families.efficientnet.spec import DROP_CONNECT_RATE, EfficientNetSpec


def read_labels(path: str | os.PathLike, num_labels: int) -> dict[int, str]:
    """One label per line (blank lines are labels too, so that line i is class i; a final newline is not)."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"labels file {p}: no such file; give a text file with one class name per line")
    try:
        lines = p.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise BadInputError(f"labels file {p}: not UTF-8 text ({e}); save it as UTF-8") from e
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    if len(lines) != num_labels:
        raise BadInputError(f"labels file {p} has {len(lines)} line(s), but the checkpoint's `predictions` layer has "
                            f"{num_labels} classes; give one label per class, one per line")
    return dict(enumerate(lines))


def default_labels(num_labels: int) -> dict[int, str]:
    return {i: f"LABEL_{i}" for i in range(num_labels)}


def efficientnet_config(spec: EfficientNetSpec, id2label: dict[int, str] | None = None) -> EfficientNetConfig:
    """The HF config that builds the network of `spec` (channel and block layout are EfficientNet's defaults, which
    HF scales by the same width/depth rounding as Keras)."""
    config = EfficientNetConfig(
        image_size=spec.image_size,
        width_coefficient=spec.width_coefficient,
        depth_coefficient=spec.depth_coefficient,
        hidden_dim=spec.hidden_dim,
        depthwise_padding=list(spec.depthwise_padding),
        dropout_rate=spec.dropout_rate,
        drop_connect_rate=DROP_CONNECT_RATE,
        batch_norm_eps=spec.batch_norm_eps,
        hidden_act="swish",
        pooling_type="mean",
    )
    if spec.include_top:
        labels = id2label or default_labels(spec.num_labels)
        config.id2label = {int(k): v for k, v in labels.items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def model_class(spec: EfficientNetSpec):
    return EfficientNetForImageClassification if spec.include_top else EfficientNetModel


def build_empty(spec: EfficientNetSpec, config: EfficientNetConfig | None = None) -> torch.nn.Module:
    """The model on the meta device (no memory, no initialisation that would be overwritten), in eval mode."""
    from tracer.engine.state import build_on_meta

    return build_on_meta(model_class(spec), config or efficientnet_config(spec))
