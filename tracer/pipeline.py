"""The conversion, stage by stage: checkpoint -> spec -> mapping -> models -> transfer -> compare -> save.

Each stage is a plain function of the modules beside this one; this file only orders them, times them and
decides what to do with their results.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import hf as hf_side
from .checkpoint import open_checkpoint
from .compare import DEFAULT_ATOL, Parity, compare_embeddings, layer_rows, max_abs
from .errors import BadInputError, ConversionError, ParityError, TracerError
from .inputs import (Inputs, build_processor, default_inputs, default_vocab_file, inputs_from_images_and_texts,
                     inputs_from_npz)
from .mapping import Entry, WeightMap, map_by_file, map_by_rules, read_mapping, write_mapping
from .progress import stage
from .rules import ALIGN_RULES
from .spec import AlignSpec, derive_spec
from .transfer import Coverage, transfer

logger = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    checkpoint_path: str = "./weights/model-weights"
    pytorch_dump_folder_path: str = "hf_model"
    save_model: bool = False
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    images: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    inputs_file: str | None = None
    vocab_file: str | None = None  # a vocab.txt or a local tokenizer folder
    mapping_file: str | None = None
    mapping_out: str | None = None
    atol: float = DEFAULT_ATOL
    overwrite: bool = False
    allow_nonfinite: bool = False
    image_size: int = 289
    seq_length: int = 64
    trace: bool = False
    mapping: str | None = None  # table | infer | auto (default: auto with --trace, table without)
    report_dir: str | None = None
    hf_config: list[str] = field(default_factory=list)  # KEY=VALUE overrides of the derived AlignConfig


@dataclass
class ConversionResult:
    spec: AlignSpec
    entries: list[Entry]
    coverage: Coverage
    parity: Parity
    set_aside: int
    timings: dict[str, float]
    saved_to: Path | None = None
    reload_max_abs: float | None = None
    reference_max_abs: dict[str, float] = field(default_factory=dict)  # HF vs the original's outputs, if given
    model: torch.nn.Module | None = field(default=None, repr=False)
    rows: list[dict] = field(default_factory=list)  # per-layer divergence, when traced
    hints: list[str] = field(default_factory=list)  # run-level cause hints
    report: Path | None = None


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse, before any heavy work, a destination we must not or cannot write."""
    if path.exists() and not path.is_dir():
        raise BadInputError(f"output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BadInputError(f"output folder {path} is not empty; pass --overwrite to replace it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise BadInputError(f"the parent folder of {path} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write into {parent} (read-only or no permission)")


def load_inputs(options: ConvertOptions, processor, spec: AlignSpec) -> Inputs:
    if options.inputs_file and (options.images or options.texts):
        raise BadInputError("--inputs gives exact arrays; do not combine it with --image/--text")
    if options.inputs_file:
        return inputs_from_npz(options.inputs_file, seq_length=options.seq_length, image_size=options.image_size,
                               vocab_size=spec.text.vocab_size, type_vocab_size=spec.text.type_vocab_size)
    if options.images or options.texts:
        if not (options.images and options.texts):
            raise BadInputError("give both --image and --text (each repeatable), or neither to use the defaults")
        inputs = inputs_from_images_and_texts(options.images, options.texts, processor)
    else:
        inputs = default_inputs(processor, seq_length=options.seq_length)
    if inputs.input_ids.max() >= spec.text.vocab_size:
        raise BadInputError(f"the tokenizer gives ids up to {inputs.input_ids.max()}, beyond this checkpoint's "
                            f"vocabulary of {spec.text.vocab_size}: pass the --vocab_file it was trained with")
    return inputs


def hf_embed(model: torch.nn.Module, inputs: Inputs) -> dict[str, np.ndarray]:
    """`image_embeds` and `text_embeds` exactly as `AlignModel.forward` computes them, one tower at a time."""
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=inputs.torch_pixel_values()).pooler_output
        text = model.get_text_features(**inputs.torch_text()).pooler_output
    out = {"image_features": image.numpy(), "text_features": text.numpy()}
    out["image_embeds"] = (image / image.norm(p=2, dim=-1, keepdim=True)).numpy()
    out["text_embeds"] = (text / text.norm(p=2, dim=-1, keepdim=True)).numpy()
    return out


def save_atomically(model, processor, destination: Path, overwrite: bool) -> Path:
    """Write into a temporary folder beside the destination and rename it into place only when complete."""
    destination = Path(destination)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.resolve().parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if destination.exists():
            if not overwrite and any(destination.iterdir()):
                raise BadInputError(f"output folder {destination} appeared during the run; not replacing it")
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            destination.rename(old)
            tmp.rename(destination)
            shutil.rmtree(old)
        else:
            tmp.rename(destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def _mode(options: ConvertOptions) -> str:
    mode = options.mapping or ("auto" if options.trace else "table")
    if mode not in ("table", "infer", "auto"):
        raise BadInputError(f"--mapping must be table, infer or auto, not {mode!r}")
    if mode != "table" and not options.trace:
        raise BadInputError(f"--mapping {mode} infers from a trace: add --trace")
    if mode == "infer" and options.mapping_file:
        raise BadInputError("--mapping infer uses no table: drop --mapping_file, or use --mapping auto")
    return mode


def l2_normalize(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


@dataclass
class Traced:
    weight_map: WeightMap
    conflicts: list[str]
    unmapped: list[str]
    coverage: Coverage | None = None  # None: the mapping was incomplete or conflicting, nothing was copied
    keras_out: dict | None = None
    hf_out: dict | None = None
    pairs: list = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def trace(checkpoint, shapes, spec, table, mode, keras_model, hf_model, inputs, options, timings) -> Traced:
    """Record both models, pair their layers, infer and confirm the mapping, copy the weights, compare."""
    from .infer import infer_mapping, reconcile
    from .keras_ref.align import reference_variables
    from .pairing import pair_records
    from .record.keras import record_keras
    from .record.torch import record_torch

    keras_vars = reference_variables(keras_model)
    with stage("assign Keras weights", timings):
        transfer(checkpoint.read, list(shapes), None, None, keras_vars, options.allow_nonfinite)
    with stage("trace Keras", timings):
        keras_records = record_keras(keras_model, inputs)
    with stage("trace HF call order", timings):
        # Shapes and call order only: uninitialised storage and a single example are enough.
        hf_side.materialize_uninitialized(hf_model)
        shape_records, _ = record_torch(hf_model, inputs.head(1), keep_outputs=False)
    with stage("pair and infer", timings):
        pairs = pair_records(keras_records, shape_records)
        inference = infer_mapping(pairs, shapes, hf_side.hf_shapes(hf_model))
        weight_map, conflicts = reconcile(table, inference, mode)
    with stage("copy weights", timings):
        mapped = [e.variable for e in weight_map.entries]
        unmapped = [n for n in shapes if n not in mapped]
        coverage = transfer(lambda n: keras_vars[n].numpy(), list(shapes), weight_map, hf_model,
                            allow_nonfinite=True) if not (conflicts or unmapped) else None
    if coverage is None:
        return Traced(weight_map, conflicts, unmapped)
    with stage("trace HF", timings):
        torch_records, hf_features = record_torch(hf_model, inputs)
        pairs = pair_records(keras_records, torch_records)
    with stage("compare layers", timings):
        rows = layer_rows(pairs, weight_map.entries, spec.vision.block_names())
        mark_mismatches(weight_map.entries, rows)
    keras_features = {"image_features": [r for r in keras_records if r.tower == "vision"][-1].output,
                      "text_features": [r for r in keras_records if r.tower == "text"][-1].output}
    keras_out = {**keras_features, **{k.replace("features", "embeds"): l2_normalize(v)
                                      for k, v in keras_features.items()}}
    hf_out = {**hf_features, **{k.replace("features", "embeds"): l2_normalize(v) for k, v in hf_features.items()}}
    return Traced(weight_map, conflicts, unmapped, coverage, keras_out, hf_out, pairs, rows)


def mark_mismatches(entries: list[Entry], rows: list[dict]) -> None:
    """A `confirmed` entry whose layer's own output does not match is not confirmed: mark it `mismatch`."""
    faulty = {v.split(" -> ")[0] for r in rows if r["status"] == "diverged" for v in r["weights"].split("; ") if v}
    for e in entries:
        if e.status == "confirmed" and e.variable in faulty:
            e.status = "mismatch"


def convert(options: ConvertOptions) -> ConversionResult:
    from .keras_ref.align import build_reference, embed, reference_variables  # heavy: imports TensorFlow

    timings: dict[str, float] = {}
    mode = _mode(options)
    destination = Path(options.pytorch_dump_folder_path)
    if options.save_model:
        check_destination(destination, options.overwrite)

    with stage("read checkpoint", timings):
        checkpoint = open_checkpoint(options.checkpoint_path)
        shapes = checkpoint.shapes()
        logger.info(
            "%s: %d weights, %d optimizer/metric variables set aside",
            options.checkpoint_path, len(shapes), len(checkpoint.set_aside),
        )
        spec = derive_spec(shapes, image_size=options.image_size, seq_length=options.seq_length)
        logger.info("derived: EfficientNet width %s depth %s (%d blocks), BERT %d×%d, projection %d",
                    spec.vision.width_coefficient, spec.vision.depth_coefficient, spec.vision.num_blocks,
                    spec.text.num_layers, spec.text.hidden_size, spec.embed_dim)
        table = None
        if options.mapping_file:
            table = map_by_file(shapes, read_mapping(options.mapping_file))
            if table.stray:
                logger.warning("%d mapping file entries name variables this checkpoint does not have (ignored): %s",
                               len(table.stray), table.stray[:10])
        elif mode != "infer":
            table = map_by_rules(shapes, ALIGN_RULES, spec.vision.block_index())

    with stage("prepare inputs", timings):
        processor = build_processor(options.vocab_file or default_vocab_file(), options.image_size, options.seq_length)
        inputs = load_inputs(options, processor, spec)

    with stage("build Keras reference", timings):
        keras_model = build_reference(spec)
    with stage("build HF model", timings):
        config = hf_side.align_config(spec)
        hf_side.override_config(config, options.hf_config)
        hf_model = hf_side.build_empty(config)

    traced = None
    if options.trace:
        traced = trace(checkpoint, shapes, spec, table, mode, keras_model, hf_model, inputs, options, timings)
        weight_map, coverage, keras_out, hf_out = traced.weight_map, traced.coverage, traced.keras_out, traced.hf_out
        if options.mapping_out:
            write_mapping(weight_map.entries, options.mapping_out)
        if traced.conflicts:
            raise ConversionError(f"{len(traced.conflicts)} mapping conflict(s) between the table and the tracer: "
                                  + "; ".join(traced.conflicts[:10]))
        if coverage is None:
            raise ConversionError(f"{len(traced.unmapped)} checkpoint weight(s) could not be mapped: "
                                  f"{traced.unmapped[:20]}")
    else:
        weight_map = table
        with stage("copy weights", timings):
            coverage = transfer(
                checkpoint.read, list(shapes), weight_map, hf_model,
                keras_variables=reference_variables(keras_model), allow_nonfinite=options.allow_nonfinite,
            )
        if options.mapping_out:
            write_mapping(weight_map.entries, options.mapping_out)
        with stage("run Keras", timings):
            keras_out = embed(keras_model, inputs.pixel_values_nhwc, inputs.input_ids, inputs.attention_mask,
                              inputs.token_type_ids)
        with stage("run HF", timings):
            hf_out = hf_embed(hf_model, inputs)
    temperature = float(checkpoint.read(spec.temperature_name))
    hf_model.config.temperature_init_value = temperature
    parity = compare_embeddings(keras_out, hf_out, temperature, float(hf_model.temperature.detach()), options.atol)
    result = ConversionResult(spec, weight_map.entries, coverage, parity, len(checkpoint.set_aside), timings,
                              model=hf_model, rows=traced.rows if traced else [])
    result.reference_max_abs = {k: max_abs(v, hf_out[k]) for k, v in inputs.reference.items() if k in hf_out}
    checkpoint.close()
    if options.trace:
        with stage("diagnose", timings):
            from .diagnose import diagnose

            result.hints = diagnose(traced.pairs, traced.rows, weight_map.entries, parity)
        with stage("report", timings):
            from .report import default_run_name, write_report

            where = options.report_dir or Path("reports") / default_run_name(options.checkpoint_path)
            result.report = write_report(result, where, options.checkpoint_path)
    if not parity.ok:
        raise ParityError(f"the converted model does not match the checkpoint: {parity.describe()}")
    off = {k: v for k, v in result.reference_max_abs.items() if k.endswith("embeds") and v > options.atol}
    if off:
        raise ParityError(f"the converted model does not match the reference outputs in {inputs.source}: {off}")

    if options.save_model:
        with stage("save", timings):
            result.saved_to = save_atomically(hf_model, processor, destination, options.overwrite)
        with stage("reload check", timings):
            from transformers import AlignModel

            reloaded = AlignModel.from_pretrained(result.saved_to).eval()
            again = hf_embed(reloaded, inputs)
            result.reload_max_abs = max(max_abs(again[k], hf_out[k]) for k in ("image_features", "text_features"))
            if result.reload_max_abs > 0 or float(reloaded.temperature.detach()) != float(hf_model.temperature.detach()):
                raise ParityError(f"the saved model reloads differently (max|Δ| {result.reload_max_abs:.2e})")
    if options.push_to_hub:
        with stage("push to hub", timings):
            push(hf_model, processor, options)
    return result


def push(model, processor, options: ConvertOptions) -> None:
    repo_id = options.hub_repo_id or Path(options.pytorch_dump_folder_path).name
    try:
        model.push_to_hub(repo_id)
        processor.push_to_hub(repo_id)
    except Exception as exc:  # the hub client raises many types; all mean the same to the user
        where = f" (the local copy in {options.pytorch_dump_folder_path} is kept)" if options.save_model else ""
        raise TracerError(f"push to the hub as `{repo_id}` failed: {exc}{where}") from exc
