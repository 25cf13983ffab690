"""The transformers side: `AlignConfig` from the spec, a model built without initialisation, strict state writing."""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from transformers import AlignConfig, AlignModel, AlignTextConfig, AlignVisionConfig

from tracer.errors import BadInputError, ConversionError
from tracer.engine.record import FEATURES, TOWERS
from tracer.families.align.spec import AlignSpec

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
    text = AlignTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        type_vocab_size=t.type_vocab_size,
        layer_norm_eps=t.layer_norm_eps,
        hidden_act="gelu",
        pad_token_id=0,
    )
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
    with torch.device("meta"):
        model = AlignModel(config)
    return model.eval()


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


def expected_state(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every persistent tensor the model saves: name -> (shape, dtype)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


# Tensors that come from no checkpoint variable, and how they are derived.
def _derived_state(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)  # Keras keeps no step count; eval mode never reads it
    return None


def _derived_buffer(name: str, buffer: torch.Tensor) -> torch.Tensor:
    """Non-persistent buffers are not in any checkpoint; rebuild them as the module's __init__ does."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "position_ids":
        return torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape).clone()
    if leaf == "token_type_ids":
        return torch.zeros(buffer.shape, dtype=buffer.dtype)
    raise ConversionError(f"non-persistent buffer `{name}` has no known derivation: this transformers version's "
                          "AlignModel differs from the one tracer supports (5.x); use a supported version")


def rebuild_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (position ids) are in no checkpoint: rebuild them on the CPU."""
    for module_name, module in model.named_modules():
        for buf_name in list(module._non_persistent_buffers_set):
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            module._buffers[buf_name] = _derived_buffer(full, module._buffers[buf_name])


def materialize_uninitialized(model: torch.nn.Module) -> torch.nn.Module:
    """Give a meta model real but uninitialised storage: enough to run it for shapes and call order."""
    model.to_empty(device="cpu")
    with torch.no_grad():  # zeros, not leftover bytes: NaNs and denormals make a CPU forward crawl
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    rebuild_buffers(model)
    return model


def hf_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensors that need a checkpoint value: every persistent one except those derived."""
    return {k: s for k, (s, _) in expected_state(model).items() if _derived_state(k, s, torch.float32) is None}


class StateWriter:
    """Writes a model's persistent tensors strictly, in as many calls as the caller likes (one per tower, say);
    `finish()` derives the tensors no checkpoint holds and fails, listing them, on any tensor left unwritten.

    A tensor still on the meta device takes the given tensor as its storage (no copy); a materialised one (a tower
    run for its call order) is copied into.
    """

    def __init__(self, model: AlignModel):
        self.model = model
        self.expected = expected_state(model)
        self.written: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's tensors (after a tower is materialised)."""
        self._state = self.model.state_dict()

    def tensor(self, name: str) -> torch.Tensor:
        """The model's tensor `name` as it is now."""
        return self._state[name]

    def materialized(self, name: str) -> bool:
        """Whether `name` has storage to copy into (else a write gives it the tensor's)."""
        return name in self._state and not self._state[name].is_meta

    def write(self, tensors: Mapping[str, torch.Tensor]) -> None:
        unexpected = sorted(set(tensors) - set(self.expected))
        mismatched = [f"{n}: checkpoint gives {tuple(v.shape)}, model needs {self.expected[n][0]}"
                      for n, v in tensors.items() if n in self.expected and tuple(v.shape) != self.expected[n][0]]
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) with no place in AlignModel: {unexpected[:20]}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {mismatched[:20]}")
        if problems:
            self._fail(problems)
        assign = {}
        with torch.no_grad():
            for name, value in tensors.items():
                if self.materialized(name):
                    self._state[name].copy_(value)  # any strides: a transposed view is copied once, here
                else:
                    assign[name] = value.to(self.expected[name][1]).contiguous()
        if assign:
            self.model.load_state_dict(assign, strict=False, assign=True)
            self.refresh()
        self.written.update(tensors)

    def finish(self, describe_missing: Callable[[list[str]], str] | None = None) -> list[str]:
        """Derive what no checkpoint holds; returns the derived names. Fails on anything left unwritten (described
        by `describe_missing` when given)."""
        derived, missing = {}, []
        for name, (shape, dtype) in self.expected.items():
            if name in self.written:
                continue
            if (value := _derived_state(name, shape, dtype)) is not None:
                derived[name] = value
            else:
                missing.append(name)
        if missing and describe_missing is not None:
            raise ConversionError(describe_missing(missing))
        if missing:
            self._fail([f"{len(missing)} parameter(s) never written: {missing[:20]}"])
        self.write(derived)
        rebuild_buffers(self.model)
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:
            raise ConversionError(f"tensors still unwritten after loading: {left[:20]}: this transformers version's "
                                  "AlignModel differs from the one tracer supports (5.x); use a supported version")
        return list(derived)

    @staticmethod
    def _fail(problems: list[str]) -> None:
        raise ConversionError("the checkpoint does not fit the AlignModel derived from it: " + "; ".join(problems)
                              + "; if you passed --hf_config overrides, they changed the model's shapes, drop them; "
                              "otherwise the mapping (--mapping_file) is wrong or incomplete")


def write_state(model: AlignModel, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Write every parameter and buffer strictly in one go; returns the saved tensors derived rather than read.

    Fails, listing them, on any parameter left unwritten, any tensor with no place in the model, or any shape
    mismatch.
    """
    writer = StateWriter(model)
    writer.write(tensors)
    return writer.finish()
