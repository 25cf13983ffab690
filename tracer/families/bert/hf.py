"""The transformers side of a BERT: `BertConfig` from the spec, the class built on the meta device, tied writing."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import transformers
from transformers import BertConfig

from tracer.engine import transfer as _transfer
from tracer.errors import BadInputError, ConversionError
from tracer.families.bert.spec import HF_CLASSES, BertSpec

StateWriter = _transfer.StateWriter  # wherever the engine keeps it, the writer `transfer` takes


def encoder_fields(spec) -> dict:
    """A BERT encoder's config fields from a spec that has its sizes (a `BertSpec`, ALIGN's `TextSpec`)."""
    return {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "intermediate_size": spec.intermediate_size,
            "max_position_embeddings": spec.max_position_embeddings, "type_vocab_size": spec.type_vocab_size,
            "layer_norm_eps": spec.layer_norm_eps, "pad_token_id": 0}


def bert_config(spec: BertSpec) -> BertConfig:
    """The config transformers saves with the model; `architectures` names the chosen class."""
    kwargs = {}
    if spec.num_labels is not None:
        labels = spec.id2label or {i: f"LABEL_{i}" for i in range(spec.num_labels)}
        kwargs.update(id2label=dict(labels), label2id={v: k for k, v in labels.items()})
    return BertConfig(
        **encoder_fields(spec),
        hidden_act=spec.hidden_act,
        tie_word_embeddings=True,  # the MLM decoder is the embedding table (checked when written)
        architectures=[spec.model_class],
        **kwargs,
    )


def build_empty(spec: BertSpec, model_class: str | None = None) -> torch.nn.Module:
    """The chosen class on the meta device (no memory, no initialisation), in eval mode. The eager attention is
    the plain maths the Keras reference computes (SDPA fuses it differently)."""
    name = model_class or spec.model_class
    if name not in HF_CLASSES:
        raise BadInputError(f"model class {name!r} is not a BERT class this converter builds; choose one of "
                            f"{', '.join(HF_CLASSES)}")
    config = bert_config(spec)
    config._attn_implementation = "eager"
    from tracer.engine.state import build_on_meta

    kwargs = {"add_pooling_layer": spec.pooler} if name == "BertModel" else {}
    return build_on_meta(getattr(transformers, name), config, **kwargs)


def tied_parameters(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameter -> the parameter it is tied to (the MLM decoder's weight and bias), as the class declares."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(keys, Mapping):  # older transformers listed only the tied names
        raise ConversionError(f"this transformers ({transformers.__version__}) declares tied weights as "
                              f"{type(keys).__name__}, not target -> source; use transformers 5")
    state = model.state_dict()
    return {target: source for target, source in keys.items() if target in state and source in state}


class TiedStateWriter(StateWriter):
    """A `StateWriter` that, at `finish`, gives each tied parameter its source's tensor, then ties them as
    transformers does and checks the tie held (same storage, same values) instead of assuming it."""

    def finish(self, describe_missing: Callable[[list[str]], str] | None = None) -> list[str]:
        ties = tied_parameters(self.model)
        tied = {}
        for target, source in ties.items():
            if target in self.written:
                continue
            if source not in self.written:
                raise ConversionError(f"`{target}` is tied to `{source}`, which no checkpoint weight wrote; the "
                                      "checkpoint lacks it: use the complete checkpoint its training saved")
            tied[target] = self.tensor(source)
        if tied:
            self.write(tied)
        derived = super().finish(describe_missing)
        self.model.tie_weights()
        state = dict(self.model.named_parameters(remove_duplicate=False))
        for target, source in ties.items():
            a, b = state.get(target), state.get(source)
            if a is None or b is None or a.data_ptr() != b.data_ptr() or not torch.equal(a, b):
                raise ConversionError(f"`{target}` should be tied to `{source}` but is not after loading; this "
                                      f"transformers ({transformers.__version__}) ties differently from the one "
                                      "tracer supports (5.x)")
        self.refresh()
        return derived


def hf_outputs(model: torch.nn.Module, torch_inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The model's outputs by the reference's names: the base model's `last_hidden_state` (and `pooler_output`),
    and the head's logits (`prediction_logits`, `seq_relationship_logits`, `logits`, `start_logits`, ...)."""
    with torch.inference_mode():
        base = model.bert if hasattr(model, "bert") else model
        seen = []  # the base model's output, caught during the head model's forward: one forward, not two
        hook = base.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            head = model(**torch_inputs, return_dict=True)
        finally:
            hook.remove()
        out = seen[0]
        result = {"last_hidden_state": out.last_hidden_state}
        if getattr(out, "pooler_output", None) is not None:
            result["pooler_output"] = out.pooler_output
        if base is not model:
            for key in ("prediction_logits", "seq_relationship_logits", "logits", "start_logits", "end_logits"):
                if getattr(head, key, None) is not None:
                    result[key] = head[key]
    return {k: v.detach().float().numpy() for k, v in result.items()}
