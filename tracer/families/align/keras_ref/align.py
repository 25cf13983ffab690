"""coyo-align's `ALIGN` Keras model, rebuilt in tf_keras from an `AlignSpec`, plus strict weight loading and inference.

The object structure follows coyo's `align.py` attribute for attribute, because TensorFlow's object-based checkpoints
are keyed by attribute paths (`image_encoder/layer_with_weights-0/...`, `text_encoder/layer_with_weights-0/bert/...`,
`temperature`, `loss_tracker/total`, `optimizer/...`): `model.load_weights(coyo_checkpoint)` works on this model.

Only coyo's B7 code path exists here (no Dense after the image tower): it is the only one transformers' AlignModel can
hold, and `derive_spec` refuses checkpoints with an image projection.
"""

from __future__ import annotations


from typing import Callable, Iterable, Mapping, Union

import numpy as np
import tensorflow as tf
import tf_keras

from tracer.errors import BadInputError, ConversionError
from tracer.families.align.spec import AlignSpec
from tracer.families.align.keras_ref.bert import TFBertModel
from tracer.families.align.keras_ref.efficientnet import build_efficientnet

ArraySource = Union[Mapping[str, np.ndarray], Callable[[str], np.ndarray]]
METRIC_NAMES = ("loss", "loss_i2t", "loss_t2i")
LABEL_SMOOTHING = 0.1


def create_vision_encoder(spec: AlignSpec) -> tf_keras.Model:
    """coyo's `create_vision_encoder` for the B7 path: the EfficientNet wrapped by a fixed-size image input."""
    size = spec.vision.image_size
    effnet = build_efficientnet(spec.vision)
    effnet.trainable = True
    inputs = tf_keras.layers.Input(shape=(size, size, 3), name="image_input")
    outputs = effnet(inputs)
    return tf_keras.Model(inputs, outputs, name="vision_encoder")


def create_text_encoder(spec: AlignSpec) -> tf_keras.Model:
    """coyo's `create_text_encoder`: TFBertModel, then a float32 Dense on the [CLS] state."""
    seq = spec.text.seq_length
    bert_inputs = dict(
        input_ids=tf_keras.layers.Input(shape=(seq,), dtype=tf.int32),
        attention_mask=tf_keras.layers.Input(shape=(seq,), dtype=tf.int32),
        token_type_ids=tf_keras.layers.Input(shape=(seq,), dtype=tf.int32),
    )
    bert = TFBertModel(spec.text)
    embeddings = bert(bert_inputs, training=None)
    # coyo leaves the Dense unnamed (Keras calls the first one `dense`); naming it keeps the variable names stable
    # when several models are built in one process. Layer names do not enter the object-graph keys.
    outputs = tf_keras.layers.Dense(spec.embed_dim, dtype=tf.float32, name=spec.projection_name)(
        embeddings["last_hidden_state"][:, 0, :]
    )
    return tf_keras.Model(bert_inputs, outputs, name="text_encoder")


class ALIGN(tf_keras.Model):
    """coyo's ALIGN: `image_encoder`, `text_encoder`, an unnamed `tf.Variable` temperature and three loss trackers."""

    def __init__(self, spec: AlignSpec, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.seq_length = spec.text.seq_length
        self.vocab_size = spec.text.vocab_size

        self.image_encoder = create_vision_encoder(spec)
        self.text_encoder = create_text_encoder(spec)

        if spec.temperature_name == "Variable":
            self.temperature = tf.Variable(initial_value=temperature, trainable=True)
        else:
            self.temperature = tf.Variable(initial_value=temperature, trainable=True, name=spec.temperature_name)

        self.loss_tracker = tf_keras.metrics.Mean(name="loss")
        self.loss_i2t_tracker = tf_keras.metrics.Mean(name="loss_i2t")
        self.loss_t2i_tracker = tf_keras.metrics.Mean(name="loss_t2i")

    def get_config(self):
        return {"embed_dim": self.embed_dim, "seq_length": self.seq_length, "vocab_size": self.vocab_size}

    def call(self, inputs, training=None):
        img, text = inputs
        image_features = self.image_encoder(img, training)
        text_features = self.text_encoder(text, training)
        return image_features, text_features

    def compute_contrastive_loss(self, image_features, text_features):
        """coyo's loss on one replica (coyo all-gathers across replicas first): label-smoothed softmax both ways."""
        image_features = tf.nn.l2_normalize(image_features, axis=-1)
        text_features = tf.nn.l2_normalize(text_features, axis=-1)
        logits_i2t = tf.matmul(image_features, text_features, transpose_b=True) / self.temperature
        logits_t2i = tf.matmul(text_features, image_features, transpose_b=True) / self.temperature
        labels = tf.stop_gradient(tf.one_hot(tf.range(tf.shape(image_features)[0]), tf.shape(image_features)[0]))
        loss_i2t = tf_keras.losses.categorical_crossentropy(
            labels, logits_i2t, from_logits=True, label_smoothing=LABEL_SMOOTHING
        )
        loss_t2i = tf_keras.losses.categorical_crossentropy(
            labels, logits_t2i, from_logits=True, label_smoothing=LABEL_SMOOTHING
        )
        return loss_i2t, loss_t2i

    def train_step(self, features):
        with tf.GradientTape() as tape:
            image_features, text_features = self(features, training=True)
            loss_i2t, loss_t2i = self.compute_contrastive_loss(image_features, text_features)
            loss = loss_i2t + loss_t2i
            scaled_loss = tf.nn.compute_average_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        self.loss_i2t_tracker.update_state(loss_i2t)
        self.loss_t2i_tracker.update_state(loss_t2i)
        return {m.name: m.result() for m in self.metrics}

    def predict_step(self, features):
        return self(features, training=False)

    @property
    def metrics(self):
        return [self.loss_tracker, self.loss_i2t_tracker, self.loss_t2i_tracker]


def build_reference(spec: AlignSpec, temperature: float = 1.0) -> ALIGN:
    """Build coyo's ALIGN for `spec` with all its variables created (no forward pass is needed: both encoders are
    functional models, built on their 289x289 / seq_length inputs as they are constructed)."""
    model = ALIGN(spec, temperature=temperature)
    # A subclassed Model only counts as built once called; its variables all exist already, so mark it built
    # instead of paying for a forward pass (save_weights and the optimizer need `built`).
    model.built = True
    return model


def _plain_name(variable: tf.Variable) -> str:
    name = variable.name
    return name[:-2] if name.endswith(":0") else name


def model_weights(model: ALIGN) -> list[tf.Variable]:
    """The model's own weights in Keras' order (image tower, text tower, temperature); no metric variables."""
    return [*model.image_encoder.weights, *model.text_encoder.weights, model.temperature]


def metric_variables(model: ALIGN) -> dict[str, list[tf.Variable]]:
    return {m.name: list(m.variables) for m in model.metrics}


def reference_variables(model: ALIGN) -> dict[str, tf.Variable]:
    """`{variable name without ':0': variable}` for every model weight (metric variables excluded)."""
    out: dict[str, tf.Variable] = {}
    for variable in model_weights(model):
        name = _plain_name(variable)
        if name in out:
            raise ConversionError(f"the reference model has two variables named `{name}`")
        out[name] = variable
    return out


def _short_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def assign_weights(model: ALIGN, values: ArraySource, names: Iterable[str] | None = None) -> None:
    """Assign every model variable by name, strictly.

    `values` is a mapping or a function `name -> array`; `names` are the names it offers (default: the mapping's
    keys). Names are matched before anything is read: every model variable must be offered and every offered name
    must be used, else `ConversionError` lists the missing and unused ones. Arrays are then fetched and assigned one
    at a time (a multi-GB checkpoint is never held whole); shape mismatches are collected and raised together after
    the pass, so on error the model may be partially assigned.
    """
    if names is None:
        if not isinstance(values, Mapping):
            raise BadInputError("assign_weights: `names` is required when `values` is a function")
        names = values.keys()
    offered = list(names)
    duplicates = {n for n in offered if offered.count(n) > 1} if len(set(offered)) != len(offered) else set()
    if duplicates:
        raise ConversionError(f"names offered more than once: {_short_list(duplicates)}")
    targets = reference_variables(model)
    missing = set(targets) - set(offered)
    unused = set(offered) - set(targets)
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model variable(s) get no value: {_short_list(missing)}")
        if unused:
            parts.append(f"{len(unused)} given name(s) match no model variable: {_short_list(unused)}")
        raise ConversionError("; ".join(parts))

    fetch = values.__getitem__ if isinstance(values, Mapping) else values
    mismatches = []
    for name, variable in targets.items():
        array = np.asarray(fetch(name))
        expected = tuple(variable.shape)
        if tuple(array.shape) != expected:
            mismatches.append(f"{name}: model {list(expected)}, given {list(array.shape)}")
            continue
        if not np.issubdtype(array.dtype, np.number):
            mismatches.append(f"{name}: non-numeric dtype {array.dtype}")
            continue
        variable.assign(array.astype(variable.dtype.as_numpy_dtype, copy=False))
        del array
    if mismatches:
        raise ConversionError(f"{len(mismatches)} shape mismatch(es): " + "; ".join(mismatches[:20]))


def embed(
    model: ALIGN,
    pixel_values: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Inference (`training=False`) of both towers.

    `pixel_values` is NHWC float in 0..255 at the spec's image size (the tower rescales itself); the text arrays are
    (batch, seq_length) integers. Returns float32 numpy arrays `image_features`, `text_features` (tower outputs) and
    `image_embeds`, `text_embeds` (the same, L2-normalised).
    """
    size = model.spec.vision.image_size
    pixels = np.asarray(pixel_values, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise BadInputError(f"pixel_values must be (batch, {size}, {size}, 3) NHWC, got {pixels.shape}")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] != model.seq_length:
        raise BadInputError(f"input_ids must be (batch, {model.seq_length}), got {ids.shape}")
    mask = np.asarray(attention_mask)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    if mask.shape != ids.shape or types.shape != ids.shape:
        raise BadInputError(
            f"attention_mask {mask.shape} and token_type_ids {types.shape} must match input_ids {ids.shape}"
        )
    text = {
        "input_ids": tf.constant(ids, dtype=tf.int32),
        "attention_mask": tf.constant(mask, dtype=tf.int32),
        "token_type_ids": tf.constant(types, dtype=tf.int32),
    }
    image_features = model.image_encoder(tf.constant(pixels), training=False)
    text_features = model.text_encoder(text, training=False)
    return {
        "image_features": image_features.numpy(),
        "text_features": text_features.numpy(),
        "image_embeds": tf.nn.l2_normalize(image_features, axis=-1).numpy(),
        "text_embeds": tf.nn.l2_normalize(text_features, axis=-1).numpy(),
    }
