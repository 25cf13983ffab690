"""Record every module call of an `AlignModel` (leaves and containers) with forward hooks."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import torch

from tracer.engine.record import Record, first_tensor, kind_of, role_of, to_numpy

ACTIVATION_NAMES = {"SiLU": "swish", "Sigmoid": "sigmoid", "Tanh": "tanh", "GELUActivation": "gelu",
                    "GELU": "gelu", "NewGELUActivation": "gelu_new", "ReLU": "relu"}


def tower_of(name: str) -> str | None:
    if name.startswith("vision_model"):
        return "vision"
    if name.startswith(("text_model", "text_projection")):
        return "text"
    return None


def _kind(module: torch.nn.Module) -> str:
    kind = kind_of(type(module).__name__)
    if kind == "conv" and module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return kind


def _own_tensors(name: str, module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    own = dict(module.named_parameters(recurse=False))
    own.update((k, b) for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set)
    return {f"{name}.{k}": tuple(t.shape) for k, t in own.items() if not k.endswith("num_batches_tracked")}


def _config(module: torch.nn.Module) -> dict:
    """The module's settings under the Keras names of record.CONFIG_KEYS (eps -> epsilon, stride -> strides)."""
    names = {"eps": "epsilon", "padding": "padding", "stride": "strides", "kernel_size": "kernel_size",
             "dilation": "dilation_rate", "approximate": "approximate"}
    config = {key: getattr(module, attr) for attr, key in names.items() if hasattr(module, attr)}
    if type(module).__name__ in ACTIVATION_NAMES:
        config["activation"] = ACTIVATION_NAMES[type(module).__name__]
    return config


_local = threading.local()


@contextmanager
def paused():
    """Module calls made in this block (a module re-run on the Keras input) are not recorded."""
    _local.paused = True
    try:
        yield
    finally:
        _local.paused = False


@contextmanager
def recording(model: torch.nn.Module, keep_outputs: bool = True, sink: Callable[[Record], None] | None = None):
    """Within the block, every module call of `model` appends a Record to the yielded list; `sink`, when given,
    gets each record as soon as it is made (and may drop its arrays once done with them)."""
    records: list[Record] = []
    counters: dict[str, int] = {}

    def hook(module, args, output, name):
        tower = tower_of(name)
        tensor = first_tensor(output)
        if tower is None or tensor is None or getattr(_local, "paused", False):
            return
        cls = type(module).__name__
        kind = _kind(module)
        record = Record(
            framework="torch", tower=tower, order=counters.setdefault(tower, 0), path=name, cls=cls, kind=kind,
            shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
            variables=_own_tensors(name, module),
            activation=ACTIVATION_NAMES.get(cls), role=role_of(cls) if kind == "container" else kind,
            output=to_numpy(tensor) if keep_outputs and not tensor.is_meta else None,  # no module writes its output later
            # What the tower's first layer received (the pixels, after the processor): kept for that layer only.
            input=_first_input(args) if keep_outputs and counters.get(tower, 0) == 0 else None,
            module=module, config=_config(module),
        )
        counters[tower] += 1
        records.append(record)
        if sink is not None:
            sink(record)

    def _first_input(args):
        tensor = first_tensor(args)
        return to_numpy(tensor) if tensor is not None and not tensor.is_meta else None

    handles = [m.register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n))
               for name, m in model.named_modules() if name]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def record_torch(model: torch.nn.Module, inputs, keep_outputs: bool = True,
                 sink: Callable[[Record], None] | None = None, towers=("vision", "text")) -> tuple[list[Record], dict]:
    """One forward per tower, as `AlignModel.forward` computes them: records for the towers, and the towers'
    features (`image_features`, `text_features`, numpy) so no second forward is needed."""
    from tracer.families.align.hf import tower_features

    with recording(model, keep_outputs, sink) as records:
        features = tower_features(model, inputs, towers)
    return records, {k: to_numpy(v) for k, v in features.items()}
