"""Record every module call of any `torch.nn.Module` (leaves and containers) with forward hooks."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import torch

from tracer.engine.record import Record, first_tensor, to_numpy
from tracer.engine.record.kinds import generic_role, torch_activation, torch_kind


def _own_tensors(name: str, module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    own = dict(module.named_parameters(recurse=False))
    own.update((k, b) for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set)
    return {f"{name}.{k}": tuple(t.shape) for k, t in own.items() if not k.endswith("num_batches_tracked")}


_CONFIG_NAMES = {"eps": "epsilon", "padding": "padding", "stride": "strides", "kernel_size": "kernel_size",
                 "dilation": "dilation_rate", "approximate": "approximate"}


def _config(module: torch.nn.Module) -> dict:
    """The module's settings under the Keras names of record.CONFIG_KEYS (eps -> epsilon, stride -> strides)."""
    config = {key: getattr(module, attr) for attr, key in _CONFIG_NAMES.items() if hasattr(module, attr)}
    if (activation := torch_activation(module)) is not None:
        config["activation"] = activation
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


def whole_model(name: str) -> str:
    """Every module belongs to the one part of a single-part model."""
    return "model"


@contextmanager
def recording(model: torch.nn.Module, keep_outputs: bool = True, sink: Callable[[Record], None] | None = None,
              part_of: Callable[[str], str | None] = whole_model):
    """Within the block, every module call of `model` (not the root itself) appends a Record to the yielded list;
    `sink`, when given, gets each record as soon as it is made (and may drop its arrays once done with them).
    `part_of(module name)`: the part a module belongs to, or None to leave it out (ALIGN: its towers)."""
    records: list[Record] = []
    counters: dict[str, int] = {}
    static = {}  # per module: what does not change from call to call

    def hook(module, args, output, name):
        part = part_of(name)
        tensor = first_tensor(output)
        if part is None or tensor is None or getattr(_local, "paused", False):
            return
        if name not in static:
            kind = torch_kind(module)
            cls = type(module).__name__
            static[name] = (cls, kind, _own_tensors(name, module), torch_activation(module),
                            generic_role(cls) if kind == "container" else kind, _config(module))
        cls, kind, variables, activation, role, config = static[name]
        received = first_tensor(args)
        order = counters.setdefault(part, 0)
        record = Record(
            framework="torch", tower=part, order=order, path=name, cls=cls, kind=kind,
            shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
            variables=dict(variables), activation=activation, role=role,
            output=to_numpy(tensor) if keep_outputs and not tensor.is_meta else None,  # no module writes its output later
            # What the part's first layer received (the pixels, after the processor): kept for that layer only.
            input=(to_numpy(received) if keep_outputs and order == 0 and received is not None and not received.is_meta
                   else None),
            input_shape=tuple(received.shape) if received is not None else (),
            module=module, config=config,
        )
        counters[part] += 1
        records.append(record)
        if sink is not None:
            sink(record)

    handles = [m.register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n))
               for name, m in model.named_modules() if name]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
