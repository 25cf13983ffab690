"""A tf_keras re-implementation of transformers 4.x `TFBertModel` and its task heads: the BERT reference.

transformers 5 dropped TensorFlow, so the original classes cannot be imported any more. This module reproduces what
a checkpoint written by them (or by google-research BERT, whose maths they copied) depends on:

* the maths in inference: word + position (range(seq)) + token-type embeddings, LayerNorm (eps from the spec),
  self-attention with scores / sqrt(head size) and the additive mask `(1 - mask) * -10000`, the configured
  activation (exact erf GELU for "gelu", through the same TF op transformers used), post-LN residual blocks, a
  tanh pooler on token 0; the heads as transformers 4 wrote them (below);
* the variable names (`tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0`,
  `tf_bert_for_pre_training/mlm___cls/predictions/bias:0`, ...), which come from the name scopes each `build` opens;
* the Python attribute names (`bert`, `embeddings`, `encoder`, `layer`, `attention`, `self_attention`,
  `dense_output`, `intermediate`, `bert_output`, `pooler`, `mlm`, `nsp`, ...), which are what TensorFlow's
  object-based checkpoint keys are made of;
* the quirk of the embeddings layer: its three tables are created with `add_weight` names `weight`, `embeddings`,
  `embeddings`;
* the tie of the MLM decoder: `predictions` holds the embeddings layer (as transformers' `input_embeddings`), so the
  decoder is the word-embedding table and Keras tracks that layer's variables under `mlm___cls` too (which is why a
  transformers `tf_model.h5` lists them again in that group);
* the class names, and every sub-layer is a real Keras layer invoked through `__call__`.

The sizes come from any object with the attributes of `BertSizes` (ALIGN's `TextSpec`, the BERT family's
`BertSpec`). Dropout layers are kept (rates from BertConfig's defaults) and named `dropout`; they are identities in
inference and have no variables.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import tensorflow as tf
import tf_keras

from tracer.families.bert.spec import KERAS_SCOPES


class BertSizes(Protocol):
    """What the layers read from a spec (`hidden_act` is optional: "gelu" when absent)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    scope: str


HIDDEN_DROPOUT = 0.1  # BertConfig.hidden_dropout_prob
ATTENTION_DROPOUT = 0.1  # BertConfig.attention_probs_dropout_prob
INITIALIZER_RANGE = 0.02  # BertConfig.initializer_range
MASK_VALUE = -10000.0


def _init() -> tf_keras.initializers.Initializer:
    return tf_keras.initializers.TruncatedNormal(stddev=INITIALIZER_RANGE)


def gelu(x):
    """BERT's exact (erf) GELU, x * Phi(x). transformers 4.x maps "gelu" to `keras.activations.gelu` on TF >= 2.4,
    i.e. `tf.nn.gelu(x, approximate=False)` (TF 2.21 writes it as 0.5 * x * erfc(-x / sqrt(2))); this calls that
    same op rather than an erf formula with a different float32 rounding. In float64 (a `--float64` reference)
    that op is only float32-accurate (rel 1.3e-9 against the exact value, measured): there the formula it stands
    for, which float64 evaluates to round-off."""
    if x.dtype == tf.float64:
        return 0.5 * x * tf.math.erfc(-x / tf.constant(math.sqrt(2.0), tf.float64))
    return tf_keras.activations.gelu(x, approximate=False)


def activation(name: str):
    """transformers 4's TF ACT2FN for the names BERT configs use."""
    if name == "gelu":
        return gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: tf_keras.activations.gelu(x, approximate=True)
    if name in ("relu", "tanh", "sigmoid"):
        return tf_keras.activations.get(name)
    if name in ("swish", "silu"):
        return tf_keras.activations.swish
    raise ValueError(f"hidden_act {name!r} is not one transformers 4's TF BERT knew (gelu, gelu_new, relu, swish, ...)")


def _dense(units: int, name: str, activation=None) -> tf_keras.layers.Dense:
    return tf_keras.layers.Dense(units, activation=activation, kernel_initializer=_init(), name=name)


def _build_child(layer: tf_keras.layers.Layer, input_shape) -> None:
    """Build a sub-layer inside its own name scope, so its variables are named `<parent scope>/<child>/...`."""
    with tf.name_scope(layer.name):
        layer.build(input_shape)


class TFBertEmbeddings(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.text = text
        self.hidden_size = text.hidden_size
        self.LayerNorm = tf_keras.layers.LayerNormalization(epsilon=text.layer_norm_eps, name="LayerNorm")
        self.dropout = tf_keras.layers.Dropout(rate=HIDDEN_DROPOUT, name="dropout")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        # The order and the `add_weight` names matter: they decide both the variable names and the object-graph
        # keys (`weight`, then `embeddings` rebound from the token-type to the position table).
        with tf.name_scope("word_embeddings"):
            self.weight = self.add_weight(
                name="weight", shape=[self.text.vocab_size, self.hidden_size], initializer=_init()
            )
        with tf.name_scope("token_type_embeddings"):
            self.token_type_embeddings = self.add_weight(
                name="embeddings", shape=[self.text.type_vocab_size, self.hidden_size], initializer=_init()
            )
        with tf.name_scope("position_embeddings"):
            self.position_embeddings = self.add_weight(
                name="embeddings", shape=[self.text.max_position_embeddings, self.hidden_size], initializer=_init()
            )
        _build_child(self.LayerNorm, [None, None, self.hidden_size])

    def call(self, input_ids, position_ids=None, token_type_ids=None, training=False):
        tf.debugging.assert_less(
            input_ids,
            tf.cast(self.text.vocab_size, input_ids.dtype),
            message="input_ids must be smaller than the vocabulary size",
        )
        inputs_embeds = tf.gather(params=self.weight, indices=input_ids)
        shape = tf.shape(inputs_embeds)[:-1]
        if token_type_ids is None:
            token_type_ids = tf.fill(dims=shape, value=0)
        if position_ids is None:
            position_ids = tf.expand_dims(tf.range(start=0, limit=shape[1]), axis=0)
        position_embeds = tf.gather(params=self.position_embeddings, indices=position_ids)
        token_type_embeds = tf.gather(params=self.token_type_embeddings, indices=token_type_ids)
        embeddings = inputs_embeds + position_embeds + token_type_embeds
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings, training=training)


class TFBertSelfAttention(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        if text.hidden_size % text.num_heads:
            raise ValueError(f"hidden size {text.hidden_size} is not a multiple of {text.num_heads} heads")
        self.hidden_size = text.hidden_size
        self.num_attention_heads = text.num_heads
        self.attention_head_size = text.hidden_size // text.num_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.sqrt_att_head_size = math.sqrt(self.attention_head_size)
        self.query = _dense(self.all_head_size, "query")
        self.key = _dense(self.all_head_size, "key")
        self.value = _dense(self.all_head_size, "value")
        self.dropout = tf_keras.layers.Dropout(rate=ATTENTION_DROPOUT, name="dropout")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        for dense in (self.query, self.key, self.value):
            _build_child(dense, [None, None, self.hidden_size])

    def _split_heads(self, x, batch_size):
        # (batch, seq, all_head) -> (batch, heads, seq, head_size)
        x = tf.reshape(x, (batch_size, -1, self.num_attention_heads, self.attention_head_size))
        return tf.transpose(x, perm=[0, 2, 1, 3])

    def call(self, hidden_states, attention_mask=None, training=False):
        batch_size = tf.shape(hidden_states)[0]
        query = self._split_heads(self.query(hidden_states), batch_size)
        key = self._split_heads(self.key(hidden_states), batch_size)
        value = self._split_heads(self.value(hidden_states), batch_size)

        scores = tf.matmul(query, key, transpose_b=True)
        scores = tf.divide(scores, tf.cast(self.sqrt_att_head_size, scores.dtype))
        if attention_mask is not None:
            scores = tf.add(scores, attention_mask)
        # transformers' `stable_softmax` adds 1e-9 to the logits (a no-op in exact arithmetic); kept for parity.
        probs = tf.nn.softmax(scores + 1e-9, axis=-1)
        probs = self.dropout(probs, training=training)

        context = tf.matmul(probs, value)
        context = tf.transpose(context, perm=[0, 2, 1, 3])
        return tf.reshape(context, (batch_size, -1, self.all_head_size))


class _ResidualOutput(tf_keras.layers.Layer):
    """dense -> dropout -> LayerNorm(x + residual): TF BERT's SelfOutput and Output differ only in input width."""

    def __init__(self, text: "BertSizes", input_size: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = text.hidden_size
        self.input_size = input_size
        self.dense = _dense(text.hidden_size, "dense")
        self.LayerNorm = tf_keras.layers.LayerNormalization(epsilon=text.layer_norm_eps, name="LayerNorm")
        self.dropout = tf_keras.layers.Dropout(rate=HIDDEN_DROPOUT, name="dropout")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.dense, [None, None, self.input_size])
        _build_child(self.LayerNorm, [None, None, self.hidden_size])

    def call(self, hidden_states, input_tensor, training=False):
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states, training=training)
        return self.LayerNorm(hidden_states + input_tensor)


class TFBertSelfOutput(_ResidualOutput):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(text, text.hidden_size, **kwargs)


class TFBertAttention(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.self_attention = TFBertSelfAttention(text, name="self")
        self.dense_output = TFBertSelfOutput(text, name="output")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.self_attention, None)
        _build_child(self.dense_output, None)

    def call(self, input_tensor, attention_mask=None, training=False):
        context = self.self_attention(input_tensor, attention_mask, training=training)
        return self.dense_output(context, input_tensor, training=training)


class TFBertIntermediate(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = text.hidden_size
        self.dense = _dense(text.intermediate_size, "dense")
        self.intermediate_act_fn = activation(getattr(text, "hidden_act", "gelu"))

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.dense, [None, None, self.hidden_size])

    def call(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class TFBertOutput(_ResidualOutput):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(text, text.intermediate_size, **kwargs)


class TFBertLayer(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.attention = TFBertAttention(text, name="attention")
        self.intermediate = TFBertIntermediate(text, name="intermediate")
        self.bert_output = TFBertOutput(text, name="output")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        for child in (self.attention, self.intermediate, self.bert_output):
            _build_child(child, None)

    def call(self, hidden_states, attention_mask=None, training=False):
        attention_output = self.attention(hidden_states, attention_mask, training=training)
        intermediate_output = self.intermediate(attention_output)
        return self.bert_output(intermediate_output, attention_output, training=training)


class TFBertEncoder(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.layer = [TFBertLayer(text, name=f"layer_._{i}") for i in range(text.num_layers)]

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        for child in self.layer:
            _build_child(child, None)

    def call(self, hidden_states, attention_mask=None, training=False):
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states, attention_mask, training=training)
        return hidden_states


class TFBertPooler(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = text.hidden_size
        self.dense = _dense(text.hidden_size, "dense", activation="tanh")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.dense, [None, self.hidden_size])

    def call(self, hidden_states):
        return self.dense(hidden_states[:, 0])


class TFBertMainLayer(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", add_pooling_layer: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.text = text
        self.embeddings = TFBertEmbeddings(text, name="embeddings")
        self.encoder = TFBertEncoder(text, name="encoder")
        # transformers' MaskedLM / token-classification / QA classes build the main layer without a pooler.
        self.pooler = TFBertPooler(text, name="pooler") if add_pooling_layer else None

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        for child in (self.embeddings, self.encoder, self.pooler):
            if child is not None:
                _build_child(child, None)

    def call(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, training=False):
        shape = tf.shape(input_ids)
        if attention_mask is None:
            attention_mask = tf.fill(dims=shape, value=1)
        if token_type_ids is None:
            token_type_ids = tf.fill(dims=shape, value=0)
        embedding_output = self.embeddings(
            input_ids, position_ids=position_ids, token_type_ids=token_type_ids, training=training
        )
        # (batch, seq) -> (batch, 1, 1, seq); 0 where attended, -10000 where padded.
        mask = tf.reshape(attention_mask, (shape[0], 1, 1, shape[1]))
        mask = tf.cast(mask, dtype=embedding_output.dtype)
        one = tf.constant(1.0, dtype=embedding_output.dtype)
        extended_mask = tf.multiply(tf.subtract(one, mask), tf.constant(MASK_VALUE, dtype=embedding_output.dtype))

        sequence_output = self.encoder(embedding_output, extended_mask, training=training)
        if self.pooler is None:
            return {"last_hidden_state": sequence_output}
        return {"last_hidden_state": sequence_output, "pooler_output": self.pooler(sequence_output)}


_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class TFBertModel(tf_keras.Model):
    """`TFBertModel(BertConfig(...))` for a `TextSpec`; named like the spec's scope (`tf_bert_model/bert`).

    Call it with a dict `{input_ids, attention_mask, token_type_ids}` (as coyo does) or with keyword arguments; it
    returns a dict with `last_hidden_state` and `pooler_output`, which is how coyo indexes transformers' output.
    """

    def __init__(self, text: "BertSizes", add_pooling_layer: bool = True, **kwargs):
        model_scope, _, main_scope = text.scope.partition("/")
        if not model_scope or not main_scope or "/" in main_scope:
            raise ValueError(f"BERT scope must look like `tf_bert_model/bert`, got {text.scope!r}")
        kwargs.setdefault("name", model_scope)
        super().__init__(**kwargs)
        self.text = text
        self.bert = TFBertMainLayer(text, add_pooling_layer=add_pooling_layer, name=main_scope)

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.bert, None)

    def call(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, training=False):
        return self.bert(*_unpack(input_ids, attention_mask, token_type_ids, position_ids), training=training)


def _unpack(input_ids, attention_mask, token_type_ids, position_ids) -> tuple:
    """The inputs as positional (input_ids, attention_mask, token_type_ids, position_ids), from a dict or not."""
    if isinstance(input_ids, dict):
        unknown = set(input_ids) - set(_INPUT_KEYS)
        if unknown:
            raise ValueError(f"unexpected BERT inputs: {sorted(unknown)}")
        inputs = dict(input_ids)
        input_ids = inputs.get("input_ids")
        attention_mask = inputs.get("attention_mask", attention_mask)
        token_type_ids = inputs.get("token_type_ids", token_type_ids)
        position_ids = inputs.get("position_ids", position_ids)
    if input_ids is None:
        raise ValueError("input_ids is required")
    return input_ids, attention_mask, token_type_ids, position_ids


# ---------------------------------------------------------------------------------------------------- task heads


class TFBertPredictionHeadTransform(tf_keras.layers.Layer):
    """dense -> activation -> LayerNorm, before the MLM decoder."""

    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = text.hidden_size
        self.dense = _dense(text.hidden_size, "dense")
        self.transform_act_fn = activation(getattr(text, "hidden_act", "gelu"))
        self.LayerNorm = tf_keras.layers.LayerNormalization(epsilon=text.layer_norm_eps, name="LayerNorm")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.dense, [None, None, self.hidden_size])
        _build_child(self.LayerNorm, [None, None, self.hidden_size])

    def call(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class TFBertLMPredictionHead(tf_keras.layers.Layer):
    """transform, then the decoder tied to the word embeddings (`input_embeddings`), plus an output-only `bias`."""

    def __init__(self, text: "BertSizes", input_embeddings: TFBertEmbeddings, **kwargs):
        super().__init__(**kwargs)
        self.text = text
        self.transform = TFBertPredictionHeadTransform(text, name="transform")
        self.input_embeddings = input_embeddings  # tracked by Keras, as in transformers: the tie

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        self.bias = self.add_weight(shape=(self.text.vocab_size,), initializer="zeros", trainable=True, name="bias")
        _build_child(self.transform, None)

    def call(self, hidden_states):
        hidden_states = self.transform(hidden_states)
        seq_length = tf.shape(hidden_states)[1]
        flat = tf.reshape(hidden_states, (-1, self.text.hidden_size))
        logits = tf.matmul(flat, self.input_embeddings.weight, transpose_b=True)
        logits = tf.reshape(logits, (-1, seq_length, self.text.vocab_size))
        return tf.nn.bias_add(logits, self.bias)


class TFBertMLMHead(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", input_embeddings: TFBertEmbeddings, **kwargs):
        super().__init__(**kwargs)
        self.predictions = TFBertLMPredictionHead(text, input_embeddings, name="predictions")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.predictions, None)

    def call(self, sequence_output):
        return self.predictions(sequence_output)


class TFBertNSPHead(tf_keras.layers.Layer):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = text.hidden_size
        self.seq_relationship = _dense(2, "seq_relationship")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.seq_relationship, [None, self.hidden_size])

    def call(self, pooled_output):
        return self.seq_relationship(pooled_output)


class _TFBertTaskModel(tf_keras.Model):
    """A transformers 4 `TFBertFor...`: the main layer `bert` plus heads; outputs a dict by transformers' names,
    with the main layer's `last_hidden_state` (and `pooler_output`) as well."""

    add_pooling_layer = True

    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(**kwargs)
        self.text = text
        self.bert = TFBertMainLayer(text, add_pooling_layer=self.add_pooling_layer, name="bert")

    def _children(self) -> list:
        return [self.bert]

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        for child in self._children():
            _build_child(child, None)

    def call(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, training=False):
        out = dict(self.bert(*_unpack(input_ids, attention_mask, token_type_ids, position_ids), training=training))
        out.update(self.heads(out, training))
        return out

    def heads(self, out: dict, training: bool) -> dict:
        raise NotImplementedError


class TFBertForPreTraining(_TFBertTaskModel):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(text, **kwargs)
        self.nsp = TFBertNSPHead(text, name="nsp___cls")
        self.mlm = TFBertMLMHead(text, input_embeddings=self.bert.embeddings, name="mlm___cls")

    def _children(self) -> list:
        return [self.bert, self.nsp, self.mlm]

    def heads(self, out, training):
        return {"prediction_logits": self.mlm(out["last_hidden_state"]),
                "seq_relationship_logits": self.nsp(out["pooler_output"])}


class TFBertForNextSentencePrediction(_TFBertTaskModel):
    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(text, **kwargs)
        self.nsp = TFBertNSPHead(text, name="nsp___cls")

    def _children(self) -> list:
        return [self.bert, self.nsp]

    def heads(self, out, training):
        return {"logits": self.nsp(out["pooler_output"])}


class TFBertForMaskedLM(_TFBertTaskModel):
    add_pooling_layer = False

    def __init__(self, text: "BertSizes", **kwargs):
        super().__init__(text, **kwargs)
        self.mlm = TFBertMLMHead(text, input_embeddings=self.bert.embeddings, name="mlm___cls")

    def _children(self) -> list:
        return [self.bert, self.mlm]

    def heads(self, out, training):
        return {"logits": self.mlm(out["last_hidden_state"])}


class _TFBertLinearHead(_TFBertTaskModel):
    """bert -> dropout -> Dense `head_name` on the pooled output (`on_pooled`) or on every token."""

    head_name = "classifier"
    on_pooled = True
    has_dropout = True  # transformers' QA head has none

    def __init__(self, text: "BertSizes", num_labels: int = 2, **kwargs):
        super().__init__(text, **kwargs)
        self.num_labels = num_labels
        if self.has_dropout:
            self.dropout = tf_keras.layers.Dropout(rate=HIDDEN_DROPOUT, name="dropout")
        setattr(self, self.head_name, _dense(num_labels, self.head_name))

    def _children(self) -> list:
        return [self.bert, getattr(self, self.head_name)]

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.bert, None)
        shape = [None, self.text.hidden_size] if self.on_pooled else [None, None, self.text.hidden_size]
        _build_child(getattr(self, self.head_name), shape)

    def heads(self, out, training):
        x = out["pooler_output"] if self.on_pooled else out["last_hidden_state"]
        return {"logits": getattr(self, self.head_name)(self.dropout(x, training=training))}


class TFBertForSequenceClassification(_TFBertLinearHead):
    pass


class TFBertForTokenClassification(_TFBertLinearHead):
    add_pooling_layer = False
    on_pooled = False


class TFBertForQuestionAnswering(_TFBertLinearHead):
    add_pooling_layer = False
    on_pooled = False
    head_name = "qa_outputs"
    has_dropout = False

    def heads(self, out, training):
        logits = self.qa_outputs(out["last_hidden_state"])
        start, end = tf.split(logits, num_or_size_splits=2, axis=-1)
        return {"start_logits": tf.squeeze(start, axis=-1), "end_logits": tf.squeeze(end, axis=-1)}


# transformers 4 class name -> (this module's class, Keras model scope).
_CLASSES = (TFBertModel, TFBertForPreTraining, TFBertForMaskedLM, TFBertForNextSentencePrediction,
            TFBertForSequenceClassification, TFBertForTokenClassification, TFBertForQuestionAnswering)
KERAS_CLASSES = {cls.__name__: (cls, KERAS_SCOPES[cls.__name__]) for cls in _CLASSES}


# ---------------------------------------------------------------------------------------------------- building


class _Consumer:
    """Creates each variable with its value from `read(full name)` (no random initialiser, no second assignment),
    recording the names taken, each once."""

    def __init__(self, read):
        self.read = read
        self.consumed: list[str] = []

    def creator(self, next_creator, **kwargs):
        from tracer.errors import ConversionError

        short = kwargs.get("name")
        if short is None:  # not a layer weight (a Keras Model's own counters): leave it alone
            return next_creator(**kwargs)
        scope = tf.get_current_name_scope()
        full = f"{scope}/{short}" if scope else short
        shape = tuple(int(d) for d in tf.TensorShape(kwargs.get("shape")))
        try:
            value = self.read(full)
        except (KeyError, ConversionError) as err:
            raise ConversionError(f"the reference needs `{full}` {list(shape)}, which the checkpoint lacks ({err}); "
                                  "the checkpoint is incomplete or the chosen class has heads it does not hold") from err
        value = np.asarray(value)
        if tuple(value.shape) != shape:
            raise ConversionError(f"`{full}`: the reference needs shape {list(shape)}, the checkpoint gives "
                                  f"{list(value.shape)}; its weights do not fit one BERT configuration")
        if full in self.consumed:
            raise ConversionError(f"the reference would create `{full}` twice")
        dtype = tf.as_dtype(kwargs.get("dtype") or tf.float32)
        kwargs["initial_value"] = value.astype(dtype.as_numpy_dtype, copy=False)
        kwargs.pop("shape", None)
        variable = next_creator(**kwargs)
        if variable.name.removesuffix(":0") != full:
            raise RuntimeError(f"variable {variable.name} was expected to be named {full}")
        self.consumed.append(full)
        return variable


def build_reference(spec, read=None, num_labels: int | None = None):
    """The transformers 4 TF class `spec.keras_class` for `spec`, built on a probe input. With `read` (Keras name
    -> array) every variable is created from it; returns (model, names consumed in creation order)."""
    cls, scope = KERAS_CLASSES[spec.keras_class]
    kwargs = {}
    if issubclass(cls, _TFBertLinearHead):
        kwargs["num_labels"] = num_labels or getattr(spec, "num_labels", None) or 2
    if cls is TFBertModel:
        model = cls(spec, add_pooling_layer=getattr(spec, "pooler", True), **kwargs)
    else:
        model = cls(spec, name=scope, **kwargs)
    consumer = _Consumer(read) if read is not None else None
    probe = {"input_ids": tf.zeros((1, 2), tf.int32), "attention_mask": tf.ones((1, 2), tf.int32),
             "token_type_ids": tf.zeros((1, 2), tf.int32)}
    if consumer is None:
        model(probe, training=False)
        return model, []
    with tf.variable_creator_scope(consumer.creator):
        model(probe, training=False)
    return model, consumer.consumed
