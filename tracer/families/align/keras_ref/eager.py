"""coyo-align's two towers built by calling their layers eagerly on real tensors: a fast reference for tracing.

`build_reference` builds the faithful object graph (functional towers inside the `ALIGN` model), which is what
`load_weights` of a coyo checkpoint needs; for ALIGN-base most of its time goes into symbolic construction (every
layer call traced into a scratch graph) and random initialisers. `EagerReference` has the same layer classes,
layer names, variable names and maths, but

* each tower is built on its first call, on whatever input it gets (a small probe image builds the vision tower
  as well as a 289x289 one: the paddings are the unknown-size ones coyo's (None, None, 3) model bakes in);
* with `values`, every variable is created directly with its value (no random initialiser, no second assignment):
  `tf.variable_creator_scope` replaces each layer weight's initial value by `values(full scoped name)`;
* a `hook(layer, path, inputs, kwargs, output)` sees every layer call as it returns (post-order), with the layer
  paths the recorder has always used (`vision_encoder/efficientnet-b7/block1a_dwconv`,
  `text_encoder/tf_bert_model/bert/encoder/layer_._0/...`, `text_encoder/dense`), plus containers the eager build
  has no Keras object for (`Container`: each EfficientNet block and the EfficientNet itself);
* `release(tower)` drops a tower's layers and variables, so a caller can trace one tower at a time.

The EfficientNet topology is `efficientnet.efficientnet_features`, shared with the functional build; only the layer
factory differs (`EagerLayers` creates each named layer once and reports its calls). The BERT is the same
`TFBertModel`, called eagerly with its sub-layers' `call` wrapped to report to the hook.
"""

from __future__ import annotations

import functools
import gc
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Union

import numpy as np
import tensorflow as tf
import tf_keras

from tracer.errors import BadInputError, ConversionError
from tracer.engine.precision import keras_dtype
from tracer.engine.record.keras import Hook, HookSlot, intercept
from tracer.families.align.towers import PROBE_IMAGE_SIZE, TOWERS
from tracer.families.align.spec import AlignSpec
from tracer.families.align.keras_ref.bert import TFBertModel
from tracer.families.align.keras_ref.efficientnet import efficientnet_features, model_name

__all__ = ["Container", "EagerLayers", "EagerReference", "Hook", "PROBE_IMAGE_SIZE", "TOWERS", "VISION_PATH",
           "TEXT_PATH"]

VISION_PATH = "vision_encoder"  # coyo's tower model names: the first part of every layer path
TEXT_PATH = "text_encoder"

ValueSource = Union[Mapping[str, np.ndarray], Callable[[str], np.ndarray]]


@dataclass(eq=False)
class Container:
    """A container the eager build has no Keras object for: an EfficientNet block (`cls` "EfficientNetBlock",
    `role` "Block") or the EfficientNet model itself (`cls` "Functional", as coyo's functional model is). It owns
    no variables; `layers` are the Keras layers inside it."""

    name: str
    cls: str
    role: str
    layers: list = field(default_factory=list, repr=False)

    @property
    def weights(self) -> list:
        return []


class _Call:
    """Calls one layer in inference (`training=False` where its `call` takes it) and reports to the hook."""

    __slots__ = ("layer", "path", "slot", "training")

    def __init__(self, layer, path: str, slot: HookSlot):
        self.layer, self.path, self.slot = layer, path, slot
        self.training = bool(layer._expects_training_arg)

    def __call__(self, x):
        # `call` directly, without `Layer.__call__`'s bookkeeping (input conversion, masks, call context, save
        # spec), a fifth of B7's eager run time; outputs are bit for bit the same. The first call builds the layer
        # as `Layer.__call__` does: `_maybe_build` inside a name scope of the layer's name (its variables' prefix).
        layer = self.layer
        if not layer.built:
            with tf.name_scope(layer.name):
                layer._maybe_build(x)
        out = layer.call(x, training=False) if self.training else layer.call(x)
        hook = self.slot.fn
        if hook is not None:
            hook(self.layer, self.path, tuple(x) if isinstance(x, (list, tuple)) else (x,), {}, out)
        return out


class EagerLayers:
    """The eager layer factory for `efficientnet_features`: `make(cls, name, ...)` creates the layer `name` on the
    first call and returns the same (wrapped) layer on later ones; `end_block` reports each block as a container
    right after its last layer."""

    def __init__(self, prefix: str, slot: HookSlot):
        self.prefix, self.slot = prefix, slot
        self.calls: dict[str, _Call] = {}
        self.blocks: dict[str, Container] = {}

    def __call__(self, cls, name: str, *args, **kwargs) -> _Call:
        call = self.calls.get(name)
        if call is None:
            call = self.calls[name] = _Call(cls(*args, name=name, **kwargs), self.prefix + name, self.slot)
        elif type(call.layer) is not cls:
            raise RuntimeError(f"layer {name} is a {type(call.layer).__name__}, asked for a {cls.__name__}")
        return call

    def end_block(self, name: str, block_input, block_output) -> None:
        hook = self.slot.fn
        if hook is not None:
            block = self.blocks.get(name)
            if block is None:
                members = [c.layer for n, c in self.calls.items() if n.startswith(name + "_")]
                block = self.blocks[name] = Container(name, "EfficientNetBlock", "Block", members)
            hook(block, self.prefix + name, (block_input,), {}, block_output)

    @property
    def layers(self) -> list:
        return [c.layer for c in self.calls.values()]


def _expected_shape(kwargs: dict) -> tuple[int, ...]:
    shape = kwargs.get("shape")
    if shape is not None:
        return tuple(int(d) for d in tf.TensorShape(shape))
    initial = kwargs.get("initial_value")
    if isinstance(initial, functools.partial) and initial.args:  # Keras: partial(initializer, shape, dtype=...)
        return tuple(int(d) for d in initial.args[0])
    return tuple(np.shape(initial() if callable(initial) else initial))


class EagerReference:
    """coyo's ALIGN towers for `spec`, built eagerly on first use (see the module docstring).

    `values`: optional mapping or function `name -> array` (names without ':0', as `reference_variables` gives
    them). When given, every variable is created with its value; a name it does not know (KeyError or
    ConversionError) or a value of another shape raises `ConversionError` naming the variable and the shapes.
    `consumed` lists, in creation order, the names taken from `values` (the temperature first), so a caller can
    report checkpoint weights nothing used (`unused(names)`); a tower built again after `release` reads its names
    again. Without `values`, variables get Keras' random initial values.
    """

    def __init__(self, spec: AlignSpec, values: ValueSource | None = None, temperature: float = 1.0,
                 float64: bool = False):
        self.spec = spec
        # `float64`: every layer is built and run in float64 (weights cast from the checkpoint's float32), the
        # reference of a `--float64` trace.
        self.dtype = tf.float64 if float64 else tf.float32
        self._fetch = values.__getitem__ if isinstance(values, Mapping) else values
        self.consumed: list[str] = []
        self._slot = HookSlot()
        self._variables: dict[str, dict[str, tf.Variable]] = {t: {} for t in TOWERS}
        self._vision: EagerLayers | None = None
        self._vision_model: Container | None = None
        self._bert: TFBertModel | None = None
        self._projection: _Call | None = None
        self._built = {t: False for t in TOWERS}
        name = spec.temperature_name
        initial = self._value_for(name, (), tf.float32) if self._fetch is not None else np.float32(temperature)
        # coyo: tf.Variable(initial_value=temperature, trainable=True), which Keras' name scopes leave `Variable`.
        kwargs = {} if name == "Variable" else {"name": name}
        self.temperature = tf.Variable(initial_value=initial, trainable=True, **kwargs)
        if self.temperature.name.removesuffix(":0") != name:
            raise RuntimeError(f"the temperature is named {self.temperature.name}, expected {name}")

    @classmethod
    def from_model(cls, model) -> "EagerReference":
        """An eager copy of a functional `ALIGN` (`build_reference`), with its current variable values."""
        from tracer.families.align.keras_ref.align import reference_variables

        variables = reference_variables(model)
        return cls(model.spec, values=lambda name: variables[name].numpy())

    # ------------------------------------------------------------------------------------------ variables

    def _value_for(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        try:
            array = self._fetch(name)
        except (KeyError, ConversionError) as err:
            raise ConversionError(f"no value for model variable `{name}` {list(shape)} ({err})") from err
        array = np.asarray(array)
        if tuple(array.shape) != tuple(shape):
            raise ConversionError(f"shape mismatch: {name}: model {list(shape)}, given {list(array.shape)}")
        if not np.issubdtype(array.dtype, np.number):
            raise ConversionError(f"{name}: non-numeric dtype {array.dtype}")
        self.consumed.append(name)
        return array.astype(tf.as_dtype(dtype or tf.float32).as_numpy_dtype, copy=False)

    @contextmanager
    def _creating(self, tower: str):
        """Variables created inside are the tower's; with `values`, each gets its value instead of a random one."""
        own = self._variables[tower]

        def creator(next_creator, **kwargs):
            short = kwargs.get("name")
            if short is None:  # not a layer weight (a Keras Model's step counters): leave it alone
                return next_creator(**kwargs)
            scope = tf.get_current_name_scope()
            full = f"{scope}/{short}" if scope else short
            if self._fetch is not None:
                kwargs["initial_value"] = self._value_for(full, _expected_shape(kwargs), kwargs.get("dtype"))
            variable = next_creator(**kwargs)
            name = variable.name.removesuffix(":0")
            if name != full:
                raise RuntimeError(f"variable {variable.name} was expected to be named {full}")
            if any(name in v for v in self._variables.values()) or name == self.temperature_name:
                raise ConversionError(f"the reference model has two variables named `{name}`")
            own[name] = variable
            return variable

        with tf.variable_creator_scope(creator):
            yield

    @property
    def temperature_name(self) -> str:
        return self.temperature.name.removesuffix(":0")

    def variables(self, tower: str | None = None) -> dict[str, tf.Variable]:
        """`{name without ':0': variable}` of one built tower, or of both built towers and the temperature."""
        if tower is None:
            return {**self._variables["vision"], **self._variables["text"], self.temperature_name: self.temperature}
        return dict(self._variables[check_tower(tower)])

    def built(self, tower: str) -> bool:
        return self._built[check_tower(tower)]

    def unused(self, names: Iterable[str]) -> list[str]:
        """Those of `names` no variable was created from (so far)."""
        consumed = set(self.consumed)
        return [n for n in names if n not in consumed]

    def release(self, tower: str) -> None:
        """Drop the tower's layers and variables (the next call builds it again, from `values` again). Its memory is
        freed once nothing else holds them (records keep their `layer`)."""
        if check_tower(tower) == "vision":
            self._vision = self._vision_model = None
        else:
            self._bert = self._projection = None
        self._variables[tower] = {}
        self._built[tower] = False
        gc.collect()

    def build(self, tower: str) -> None:
        """Build a tower on a small probe input (1x65x65x3 pixels / one text of `seq_length` tokens)."""
        if check_tower(tower) == "vision":
            self.image_features(np.zeros((1, PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE, 3), self.dtype.as_numpy_dtype))
        else:
            ids = np.zeros((1, self.spec.text.seq_length), np.int32)
            self.text_features(ids, np.ones_like(ids), ids)

    def _floatx(self):
        """Keras' default float type is this reference's while its layers are built and run (layers take their
        dtype from it when made)."""
        return keras_dtype(self.dtype.name)

    @contextmanager
    def _run(self, tower: str, hook: Hook | None):
        if self._slot.fn is not None:
            raise RuntimeError("EagerReference calls do not nest")
        self._slot.fn = hook
        try:
            with nullcontext() if self._built[tower] else self._creating(tower):
                yield
            self._built[tower] = True
        except BaseException:
            if not self._built[tower]:
                self.release(tower)  # a half-built tower is of no use
            raise
        finally:
            self._slot.fn = None

    # ------------------------------------------------------------------------------------------ towers

    def image_features(self, pixels_nhwc, hook: Hook | None = None) -> np.ndarray:
        """The pooled EfficientNet features of NHWC 0..255 pixels (numpy or tf, any size >= 33), numpy in the
        reference's dtype (float32, or float64)."""
        x = tf.cast(pixels_nhwc, self.dtype) if tf.is_tensor(pixels_nhwc) else tf.constant(pixels_nhwc, self.dtype)
        if x.shape.rank != 4 or x.shape[-1] != 3:
            raise BadInputError(f"pixels must be (batch, height, width, 3) NHWC, got {tuple(x.shape)}")
        if self._vision is None:
            name = model_name(self.spec.vision)
            self._vision = EagerLayers(f"{VISION_PATH}/{name}/", self._slot)
            self._vision_model = Container(name, "Functional", "Functional", [])
        with self._floatx(), self._run("vision", hook):
            out = efficientnet_features(x, self.spec.vision, self._vision)
            if hook is not None:
                self._vision_model.layers = self._vision.layers
                hook(self._vision_model, f"{VISION_PATH}/{self._vision_model.name}", (x,), {}, out)
        return out.numpy()

    def text_features(self, input_ids, attention_mask, token_type_ids=None, hook: Hook | None = None) -> np.ndarray:
        """coyo's text tower: TFBertModel, then the Dense on the [CLS] state; numpy (batch, embed_dim) in the
        reference's dtype."""
        ids, mask = (tf.cast(tf.convert_to_tensor(a), tf.int32) for a in (input_ids, attention_mask))
        types = tf.zeros_like(ids) if token_type_ids is None else tf.cast(tf.convert_to_tensor(token_type_ids),
                                                                          tf.int32)
        if ids.shape.rank != 2 or mask.shape != ids.shape or types.shape != ids.shape:
            raise BadInputError(f"input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} and token_type_ids "
                                f"{tuple(types.shape)} must all be (batch, seq)")
        with self._floatx():
            return self._text_features(ids, mask, types, hook)

    def _text_features(self, ids, mask, types, hook: Hook | None) -> np.ndarray:
        if self._bert is None:
            self._bert = TFBertModel(self.spec.text)
            intercept(self._bert, f"{TEXT_PATH}/{self._bert.name}", self._slot)
            name = self.spec.projection_name
            # coyo's Dense is float32 (`dtype=tf.float32`): the reference's dtype here, float64 in a float64 run.
            dense = tf_keras.layers.Dense(self.spec.embed_dim, dtype=self.dtype, name=name)
            self._projection = _Call(dense, f"{TEXT_PATH}/{name}", self._slot)
        with self._run("text", hook):
            out = self._bert({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, training=False)
            if hook is not None:
                hook(self._bert, f"{TEXT_PATH}/{self._bert.name}", (ids,),
                     {"attention_mask": mask, "token_type_ids": types}, out)
            features = self._projection(out["last_hidden_state"][:, 0, :])
        return features.numpy()

    def embed(self, pixel_values, input_ids, attention_mask, token_type_ids=None) -> dict[str, np.ndarray]:
        """Both towers, like `align.embed`: `image_features`, `text_features` and their L2-normalised `*_embeds`."""
        image = self.image_features(pixel_values)
        text = self.text_features(input_ids, attention_mask, token_type_ids)
        return {"image_features": image, "text_features": text,
                "image_embeds": tf.nn.l2_normalize(image, axis=-1).numpy(),
                "text_embeds": tf.nn.l2_normalize(text, axis=-1).numpy()}


def check_tower(tower: str) -> str:
    if tower not in TOWERS:
        raise BadInputError(f"unknown tower {tower!r}; expected one of {', '.join(TOWERS)}")
    return tower
