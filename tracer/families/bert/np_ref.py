"""BERT's inference maths in NumPy: the reference a plain (untraced) conversion compares against.

The tf_keras reference (`keras_ref`) is what `--trace` records layer by layer; building it costs TensorFlow's
import, a second copy of every weight and about 6 s and 1 GB at BERT-Base size. A plain conversion only needs
the outputs, so this module computes them from the checkpoint's arrays, read by the same (Keras-side) names in
the same layout, one layer at a time while it runs: nothing is held but the embedding table (the MLM decoder
reuses it) and the activations. The maths is `keras_ref`'s, in float32: embeddings (word + position + token
type) and LayerNorm, attention with scores / sqrt(head size), the additive mask `(1 - mask) * -10000` and
transformers' `+ 1e-9` before the softmax, post-LN residual blocks, the tanh pooler on token 0 and the heads.
The matrix products go through torch's kernels on the same buffers (`_mm`: NumPy's OpenBLAS took 5 s of a
BERT-Base forward that torch does in 0.3 s); everything else, and every layout decision, is NumPy here, not
transformers' modules.
Agreement with the tf_keras reference is a test (tests/test_bert_family.py), for every head class.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from tracer.families.bert.names import part_of
from tracer.families.bert.spec import KERAS_SCOPES, BertSpec

MASK_VALUE = np.float32(-10000.0)
SQRT_HALF = np.float32(1 / math.sqrt(2))


def reference_names(spec: BertSpec) -> list[str]:
    """The Keras-side names of every weight the spec's class uses, as `keras_ref.build_reference` creates them."""
    from tracer.families.bert.writers import weight_shapes

    scope = KERAS_SCOPES[spec.keras_class]
    return [f"{scope}/{name}" for name in weight_shapes(spec) if part_of(name) in spec.used_parts]


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b (batched over leading axes) in float32, by torch's matmul on the same memory."""
    import torch

    return torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()  # strided views, no copies


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU as TF 2.21 writes it, 0.5 * x * erfc(-x / sqrt(2)); erfc from torch (NumPy has none)."""
    import torch

    return np.float32(0.5) * x * torch.special.erfc(torch.from_numpy(-x * SQRT_HALF)).numpy()


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.float32(math.sqrt(2 / math.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": _gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
    "relu": lambda x: np.maximum(x, np.float32(0)), "tanh": np.tanh, "sigmoid": _sigmoid,
    "swish": lambda x: x * _sigmoid(x), "silu": lambda x: x * _sigmoid(x),
}


class ArrayBert:
    """`spec.keras_class`'s forward on a dict of (N, L) integer arrays (input_ids, attention_mask,
    token_type_ids), returning its outputs by the Keras reference's names. `read(name)`: a weight by its Keras-side
    name, in Keras' layout (kernels (in, out)). `names`: every weight it reads, each once per call."""

    def __init__(self, spec: BertSpec, read: Callable[[str], np.ndarray]):
        if spec.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {spec.hidden_act!r} is not one transformers 4's TF BERT knew "
                             f"({', '.join(ACTIVATIONS)})")
        self.spec, self._read = spec, read
        self.scope = KERAS_SCOPES[spec.keras_class]
        self.names = reference_names(spec)
        self.read_names: list[str] = []
        self.act = ACTIVATIONS[spec.hidden_act]

    def w(self, name: str) -> np.ndarray:
        full = f"{self.scope}/{name}"
        self.read_names.append(full)
        return np.asarray(self._read(full), np.float32)

    def dense(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return _mm(x, self.w(f"{prefix}/kernel")) + self.w(f"{prefix}/bias")

    def layer_norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = np.square(x - mean).mean(-1, keepdims=True)
        eps = np.float32(self.spec.layer_norm_eps)
        return (x - mean) / np.sqrt(var + eps) * self.w(f"{prefix}/gamma") + self.w(f"{prefix}/beta")

    def attention(self, x: np.ndarray, mask: np.ndarray, prefix: str) -> np.ndarray:
        n, length, _ = x.shape
        heads, size = self.spec.num_heads, self.spec.hidden_size // self.spec.num_heads

        def split(name):  # (n, L, hidden) -> (n, heads, L, size)
            return self.dense(x, f"{prefix}/self/{name}").reshape(n, length, heads, size).transpose(0, 2, 1, 3)

        q, k, v = split("query"), split("key"), split("value")
        scores = _mm(q, k.transpose(0, 1, 3, 2)) / np.float32(math.sqrt(size)) + mask + np.float32(1e-9)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = _mm(probs, v).transpose(0, 2, 1, 3).reshape(n, length, heads * size)
        return self.layer_norm(self.dense(context, f"{prefix}/output/dense") + x, f"{prefix}/output/LayerNorm")

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.read_names = []
        ids = np.asarray(inputs["input_ids"])
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), np.float32)
        types = np.asarray(inputs.get("token_type_ids", np.zeros_like(ids)))
        e = "bert/embeddings"
        table = self.w(f"{e}/word_embeddings/weight")
        x = (table[ids] + self.w(f"{e}/position_embeddings/embeddings")[: ids.shape[1]][None]
             + self.w(f"{e}/token_type_embeddings/embeddings")[types])
        x = self.layer_norm(x, f"{e}/LayerNorm")
        additive = ((np.float32(1) - mask) * MASK_VALUE)[:, None, None, :]
        for i in range(self.spec.num_layers):
            p = f"bert/encoder/layer_._{i}"
            attended = self.attention(x, additive, f"{p}/attention")
            inner = self.act(self.dense(attended, f"{p}/intermediate/dense"))
            x = self.layer_norm(self.dense(inner, f"{p}/output/dense") + attended, f"{p}/output/LayerNorm")
        out = {"last_hidden_state": x}
        if "pooler" in self.spec.used_parts:
            out["pooler_output"] = np.tanh(self.dense(x[:, 0], "bert/pooler/dense"))
        out.update(self.heads(out, table))
        if sorted(self.read_names) != sorted(self.names):  # the strictness `consumed` promises
            raise RuntimeError(f"the NumPy reference read {len(self.read_names)} weights, expected the "
                               f"{len(self.names)} of {self.spec.keras_class}")
        return out

    def heads(self, out: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
        cls = self.spec.model_class
        results = {}
        if "mlm" in self.spec.used_parts:
            t = "mlm___cls/predictions/transform"
            h = self.layer_norm(self.act(self.dense(out["last_hidden_state"], f"{t}/dense")), f"{t}/LayerNorm")
            logits = _mm(h, table.T) + self.w("mlm___cls/predictions/bias")
            results["prediction_logits" if cls == "BertForPreTraining" else "logits"] = logits
        if "nsp" in self.spec.used_parts:
            logits = self.dense(out["pooler_output"], "nsp___cls/seq_relationship")
            results["seq_relationship_logits" if cls == "BertForPreTraining" else "logits"] = logits
        if "classifier" in self.spec.used_parts:
            on = out["pooler_output"] if cls == "BertForSequenceClassification" else out["last_hidden_state"]
            results["logits"] = self.dense(on, "classifier")
        if "qa" in self.spec.used_parts:
            logits = self.dense(out["last_hidden_state"], "qa_outputs")
            results.update(start_logits=logits[..., 0], end_logits=logits[..., 1])
        return results
