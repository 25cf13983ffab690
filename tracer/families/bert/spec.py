"""Derive a BERT's description (sizes, heads, the class to convert to) from its config file and weight shapes.

The config (`bert_config.json` beside a TF1 checkpoint, `config.json` beside a `tf_model.h5`) is read when present
and every size it states is checked against the shapes; without one, everything comes from the shapes (heads =
hidden // 64, as google-research's and most BERTs have it).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from tracer.errors import BadInputError, ConversionError
from tracer.families.naming import BERT_LAYER
from tracer.families.bert.names import canonical, part_of

HEAD_SIZE = 64
CONFIG_FILES = ("config.json", "bert_config.json")
DEFAULT_LAYER_NORM_EPS = 1e-12  # google-research's layer_norm and BertConfig's default

# HF class -> (parts it must have, whether it has a pooler: True / False / None = as the checkpoint has it).
HF_CLASSES: dict[str, tuple[frozenset[str], bool | None]] = {
    "BertModel": (frozenset(), None),
    "BertForPreTraining": (frozenset({"mlm", "nsp"}), True),
    "BertForMaskedLM": (frozenset({"mlm"}), False),
    "BertForNextSentencePrediction": (frozenset({"nsp"}), True),
    "BertForSequenceClassification": (frozenset({"classifier"}), True),
    "BertForTokenClassification": (frozenset({"classifier"}), False),
    "BertForQuestionAnswering": (frozenset({"qa"}), False),
}
# transformers 4 TF class -> its Keras model scope (the first component of every variable name).
KERAS_SCOPES = {
    "TFBertModel": "tf_bert_model",
    "TFBertForPreTraining": "tf_bert_for_pre_training",
    "TFBertForMaskedLM": "tf_bert_for_masked_lm",
    "TFBertForNextSentencePrediction": "tf_bert_for_next_sentence_prediction",
    "TFBertForSequenceClassification": "tf_bert_for_sequence_classification",
    "TFBertForTokenClassification": "tf_bert_for_token_classification",
    "TFBertForQuestionAnswering": "tf_bert_for_question_answering",
}
_HEAD_PARTS = ("mlm", "nsp", "classifier", "qa")
_LAYER = re.compile(f"^bert/encoder/{BERT_LAYER}/")


@dataclass(frozen=True)
class BertSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
    hidden_act: str = "gelu"
    # What the checkpoint holds.
    format: str = "h5"  # the reader's format: tf1 | tf | h5
    parts: tuple[str, ...] = ("base",)  # base, pooler, mlm, nsp, classifier, qa
    task: str | None = None  # classifier's kind: "sequence" | "token"
    num_labels: int | None = None
    id2label: dict | None = field(default=None, compare=False)
    do_lower_case: bool | None = None
    # What it is converted to.
    model_class: str = "BertModel"
    pooler: bool = True  # the chosen class has (and gets) a pooler
    dropped: tuple[str, ...] = ()  # checkpoint weights of parts the chosen class has no place for (drop_heads)
    transposed: tuple[str, ...] = ()  # canonical names stored (out, in) in the checkpoint (TF1's output_weights)
    seq_length: int = 128
    config: dict = field(default_factory=dict, compare=False, repr=False)  # the config file as read
    config_path: str | None = field(default=None, compare=False)
    source: str = field(default="", compare=False)  # the checkpoint's path (its vocab.txt lies beside it)

    @property
    def keras_class(self) -> str:
        """transformers 4's TF class of the reference: the chosen class's."""
        return "TF" + self.model_class

    @property
    def scope(self) -> str:
        """The main layer's variable scope in the reference (`tf_bert_model/bert`)."""
        return f"{KERAS_SCOPES[self.keras_class]}/bert"

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def used_parts(self) -> tuple[str, ...]:
        needs, _ = HF_CLASSES[self.model_class]
        return tuple(p for p in self.parts if p == "base" or (p == "pooler" and self.pooler) or p in needs)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("config")
        return out


def find_config(checkpoint_path: str, explicit: str | None = None) -> tuple[dict, str | None]:
    """The config dict beside the checkpoint (or the one given), and where it came from; ({}, None) if none."""
    if explicit:
        candidates = [Path(explicit)]
        if not candidates[0].is_file():
            raise BadInputError(f"config file {explicit} does not exist; pass the bert_config.json / config.json "
                                "saved with the checkpoint")
    else:
        base = Path(checkpoint_path)
        folder = base if base.is_dir() else base.parent
        candidates = [folder / name for name in CONFIG_FILES]
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise BadInputError(f"{path}: cannot be read as JSON ({err}); fix or remove it (the sizes can be "
                                    "derived from the weights alone)") from err
            if not isinstance(data, dict):
                raise BadInputError(f"{path}: holds {type(data).__name__}, not a JSON object; fix or remove it")
            return data, str(path)
    return {}, None


def canonical_shapes(shapes: Mapping[str, Sequence[int]], format: str) -> tuple[dict[str, tuple[int, ...]],
                                                                                  dict[str, str], list[str], set[str]]:
    """(canonical name -> shape, canonical -> checkpoint name, checkpoint names that are no BERT weight, canonical
    names stored transposed, with their shapes given as the reference's)."""
    out, origin, foreign, transposed = {}, {}, [], set()
    for name, shape in shapes.items():
        hit = canonical(name, format)
        if hit is None:
            foreign.append(name)
            continue
        canon, flipped = hit
        if canon in out:
            raise ConversionError(f"`{origin[canon]}` and `{name}` are both the BERT weight `{canon}`; the "
                                  "checkpoint holds two models' weights: convert one model's checkpoint")
        out[canon] = tuple(reversed(tuple(shape))) if flipped else tuple(shape)
        origin[canon] = name
        if flipped:
            transposed.add(canon)
    return out, origin, foreign, transposed


def _need(shapes: Mapping[str, tuple[int, ...]], canon: str) -> tuple[int, ...]:
    if canon not in shapes:
        raise ConversionError(f"no `{canon}` in the checkpoint: it is not a complete BERT (or not a BERT); use the "
                              "checkpoint its training saved")
    return shapes[canon]


def _check(config: dict, key: str, found: int, where: str, config_path: str | None) -> None:
    if key in config and config[key] is not None and int(config[key]) != int(found):
        raise ConversionError(f"{config_path} says {key} = {config[key]}, but the checkpoint's {where} gives "
                              f"{found}: the config belongs to another model; use the config saved with this "
                              "checkpoint, or remove it to derive every size from the weights")


def derive_spec(shapes: Mapping[str, Sequence[int]], format: str, config: dict | None = None,
                config_path: str | None = None, model_class: str | None = None, drop_heads: bool = False,
                seq_length: int | None = None, source: str = "") -> BertSpec:
    """The spec of the BERT whose weights have these shapes (checkpoint names, as the reader lists them)."""
    config = dict(config or {})
    canon, origin, foreign, transposed = canonical_shapes(shapes, format)
    if foreign:
        raise ConversionError(f"{len(foreign)} checkpoint weight(s) are no BERT weight: {sorted(foreign)[:10]}; is "
                              "it a BERT checkpoint (google-research TF1 or transformers' tf_model.h5)?")
    vocab, hidden = _need(canon, "bert/embeddings/word_embeddings/weight")
    positions = _need(canon, "bert/embeddings/position_embeddings/embeddings")[0]
    types = _need(canon, "bert/embeddings/token_type_embeddings/embeddings")[0]
    layers = sorted({int(m.group("layer")) for n in canon if (m := _LAYER.match(n))})
    if not layers:
        raise ConversionError("no encoder layer (`bert/encoder/layer_*`) in the checkpoint: it is not a complete "
                              "BERT; use the checkpoint its training saved")
    if layers != list(range(len(layers))):
        raise ConversionError(f"encoder layers {layers} are not numbered 0..{len(layers) - 1}: layers are missing; "
                              "use the complete checkpoint")
    intermediate = _need(canon, "bert/encoder/layer_._0/intermediate/dense/kernel")[1]

    word = origin["bert/embeddings/word_embeddings/weight"]
    checks = (("vocab_size", vocab, f"`{word}` rows"), ("hidden_size", hidden, f"`{word}` columns"),
              ("num_hidden_layers", len(layers), "number of encoder layers"),
              ("intermediate_size", intermediate, "intermediate kernel columns"),
              ("max_position_embeddings", positions, "position table rows"),
              ("type_vocab_size", types, "token-type table rows"))
    for key, found, where in checks:
        _check(config, key, found, where, config_path)
    heads = int(config.get("num_attention_heads") or max(1, hidden // HEAD_SIZE))
    if hidden % heads:
        raise ConversionError(f"hidden size {hidden} is not a multiple of {heads} attention heads"
                              + (f" ({config_path})" if config_path else " (derived as hidden // 64)")
                              + "; give the config file saved with the checkpoint")

    parts = {"base"} | {part_of(n) for n in canon}
    num_labels = task = None
    for head, kernel in (("classifier", "classifier/kernel"), ("qa", "qa_outputs/kernel")):
        if head in parts:
            num_labels = _need(canon, kernel)[1]
    architectures = [a.removeprefix("TF") for a in config.get("architectures") or []]
    if "classifier" in parts:
        task = "token" if "BertForTokenClassification" in architectures else (
            "sequence" if "BertForSequenceClassification" in architectures or "pooler" in parts else "token")
    id2label = config.get("id2label")
    if id2label is not None and num_labels is not None and len(id2label) != num_labels:
        raise ConversionError(f"{config_path} has {len(id2label)} labels (id2label), but the checkpoint's head has "
                              f"{num_labels} outputs: the config belongs to another model; use the one saved with "
                              "this checkpoint")

    chosen = model_class or _default_class(parts, task, architectures)
    if chosen not in HF_CLASSES:
        raise BadInputError(f"model class {chosen!r} is not a BERT class this converter builds; choose one of "
                            f"{', '.join(HF_CLASSES)}")
    needs, with_pooler = HF_CLASSES[chosen]
    missing = sorted(needs - parts)
    if missing:
        raise ConversionError(f"{chosen} needs the {', '.join(missing)} head(s), which the checkpoint lacks (it has "
                              f"{', '.join(sorted(parts))}): their weights would be random; choose a class the "
                              f"checkpoint fills, e.g. {_default_class(parts, task, architectures)}")
    pooler = ("pooler" in parts) if with_pooler is None else with_pooler
    if pooler and "pooler" not in parts:
        raise ConversionError(f"{chosen} has a pooler, which the checkpoint lacks: its weights would be random; "
                              f"choose a class without one (BertForMaskedLM, BertForTokenClassification, ...)")
    extra = sorted(p for p in parts if p not in needs and p != "base" and not (p == "pooler" and pooler))
    dropped: tuple[str, ...] = ()
    if extra:
        names = sorted(origin[n] for n in canon if part_of(n) in extra)
        if not drop_heads:
            raise ConversionError(f"the checkpoint holds the {', '.join(extra)} part(s) ({len(names)} weights, e.g. "
                                  f"`{names[0]}`), which {chosen} has no place for; choose a class that has them "
                                  f"({_default_class(parts, task, architectures)}), or pass drop_heads "
                                  "(--drop_heads) to convert without them (they are listed)")
        dropped = tuple(names)
    eps = config.get("layer_norm_eps", DEFAULT_LAYER_NORM_EPS)
    return BertSpec(
        vocab_size=vocab, hidden_size=hidden, num_layers=len(layers), num_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=positions, type_vocab_size=types,
        layer_norm_eps=float(eps), hidden_act=str(config.get("hidden_act", "gelu")), format=format,
        parts=tuple(p for p in ("base", "pooler", *_HEAD_PARTS) if p in parts), task=task, num_labels=num_labels,
        id2label={int(k): v for k, v in id2label.items()} if isinstance(id2label, dict) else None,
        do_lower_case=config.get("do_lower_case"), model_class=chosen, pooler=pooler, dropped=dropped,
        transposed=tuple(sorted(transposed)), seq_length=int(seq_length or 128), config=config,
        config_path=config_path, source=source,
    )


def _default_class(parts: set[str] | Sequence[str], task: str | None, architectures: Sequence[str]) -> str:
    for name in architectures:
        if name in HF_CLASSES and HF_CLASSES[name][0] <= set(parts):
            return name
    if "mlm" in parts and "nsp" in parts:
        return "BertForPreTraining"
    if "mlm" in parts:
        return "BertForMaskedLM"
    if "qa" in parts:
        return "BertForQuestionAnswering"
    if "classifier" in parts:
        return "BertForTokenClassification" if task == "token" else "BertForSequenceClassification"
    if "nsp" in parts:
        return "BertForNextSentencePrediction"
    return "BertModel"

