"""Record every layer call of any tf_keras model, through call interception.

`intercept(model)` makes every layer nested in the model (Functional graphs, nested sub-models, Sequential,
subclassed layers and their sub-layers) report each call to a hook as it returns: post-order, so a container
comes right after its last child; a layer called twice reports twice. `Recorder` turns those reports into
`Record`s, with what the layer received kept so that compare can feed the torch module the same.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable

import numpy as np

from tracer.engine.record import CONFIG_KEYS, Record, first_tensor, to_numpy
from tracer.engine.record.kinds import generic_role, keras_activation, keras_kind
from tracer.errors import BadInputError

# hook(layer, path, inputs, kwargs, output): `inputs` are the tensors the layer got positionally (a merge layer's
# list is spread out), `kwargs` the tensors it got by name; `output` is what it returned.
Hook = Callable[[object, str, tuple, dict, object], None]


class HookSlot:
    """The hook of the call in progress (None: no hook). Wrapped layers point here, not at a recorder, so no
    reference cycle keeps a released model alive."""

    __slots__ = ("fn",)

    def __init__(self):
        self.fn: Hook | None = None


def _name(variable) -> str:
    return variable.name.removesuffix(":0")


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


def _spread(values) -> list:
    """The tensors among call arguments, a list argument (merge layers) spread out."""
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(x for x in v if _is_tensor(x))
        elif _is_tensor(v):
            out.append(v)
    return out


def _is_tensor(value) -> bool:
    import tensorflow as tf

    return tf.is_tensor(value) or isinstance(value, np.ndarray)


def _children(layer) -> list:
    return list(layer._flatten_layers(include_self=False, recursive=False))


def intercept(layer, path: str, slot: HookSlot, seen: set | None = None) -> None:
    """Make every layer nested in `layer` report its calls (post-order) to `slot`'s hook: the first tensor
    argument (a list spread out) as `inputs`, the other tensor arguments by name as `kwargs`. Paths are
    `parent/child`. A layer reached twice (shared) is wrapped once, under its first path."""
    seen = set() if seen is None else seen
    for child in _children(layer):
        if id(child) in seen:
            continue
        seen.add(id(child))
        child_path = f"{path}/{child.name}" if path else child.name
        original = child.call
        signature = inspect.signature(original)

        def call(*args, __orig=original, __sig=signature, __layer=child, __path=child_path, **kwargs):
            out = __orig(*args, **kwargs)
            hook = slot.fn
            if hook is not None:
                bound = __sig.bind_partial(*args, **kwargs).arguments
                names = list(bound)
                first = _spread([bound[names[0]]]) if names else []
                rest = {k: v for k, v in list(bound.items())[1:] if _is_tensor(v)}
                hook(__layer, __path, tuple(first), rest, out)
            return out

        object.__setattr__(child, "call", call)  # an instance attribute: Keras' tracking never sees it
        intercept(child, child_path, slot, seen)


def release_interception(layer) -> None:
    """Undo `intercept`: the layers' own `call` again."""
    for child in layer._flatten_layers(include_self=False, recursive=True):
        child.__dict__.pop("call", None)


class Recorder:
    """The hook: one `Record` per call, numbered in call order, handed to `sink` as soon as it is complete.

    A reported object that is no Keras layer but carries `cls` and `role` (a block an eager reference groups its
    layers into) is recorded as a container of that class and role."""

    def __init__(self, part: str, keep: bool, sink: Callable[[Record], None] | None = None):
        self.part, self.keep, self.sink = part, keep, sink
        self.records: list[Record] = []
        self._static: dict[int, tuple] = {}

    def _describe(self, layer) -> tuple:
        found = self._static.get(id(layer))
        if found is None:
            if not hasattr(layer, "_flatten_layers"):  # a reported block with no Keras object
                found = (layer.cls, "container", layer.role, {}, None, {})
            else:
                cls = type(layer).__name__
                kind = keras_kind(layer)
                leaf = not _children(layer)
                found = (cls, kind, generic_role(cls) if kind == "container" else kind,
                         _own_variables(layer, leaf or kind != "container"), keras_activation(layer), _config(layer))
            self._static[id(layer)] = found
        return found

    def __call__(self, layer, path: str, inputs: tuple, kwargs: dict, output) -> None:
        import tensorflow as tf

        tensor = first_tensor(output)
        cls, kind, role, variables, activation, config = self._describe(layer)
        received = tuple(to_numpy(first_tensor(x)) for x in inputs) if self.keep else ()
        first = inputs[0] if inputs else None
        record = Record(
            framework="keras", tower=self.part, order=len(self.records), path=path, cls=cls, kind=kind,
            shape=tuple(int(d) for d in tensor.shape) if tensor is not None else (),
            dtype=tf.as_dtype(tensor.dtype).name if tensor is not None else "",
            variables=dict(variables), activation=activation, role=role,
            output=to_numpy(tensor) if self.keep else None,
            input=received[0] if received else None,
            input_shape=tuple(int(d) for d in first.shape) if first is not None else (),
            inputs=received,
            input_kwargs={k: to_numpy(first_tensor(v)) for k, v in kwargs.items() if v is not None} if self.keep else {},
            layer=layer, config=config,
        )
        self.records.append(record)
        if self.sink is not None:
            self.sink(record)


def check_tf_keras(model) -> None:
    """Only Keras 2 (tf_keras) models can be traced: a Keras 3 model or anything else is refused by name."""
    import tf_keras

    if isinstance(model, tf_keras.layers.Layer):
        return
    module = type(model).__module__.split(".")[0]
    if module == "keras":
        raise BadInputError(
            f"the Keras model is a Keras 3 `{type(model).__name__}`: tracer supports Keras 2 models only; build it "
            "with `import tf_keras` (or TF_USE_LEGACY_KERAS=1 before importing TensorFlow)")
    raise BadInputError(f"expected a tf_keras model, got a {type(model).__module__}.{type(model).__name__}")


@contextmanager
def recording(model, part: str = "model", keep_outputs: bool = True, sink: Callable[[Record], None] | None = None):
    """Within the block, every layer call made by calling `model` appends a Record to the yielded list (the
    model's own call is not recorded: its output is the model's output)."""
    check_tf_keras(model)
    slot = HookSlot()
    recorder = Recorder(part, keep_outputs, sink)
    intercept(model, "", slot)
    slot.fn = recorder
    try:
        yield recorder.records
    finally:
        slot.fn = None
        release_interception(model)
