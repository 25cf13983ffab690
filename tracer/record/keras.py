"""Record every layer of the Keras reference in execution order.

Functional graphs (the EfficientNet, nested in the vision encoder; the text encoder's wrapper) are recorded
through a sub-model whose outputs are all the layer outputs, nested functional models flattened. Subclassed
layers (the BERT) are recorded by intercepting each sub-layer's `call`, which runs eagerly inside the
sub-model. Each record also keeps what the layer received, so that compare can feed the HF module the same.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager

import numpy as np
import tensorflow as tf
import tf_keras

from . import CONFIG_KEYS, Record, first_array, kind_of, role_of

_BLOCK = re.compile(r"^(block\d+[a-z])_")


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


def _is_functional(layer) -> bool:
    return isinstance(layer, tf_keras.Model) and getattr(layer, "_is_graph_network", False)


class _Recorder:
    def __init__(self, tower: str, keep: bool):
        self.tower, self.keep, self.records = tower, keep, []

    def add(self, layer, path: str, output, inputs: tuple, kwargs: dict | None = None,
            cls: str | None = None, role: str | None = None, variables=None) -> Record:
        array = first_array(output)
        cls = cls or type(layer).__name__
        kind = kind_of(cls) if role is None else "container"
        leaf = not list(layer._flatten_layers(include_self=False, recursive=False)) if layer is not None else False
        record = Record(
            framework="keras", tower=self.tower, order=len(self.records), path=path, cls=cls, kind=kind,
            shape=tuple(array.shape) if array is not None else (), dtype=str(array.dtype) if array is not None else "",
            variables=variables if variables is not None else _own_variables(layer, leaf or kind != "container"),
            activation=_activation(layer) if layer is not None else None,
            role=role or (role_of(cls) if kind == "container" else kind),
            output=array if self.keep else None,
            input=first_array(inputs[0]) if self.keep and inputs else None,
            inputs=tuple(first_array(x) for x in inputs) if self.keep else (),
            input_kwargs={k: first_array(v) for k, v in (kwargs or {}).items() if v is not None} if self.keep else {},
            layer=layer, config=_config(layer) if layer is not None else {},
        )
        self.records.append(record)
        return record


def _sublayer_paths(layer, path: str) -> dict[int, tuple[object, str]]:
    """id(sub-layer) -> (sub-layer, path) for every layer nested in a subclassed layer."""
    found = {}
    for child in layer._flatten_layers(include_self=False, recursive=False):
        child_path = f"{path}/{child.name}"
        found[id(child)] = (child, child_path)
        found.update(_sublayer_paths(child, child_path))
    return found


@contextmanager
def _intercept(layer, path: str, recorder: _Recorder):
    """Record each sub-layer call of a subclassed layer, in the order the calls return (post-order)."""
    patched = []
    for sub, sub_path in _sublayer_paths(layer, path).values():
        original = sub.call
        signature = inspect.signature(original)

        def wrapped(*args, __orig=original, __sig=signature, __layer=sub, __path=sub_path, **kwargs):
            out = __orig(*args, **kwargs)
            bound = __sig.bind_partial(*args, **kwargs).arguments
            tensors = {k: v for k, v in bound.items() if tf.is_tensor(v)}
            first = next(iter(tensors.values()), None)
            recorder.add(__layer, __path, out, (first,) if first is not None else (),
                         {k: v for k, v in list(tensors.items())[1:]})
            return out

        object.__setattr__(sub, "call", wrapped)
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            object.__delattr__(sub, "call")


def _node(model, layer):
    """The node where `model`'s graph calls `layer` (a nested model also has a node of its own graph)."""
    for i, node in enumerate(layer._inbound_nodes):
        if f"{layer.name}_ib-{i}" in model._network_nodes:
            return node
    raise ValueError(f"layer {layer.name} is not called in {model.name}")


def _record_functional(model, feed, path: str, recorder: _Recorder) -> object:
    """Run `model` (functional) on `feed` through a sub-model exposing every layer output; returns its output."""
    layers = [l for l in model.layers if not isinstance(l, tf_keras.layers.InputLayer)]
    outer = [l for l in layers if not _is_functional(l)]
    nodes = {id(l): _node(model, l) for l in layers}
    probe = tf_keras.Model(model.input, [nodes[id(l)].outputs for l in outer]) if outer else None
    # Calls inside each subclassed layer are recorded into its own bucket, spliced in before the layer itself.
    buckets = {id(l): _Recorder(recorder.tower, recorder.keep) for l in outer
               if list(l._flatten_layers(include_self=False, recursive=False))}
    values: dict = {}
    if probe is not None:
        with _all(_intercept(l, f"{path}/{l.name}", buckets[id(l)]) for l in outer if id(l) in buckets):
            outputs = probe(feed, training=False)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        values = {id(l): v for l, v in zip(outer, outputs)}
    tensor_values = {id(t): v for t, v in zip(tf.nest.flatten(model.input), tf.nest.flatten(feed))}
    for layer, value in zip(outer, [values.get(id(l)) for l in outer]):
        for t, v in zip(tf.nest.flatten(nodes[id(layer)].outputs), tf.nest.flatten(value)):
            tensor_values[id(t)] = v

    def inputs_of(layer):
        return tuple(tensor_values.get(id(t)) for t in tf.nest.flatten(nodes[id(layer)].input_tensors))

    last = None
    for layer in layers:
        if _is_functional(layer):
            last = _record_functional(layer, inputs_of(layer)[0], f"{path}/{layer.name}", recorder)
            for t, v in zip(tf.nest.flatten(nodes[id(layer)].outputs), tf.nest.flatten(last)):
                tensor_values[id(t)] = v
            recorder.add(layer, f"{path}/{layer.name}", last, inputs_of(layer), role="Functional", variables={})
        else:
            for inner in buckets[id(layer)].records if id(layer) in buckets else ():
                inner.order = len(recorder.records)
                recorder.records.append(inner)
            last = values[id(layer)]
            recorder.add(layer, f"{path}/{layer.name}", last, inputs_of(layer))
    return last


@contextmanager
def _all(managers):
    managers = list(managers)
    for m in managers:
        m.__enter__()
    try:
        yield
    finally:
        for m in reversed(managers):
            m.__exit__(None, None, None)


def _add_block_containers(records: list[Record]) -> list[Record]:
    """coyo's functional EfficientNet has no block objects, only `block3a_*` names: make them containers."""
    out: list[Record] = []
    for i, record in enumerate(records):
        out.append(record)
        m = _BLOCK.match(record.path.rsplit("/", 1)[-1])
        nxt = _BLOCK.match(records[i + 1].path.rsplit("/", 1)[-1]) if i + 1 < len(records) else None
        if m and (nxt is None or nxt.group(1) != m.group(1)):
            members = [r for r in records if _BLOCK.match(r.path.rsplit("/", 1)[-1]) and
                       _BLOCK.match(r.path.rsplit("/", 1)[-1]).group(1) == m.group(1)]
            out.append(Record(
                framework="keras", tower=record.tower, order=0, path=f"{record.path.rsplit('/', 1)[0]}/{m.group(1)}",
                cls="EfficientNetBlock", kind="container", shape=record.shape, dtype=record.dtype, variables={},
                role="Block", output=record.output, input=members[0].input, inputs=(members[0].input,),
            ))
    for order, record in enumerate(out):
        record.order = order
    return out


def record_keras(model, inputs, keep_outputs: bool = True) -> list[Record]:
    """Records of both towers of the ALIGN reference, each in execution order."""
    vision = _Recorder("vision", keep_outputs)
    pixels = tf.constant(inputs.pixel_values_nhwc, dtype=tf.float32)
    _record_functional(model.image_encoder, pixels, model.image_encoder.name, vision)
    text = _Recorder("text", keep_outputs)
    feed = {k: tf.constant(v) for k, v in inputs.numpy_text(np.int32).items()}
    _record_functional(model.text_encoder, feed, model.text_encoder.name, text)
    return _add_block_containers(vision.records) + text.records
