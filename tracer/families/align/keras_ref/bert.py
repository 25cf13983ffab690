"""A tf_keras re-implementation of transformers 4.x `TFBertModel`, as coyo-align builds it.

transformers 5 dropped TensorFlow, so the original class cannot be imported any more. This module reproduces what a
coyo checkpoint depends on:

* the maths of TFBertModel in inference: word + position (range(seq)) + token-type embeddings, LayerNorm (eps from
  the spec, 1e-12), self-attention with scores / sqrt(head size) and the additive mask `(1 - mask) * -10000`,
  exact (erf) GELU through the same TF op transformers used, post-LN residual blocks, and a tanh pooler on token 0;
* the variable names (`tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0`, ...), which come from
  the name scopes each `build` opens;
* the Python attribute names (`bert`, `embeddings`, `encoder`, `layer`, `attention`, `self_attention`,
  `dense_output`, `intermediate`, `bert_output`, `pooler`, ...), which are what TensorFlow's object-based checkpoint
  keys are made of (`.../bert/encoder/layer/0/attention/self_attention/query/kernel`);
* the quirk of the embeddings layer: its three tables are created with `add_weight` names `weight`, `embeddings`,
  `embeddings`, so the object graph reaches the position table as `embeddings` and the token-type table as
  `token_type_embeddings`;
* the class names, and every sub-layer is a real Keras layer invoked through `__call__`, so a tracer that wraps
  `Layer.__call__` sees each step.

Dropout layers are kept (rates from BertConfig's defaults) so training-mode calls behave like the original; they are
identities in inference. transformers leaves them unnamed (Keras numbers them `dropout_7`, ... across the process);
here each is named `dropout`, so layer paths do not depend on how many models a process built. They have no
variables, so neither variable names nor checkpoint keys change.
"""

from __future__ import annotations

import math

import tensorflow as tf
import tf_keras

from tracer.families.align.spec import TextSpec

HIDDEN_DROPOUT = 0.1  # BertConfig.hidden_dropout_prob
ATTENTION_DROPOUT = 0.1  # BertConfig.attention_probs_dropout_prob
INITIALIZER_RANGE = 0.02  # BertConfig.initializer_range
MASK_VALUE = -10000.0


def _init() -> tf_keras.initializers.Initializer:
    return tf_keras.initializers.TruncatedNormal(stddev=INITIALIZER_RANGE)


def gelu(x):
    """BERT's exact (erf) GELU, x * Phi(x). transformers 4.x maps "gelu" to `keras.activations.gelu` on TF >= 2.4,
    i.e. `tf.nn.gelu(x, approximate=False)` (TF 2.21 writes it as 0.5 * x * erfc(-x / sqrt(2))); this calls that
    same op rather than an erf formula with a different float32 rounding."""
    return tf_keras.activations.gelu(x, approximate=False)


def _dense(units: int, name: str, activation=None) -> tf_keras.layers.Dense:
    return tf_keras.layers.Dense(units, activation=activation, kernel_initializer=_init(), name=name)


def _build_child(layer: tf_keras.layers.Layer, input_shape) -> None:
    """Build a sub-layer inside its own name scope, so its variables are named `<parent scope>/<child>/...`."""
    with tf.name_scope(layer.name):
        layer.build(input_shape)


class TFBertEmbeddings(tf_keras.layers.Layer):
    def __init__(self, text: TextSpec, **kwargs):
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
    def __init__(self, text: TextSpec, **kwargs):
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

    def __init__(self, text: TextSpec, input_size: int, **kwargs):
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
    def __init__(self, text: TextSpec, **kwargs):
        super().__init__(text, text.hidden_size, **kwargs)


class TFBertAttention(tf_keras.layers.Layer):
    def __init__(self, text: TextSpec, **kwargs):
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
    def __init__(self, text: TextSpec, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = text.hidden_size
        self.dense = _dense(text.intermediate_size, "dense")
        self.intermediate_act_fn = gelu

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.dense, [None, None, self.hidden_size])

    def call(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class TFBertOutput(_ResidualOutput):
    def __init__(self, text: TextSpec, **kwargs):
        super().__init__(text, text.intermediate_size, **kwargs)


class TFBertLayer(tf_keras.layers.Layer):
    def __init__(self, text: TextSpec, **kwargs):
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
    def __init__(self, text: TextSpec, **kwargs):
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
    def __init__(self, text: TextSpec, **kwargs):
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
    def __init__(self, text: TextSpec, **kwargs):
        super().__init__(**kwargs)
        self.text = text
        self.embeddings = TFBertEmbeddings(text, name="embeddings")
        self.encoder = TFBertEncoder(text, name="encoder")
        self.pooler = TFBertPooler(text, name="pooler")

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        for child in (self.embeddings, self.encoder, self.pooler):
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
        pooled_output = self.pooler(sequence_output)
        return {"last_hidden_state": sequence_output, "pooler_output": pooled_output}


_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class TFBertModel(tf_keras.Model):
    """`TFBertModel(BertConfig(...))` for a `TextSpec`; named like the spec's scope (`tf_bert_model/bert`).

    Call it with a dict `{input_ids, attention_mask, token_type_ids}` (as coyo does) or with keyword arguments; it
    returns a dict with `last_hidden_state` and `pooler_output`, which is how coyo indexes transformers' output.
    """

    def __init__(self, text: TextSpec, **kwargs):
        model_scope, _, main_scope = text.scope.partition("/")
        if not model_scope or not main_scope or "/" in main_scope:
            raise ValueError(f"BERT scope must look like `tf_bert_model/bert`, got {text.scope!r}")
        kwargs.setdefault("name", model_scope)
        super().__init__(**kwargs)
        self.text = text
        self.bert = TFBertMainLayer(text, name=main_scope)

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        _build_child(self.bert, None)

    def call(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, training=False):
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
        return self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            training=training,
        )
