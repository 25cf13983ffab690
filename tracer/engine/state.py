"""Writing a torch model's state strictly: every persistent tensor once, each shape checked, nothing left unwritten;
tensors no checkpoint holds (BatchNorm step counts, position ids) derived as the modules' `__init__` would."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from tracer.errors import ConversionError


def build_on_meta(model_class, config, **kwargs) -> torch.nn.Module:
    """`model_class(config, **kwargs)` on the meta device (no memory, no random initialisation that would be
    overwritten anyway), in eval mode."""
    with torch.device("meta"):
        model = model_class(config, **kwargs)
    return model.eval()


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
                          "model differs from the one tracer supports (5.x); use a supported version")


def rebuild_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (position ids) are in no checkpoint: rebuild them on the CPU, as `__init__` would."""
    for module_name, module in model.named_modules():
        for buf_name in list(module._non_persistent_buffers_set):
            buffer = module._buffers.get(buf_name)
            if buffer is None:
                continue
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            module._buffers[buf_name] = _derived_buffer(full, buffer)


def materialize_uninitialized(model: torch.nn.Module) -> torch.nn.Module:
    """Give a meta model real but uninitialised storage: enough to run it for shapes and call order."""
    model.to_empty(device="cpu")
    if hasattr(model, "tie_weights"):  # to_empty gives each module new storage: tie what the model ties again
        model.tie_weights()
    with torch.no_grad():  # zeros, not leftover bytes: NaNs and denormals make a CPU forward crawl
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    rebuild_buffers(model)
    return model


def tied_names(model: torch.nn.Module) -> set[str]:
    """Parameters that are another's (an MLM decoder tied to the word embeddings): written with it."""
    seen, tied = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.add(id(parameter))
    return tied


def hf_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensors that need a checkpoint value: every persistent one except those derived and those tied to another."""
    tied = tied_names(model)
    return {k: s for k, (s, _) in expected_state(model).items()
            if _derived_state(k, s, torch.float32) is None and k not in tied}


class StateWriter:
    """Writes a model's persistent tensors strictly, in as many calls as the caller likes (one per tower, say);
    `finish()` derives the tensors no checkpoint holds and fails, listing them, on any tensor left unwritten.

    A tensor still on the meta device takes the given tensor as its storage (no copy); a materialised one (a tower
    run for its call order) is copied into.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.target = type(model).__name__  # what the messages call the model
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
            problems.append(f"{len(unexpected)} tensor(s) with no place in {self.target}: {unexpected[:20]}")
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
                                  "model differs from the one tracer supports (5.x); use a supported version")
        return list(derived)

    def _fail(self, problems: list[str]) -> None:
        raise ConversionError(f"the checkpoint does not fit the {self.target} derived from it: " + "; ".join(problems)
                              + "; if you passed --hf_config overrides, they changed the model's shapes, drop them; "
                              "otherwise the mapping (--mapping_file) is wrong or incomplete")


def write_state(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Write every parameter and buffer strictly in one go; returns the saved tensors derived rather than read.

    Fails, listing them, on any parameter left unwritten, any tensor with no place in the model, or any shape
    mismatch.
    """
    writer = StateWriter(model)
    writer.write(tensors)
    return writer.finish()
