"""Record every layer of the Keras reference in execution order, through the eager reference's hook.

`record_keras` runs each tower of a `keras_ref.EagerReference` (or of an eager copy of a functional `ALIGN`) with a
hook that turns every layer call into a `Record` as the call returns: post-order, each EfficientNet block's
container right after the block's last layer, the EfficientNet container last in the vision tower; in the text
tower every BERT sub-layer, the TFBertModel, then the projection Dense. Each record also keeps what the layer
received, so that compare can feed the HF module the same.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import tensorflow as tf

from tracer.engine.record import CONFIG_KEYS, Record, first_tensor, kind_of, role_of, to_numpy


def _name(variable) -> str:
    return variable.name.removesuffix(":0")


def _activation(layer) -> str | None:
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", None) if fn is not None else None


def _config(layer) -> dict:
    """The settings in CONFIG_KEYS from `layer.get_config()` (subclassed layers may not implement it)."""
    try:
        config = layer.get_config()
    except (NotImplementedError, TypeError, AttributeError):
        return {}
    return {k: config[k] for k in CONFIG_KEYS if k in config}


def _own_variables(layer, leaf: bool) -> dict[str, tuple[int, ...]]:
    weights = layer.weights if leaf else [*layer._trainable_weights, *layer._non_trainable_weights]
    return {_name(v): tuple(v.shape) for v in weights}


def _array(value) -> np.ndarray | None:
    return to_numpy(first_tensor(value))


class _Recorder:
    """The hook: one `Record` per call, numbered in call order, handed to `sink` as soon as it is complete."""

    def __init__(self, tower: str, keep: bool, sink: Callable[[Record], None] | None):
        self.tower, self.keep, self.sink = tower, keep, sink
        self.records: list[Record] = []

    def __call__(self, layer, path: str, inputs: tuple, kwargs: dict, output) -> None:
        from tracer.families.align.keras_ref.eager import Container

        tensor = first_tensor(output)
        if isinstance(layer, Container):
            cls, kind, role, variables, activation, config = layer.cls, "container", layer.role, {}, None, {}
        else:
            cls = type(layer).__name__
            kind = kind_of(cls)
            role = role_of(cls) if kind == "container" else kind
            leaf = not list(layer._flatten_layers(include_self=False, recursive=False))
            variables = _own_variables(layer, leaf or kind != "container")
            activation, config = _activation(layer), _config(layer)
        received = tuple(_array(x) for x in inputs) if self.keep else ()
        record = Record(
            framework="keras", tower=self.tower, order=len(self.records), path=path, cls=cls, kind=kind,
            shape=tuple(int(d) for d in tensor.shape) if tensor is not None else (),
            dtype=tf.as_dtype(tensor.dtype).name if tensor is not None else "",
            variables=variables, activation=activation, role=role,
            output=to_numpy(tensor) if self.keep else None,
            input=received[0] if received else None,
            inputs=received,
            input_kwargs={k: _array(v) for k, v in kwargs.items() if v is not None} if self.keep else {},
            layer=layer, config=config,
        )
        self.records.append(record)
        if self.sink is not None:
            self.sink(record)


def record_keras(model, inputs, keep_outputs: bool = True, sink: Callable[[Record], None] | None = None,
                 towers: Iterable[str] = ("vision", "text")) -> list[Record]:
    """Records of the reference's towers (vision first), each tower in execution order, orders final.

    `model` is a `keras_ref.EagerReference` (a tower not built yet is built by this run) or a functional `ALIGN`
    from `build_reference` (copied into an eager one first). `inputs` is a `tracer.families.align.inputs.Inputs`. With `sink`, each
    record is passed to it as soon as it is made, fully built; the recorder never touches it again (the sink may
    drop its arrays). `keep_outputs=False` keeps shapes only (no arrays at all).
    """
    from tracer.families.align.keras_ref.eager import EagerReference, check_tower

    reference = model if isinstance(model, EagerReference) else EagerReference.from_model(model)
    records: list[Record] = []
    for tower in map(check_tower, towers):
        recorder = _Recorder(tower, keep_outputs, sink)
        if tower == "vision":
            reference.image_features(inputs.pixel_values_nhwc, hook=recorder)
        else:
            reference.text_features(**inputs.numpy_text(np.int32), hook=recorder)
        records.extend(recorder.records)
    return records
