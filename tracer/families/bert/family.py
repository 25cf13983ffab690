"""The BERT adapter: google-research TF1 checkpoints and transformers 4 `tf_model.h5` -> transformers 5 BERT.

Options are any object with these attributes (all optional): `config_file`, `vocab_file`, `do_lower_case`,
`inputs_file` (.npz with input_ids, attention_mask, token_type_ids; outputs of the original by name may ride
along), `texts`, `seq_length`, `model_class`, `drop_heads`.

The MLM decoder is tied: the HF model must be written through `hf_writer(model)` (a `TiedStateWriter`), whose
`finish` gives the tied parameters their sources and checks the tie.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable

import numpy as np

from tracer.errors import BadInputError, ConversionError
from tracer.families.base import Example, Family, KerasReference
from tracer.families.bert.names import canonical
from tracer.families.bert.spec import BertSpec, derive_spec, find_config

DEFAULT_TEXTS = (
    "The cat sat on the mat.",
    "Hello world, this is BERT.",
    ("A good movie.", "The dog is bad."),  # a pair: exercises token_type_ids 1
)
OUTPUTS = ("last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits", "logits",
           "start_logits", "end_logits")
_NPZ_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class BertFamily(Family):
    name = "bert"
    tolerances = {name: 1e-5 for name in OUTPUTS}

    # ------------------------------------------------------------------------------------------ checkpoint

    def detect(self, names: dict[str, tuple[int, ...]], extra: dict[str, Any]) -> bool:
        if not names:
            return False
        for format in ("tf1", "h5"):
            hits = [canonical(n, format) for n in names]
            if all(hits) and any(h[0] == "bert/embeddings/word_embeddings/weight" for h in hits):
                return True
        return False

    def derive(self, checkpoint, options=None) -> BertSpec:
        config, config_path = find_config(checkpoint.path, getattr(options, "config_file", None))
        spec = derive_spec(checkpoint.shapes(), checkpoint.format, config, config_path,
                           model_class=getattr(options, "model_class", None),
                           drop_heads=bool(getattr(options, "drop_heads", False)),
                           seq_length=getattr(options, "seq_length", None), source=checkpoint.path)
        check_tie(checkpoint, spec)
        return spec

    def weight_names(self, checkpoint, spec: BertSpec) -> dict[str, str]:
        """Checkpoint name -> the reference's name, for every weight the chosen class uses (`spec.dropped`, the
        heads it has no place for, are left out: they are listed there)."""
        dropped = set(spec.dropped)
        model_scope = spec.scope.rsplit("/", 1)[0]
        out = {}
        for name in checkpoint.shapes():
            if name in dropped:
                continue
            hit = canonical(name, checkpoint.format)
            if hit is None:
                raise ConversionError(f"`{name}` is no BERT weight; is it a BERT checkpoint?")
            out[name] = f"{model_scope}/{hit[0]}"
        return out

    def rules(self, spec: BertSpec) -> tuple:
        from tracer.families.bert.rules import bert_rules

        return bert_rules(spec)

    def describe(self, spec: BertSpec) -> str:
        dropped = f", dropped {len(spec.dropped)} weights of unused heads" if spec.dropped else ""
        return (f"BERT {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads, intermediate "
                f"{spec.intermediate_size}, vocab {spec.vocab_size}, parts {'+'.join(spec.parts)} ({spec.format}) -> "
                f"{spec.model_class}{dropped}")

    # ------------------------------------------------------------------------------------------ HF side

    def build_hf(self, spec: BertSpec, options=None):
        from tracer.families.bert.hf import build_empty

        return build_empty(spec)

    def accounted(self, spec: BertSpec) -> dict[str, str]:
        """The heads `--drop_heads` leaves out: no model weight of the chosen class, listed."""
        return {name: f"dropped head (--drop_heads: {spec.model_class} has no place for it)" for name in spec.dropped}

    def output_filter(self, example: Example):
        mask = example.keras["attention_mask"]
        return lambda outputs: list(mask_padding(dict(outputs), mask).items())

    def hf_writer(self, model):
        """The writer to transfer into: ties the MLM decoder at `finish` and checks it."""
        from tracer.families.bert.hf import TiedStateWriter

        return TiedStateWriter(model)

    def processor(self, spec: BertSpec, options=None):
        from tracer.families.bert.tokenizer import build_tokenizer, find_vocab, tokenizer_lower_case

        vocab = find_vocab(spec.source, getattr(options, "vocab_file", None))
        lower = getattr(options, "do_lower_case", None)
        if lower is None and spec.do_lower_case is None and spec.source:
            lower = tokenizer_lower_case(spec.source)
        return build_tokenizer(spec, vocab, lower)

    def example(self, spec: BertSpec, processor, options=None) -> Example:
        import torch

        path = getattr(options, "inputs_file", None)
        if path:
            arrays, reference = _read_npz(os.fspath(path), spec)
            source = f"npz:{path}"
        else:
            texts = getattr(options, "texts", None) or DEFAULT_TEXTS
            length = min(int(getattr(options, "seq_length", None) or 32), spec.max_position_embeddings)
            firsts = [t[0] if isinstance(t, tuple) else t for t in texts]
            seconds = [t[1] if isinstance(t, tuple) else None for t in texts]
            enc = [processor(a, b, padding="max_length", truncation=True, max_length=length,
                             return_token_type_ids=True, return_attention_mask=True) for a, b in zip(firsts, seconds)]
            arrays = {k: np.asarray([e[k] for e in enc], np.int64) for k in _NPZ_INPUTS}
            reference, source = {}, "texts"
        keras = {k: v.astype(np.int32) for k, v in arrays.items()}
        return Example(keras=keras, torch={k: torch.from_numpy(v) for k, v in arrays.items()}, reference=reference,
                       source=source)

    # ------------------------------------------------------------------------------------------ Keras side

    def keras_reference(self, spec: BertSpec, read: Callable[[str], np.ndarray]) -> KerasReference:
        from tracer.families.bert.keras_ref import build_reference

        model, consumed = build_reference(spec, read)
        return KerasReference(model=model, consumed=consumed)

    def plain_reference(self, spec: BertSpec, read: Callable[[str], np.ndarray]) -> KerasReference:
        """The same maths in NumPy (`np_ref.ArrayBert`), reading the weights by the same names while it runs: a
        plain conversion imports no TensorFlow and holds no second copy of the model."""
        from tracer.families.bert.np_ref import ArrayBert

        model = ArrayBert(spec, read)
        return KerasReference(model=model, consumed=list(model.names))

    def stored_transposed(self, spec: BertSpec) -> set[str]:
        """TF1's `output_weights` (NSP, google's classifier and SQuAD heads) are stored (out, in)."""
        model_scope = spec.scope.rsplit("/", 1)[0] + "/"
        return {model_scope + t for t in spec.transposed}

    def keras_outputs(self, reference: KerasReference, example: Example) -> dict[str, np.ndarray]:
        from tracer.families.bert.np_ref import ArrayBert

        if isinstance(reference.model, ArrayBert):
            out = reference.model(example.keras)
        else:
            import tensorflow as tf

            out = reference.model({k: tf.constant(v) for k, v in example.keras.items()}, training=False)
            out = {k: v.numpy() for k, v in out.items()}
        return mask_padding({k: np.asarray(v, np.float32) for k, v in out.items() if k in self.tolerances},
                            example.keras["attention_mask"])

    def hf_outputs(self, model, example: Example) -> dict[str, np.ndarray]:
        from tracer.families.bert.hf import hf_outputs

        return mask_padding(hf_outputs(model, example.torch), example.keras["attention_mask"])


def mask_padding(outputs: dict[str, np.ndarray], attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token outputs (rank 3, and the QA logits) with padded positions set to 0, on both sides alike. What a
    model computes at [PAD] is used by nothing and is float32 noise several ulps wider than at real tokens
    (MiniLM: 1.6e-5 there, 2.5e-6 at real tokens); a masking fault still shows at the real tokens."""
    keep = np.asarray(attention_mask).astype(bool)
    out = {}
    for name, value in outputs.items():
        per_token = value.ndim == 3 or name in ("start_logits", "end_logits")
        if per_token and value.shape[:2] == keep.shape:
            value = np.where(keep.reshape(keep.shape + (1,) * (value.ndim - 2)), value, np.float32(0))
        out[name] = value
    return out


def check_tie(checkpoint, spec: BertSpec) -> None:
    """A checkpoint that keeps a copy of the word embeddings for its MLM decoder (transformers' `tf_model.h5`
    lists them again under `mlm___cls`) must hold the same table there: HF's decoder is tied to the embeddings."""
    if "mlm" not in spec.used_parts:
        return
    word = [n for n, v in checkpoint.weights.items()
            if (canonical(n, checkpoint.format) or ("",))[0] == "bert/embeddings/word_embeddings/weight"]
    copies = [v for v in checkpoint.set_aside if word and v.name == word[0]]
    if not copies:
        return
    table = checkpoint.read(word[0])
    for copy in copies:
        if not np.array_equal(checkpoint.read_variable(copy), table):
            raise ConversionError(f"{checkpoint.path}: the MLM decoder's copy of the word embeddings ({copy.key}) "
                                  f"differs from the table itself ({checkpoint.weights[word[0]].key}), so the decoder "
                                  f"is not tied; {spec.model_class}'s decoder is, so it cannot hold this model; "
                                  "convert without the MLM head (BertModel, --drop_heads)")


def _read_npz(path: str, spec: BertSpec) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """input_ids (N, L) required; attention_mask (ones) and token_type_ids (zeros) optional; arrays named like an
    output (`last_hidden_state`, `logits`, ...) are the original's outputs. Anything else is an error."""
    if not os.path.isfile(path):
        raise BadInputError(f"npz {path}: no such file; check the --inputs path")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, AttributeError) as err:
        raise BadInputError(f"npz {path}: cannot be read as .npz ({err}); write it with np.savez(path, "
                            "input_ids=..., attention_mask=..., token_type_ids=...)") from err
    unknown = sorted(set(arrays) - set(_NPZ_INPUTS) - set(OUTPUTS))
    if unknown:
        raise BadInputError(f"npz {path}: unknown key(s) {unknown}; allowed {list(_NPZ_INPUTS)} and outputs "
                            f"{list(OUTPUTS)}: rename or remove them")
    if "input_ids" not in arrays:
        raise BadInputError(f"npz {path}: no input_ids; add an (N, seq) integer array input_ids")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[0] == 0:
        raise BadInputError(f"npz {path}: input_ids must be a non-empty (N, seq) integer array, got {ids.dtype} "
                            f"{ids.shape}")
    if ids.shape[1] > spec.max_position_embeddings:
        raise BadInputError(f"npz {path}: sequences of {ids.shape[1]} tokens, longer than the model's "
                            f"{spec.max_position_embeddings} positions; shorten them")
    out = {"input_ids": ids.astype(np.int64),
           "attention_mask": arrays.get("attention_mask", np.ones_like(ids)).astype(np.int64),
           "token_type_ids": arrays.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)}
    for key, limit in (("input_ids", spec.vocab_size), ("token_type_ids", spec.type_vocab_size),
                       ("attention_mask", 2)):
        a = out[key]
        if a.shape != ids.shape:
            raise BadInputError(f"npz {path}: {key} has shape {a.shape}, input_ids {ids.shape}; they must match")
        if a.min() < 0 or a.max() >= limit:
            raise BadInputError(f"npz {path}: {key} must lie in 0..{limit - 1}, got {a.min()}..{a.max()}")
    reference = {k: np.asarray(arrays[k], np.float32) for k in OUTPUTS if k in arrays}
    return out, reference
