"""The ALIGN conversion, stage by stage: checkpoint -> spec -> mapping -> models -> transfer -> compare -> save.

Each stage (`stages.STAGES`: read, build, copy, compare, report, check, save) is a function of one
`AlignConversion` that calls the modules beside this one; this file only orders them, times them and decides
what to do with their results. `convert(stop_after=...)` stops after a stage and returns the state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tracer.families.align import hf as hf_side
from tracer.io.checkpoint import open_checkpoint
from tracer.engine.compare import FLOAT32, Tolerances, max_abs
from tracer.families.align.blocks import align_blocks
from tracer.families.align.parity import Parity, compare_embeddings, with_embeds
from tracer.errors import BadInputError, ConversionError, ParityError, PushError
from tracer.families.align.inputs import (IMAGE_SIZE, Inputs, build_processor, default_inputs, default_vocab_file,
                                          inputs_from_images_and_texts, inputs_from_npz)
from tracer.engine.mapping import Entry, map_by_rules, write_mapping
from tracer.memory import trim
from tracer.output import preflight, write_file_atomically, write_folder_atomically
from tracer.progress import stage
from tracer.stages import (Conversion, mapping_mode, read_table, report_path, run_stages, save_and_push,
                           write_mapping_out)
from tracer.families.align.rules import ALIGN_RULES
from tracer.families.align.spec import AlignSpec, derive_spec
from tracer.families.align.trace import AlignRun, trace
from tracer.engine.transfer import Coverage, transfer
from tracer.engine.row import LayerRow
from tracer.engine.hint import Hint

logger = logging.getLogger(__name__)
DEFAULT_ACTIVATION_BUDGET_MB = 512
DEFAULT_SHARD_SIZE = "2GB"


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
    atol: float | None = None  # max|Δ| on the embeddings; default: the run's precision's (`compare.Tolerances`)
    overwrite: bool = False
    allow_nonfinite: bool = False
    image_size: int | None = None  # the family's default (ALIGN 289, an EfficientNet variant's own)
    seq_length: int = 64
    model_type: str | None = None  # align | efficientnet | bert (default: detected from the checkpoint)
    labels: str | None = None  # EfficientNet: a file of class names, one per line
    model_class: str | None = None  # BERT: the transformers class to convert into (default: from the heads)
    drop_heads: bool = False  # BERT: convert without the heads the chosen class has no place for
    trace: bool = False
    mapping: str | None = None  # table | infer | auto (default: auto with --trace, table without)
    report_dir: str | None = None
    hf_config: list[str] = field(default_factory=list)  # KEY=VALUE overrides of the derived AlignConfig
    activation_budget_mb: float = DEFAULT_ACTIVATION_BUDGET_MB  # --trace: activation memory while comparing
    max_shard_size: str = DEFAULT_SHARD_SIZE  # safetensors shards of the saved model
    float64: bool = False  # --trace: both models in float64, compared with float64 tolerances; saved in float32


@dataclass
class ConversionResult:
    spec: AlignSpec
    entries: list[Entry]
    coverage: Coverage
    parity: Parity
    set_aside: int
    timings: dict[str, float]
    saved_to: Path | None = None
    reload_checked: int = 0  # tensors of the saved model checked bit for bit after reloading
    reference_max_abs: dict[str, float] = field(default_factory=dict)  # HF vs the original's outputs, if given
    model: torch.nn.Module | None = field(default=None, repr=False)
    rows: list[LayerRow] = field(default_factory=list)  # per-layer divergence, when traced
    sensitivity: object = None  # `engine.sensitivity.Sensitivity`, when traced and measured
    hints: list[Hint] = field(default_factory=list)  # run-level cause hints
    report: Path | None = None
    pushed_to: str | None = None  # the hub repository, after --push_to_hub
    tolerances: Tolerances = FLOAT32  # the run's thresholds (its precision's)
    title: str = "ALIGN conversion report"
    part_titles: dict = field(default_factory=lambda: {"vision": "Image tower (EfficientNet)",
                                                       "text": "Text tower (BERT)"})


def load_inputs(options: ConvertOptions, processor, spec: AlignSpec) -> Inputs:
    if options.inputs_file and (options.images or options.texts):
        raise BadInputError("--inputs gives exact arrays; do not combine it with --image/--text")
    if options.inputs_file:
        return inputs_from_npz(options.inputs_file, seq_length=options.seq_length, image_size=options.image_size or IMAGE_SIZE,
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
    """Both towers' features, one forward each as `AlignModel.forward` runs them, and their L2-normalised
    `*_embeds` (normalised as the traced run's are)."""
    return with_embeds({k: v.numpy() for k, v in hf_side.tower_features(model, inputs).items()})


SAVE_CONFIG_IGNORED = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def _config_leaves(value, prefix: str = "") -> dict:
    """A config as flat `section.key -> value`, without the keys saving is free to change."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for k, v in value.items():
        if k not in SAVE_CONFIG_IGNORED:
            out.update(_config_leaves(v, f"{prefix}.{k}" if prefix else k))
    return out


def save_verified(model, processor, destination: Path, overwrite: bool, timings: dict,
                  max_shard_size: str = DEFAULT_SHARD_SIZE, card: str | None = None) -> tuple[Path, torch.nn.Module, int]:
    """Save model and processor into a temporary folder beside `destination`, reload it from there and check it
    (the same tensor names, every tensor bit for bit by checksum, the same config); only then rename it into place.

    The in-memory model's weights are freed before the reload, so one model's worth of memory is held at a time:
    returns the folder, the reloaded model (the one on disk, which is what the caller gets) and the number of
    tensors checked. `card`: the model card (README.md) written beside the weights."""
    from tracer.engine.transfer import tensor_checksum

    model_class = type(model)

    with stage("save", timings):
        expected = {k: tensor_checksum(v.detach().numpy()) for k, v in model.state_dict().items()}
        config = _config_leaves(model.config)
    checked: dict = {}

    def fill(tmp: Path) -> None:
        with stage("save", timings):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            processor.save_pretrained(tmp)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")

    def verify(tmp: Path) -> None:
        with stage("reload check", timings):
            model.to("meta")  # free the weights: the reloaded model takes their place
            trim()
            reloaded = model_class.from_pretrained(tmp).eval()
            got = {k: tensor_checksum(v.detach().numpy()) for k, v in reloaded.state_dict().items()}
            differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
            again = _config_leaves(reloaded.config)
            config_differ = sorted(k for k in again.keys() | config.keys() if config.get(k) != again.get(k))
            if differ or config_differ:
                config_changes = [(k, config.get(k), again.get(k)) for k in config_differ[:5]]
                raise ParityError(f"the saved model reloads differently ({len(differ)} tensor(s) differ: "
                                  f"{differ[:10]}; config {config_changes}); nothing was written to "
                                  f"{destination}: this is a bug in saving, please report it")
            checked.update(model=reloaded, tensors=len(got))

    saved = write_folder_atomically(destination, fill, overwrite, verify)
    return saved, checked["model"], checked["tensors"]


@dataclass
class AlignConversion(Conversion):
    """An ALIGN conversion's state between its stages (`stages.STAGES`); `convert(stop_after=...)` returns it."""

    keras: object = None  # with --trace, where the Keras reference runs (`keras_side.KerasProcess`), or None
    tolerances: Tolerances = FLOAT32
    inputs: Inputs | None = None
    traced: object = None  # `trace.Traced`, with --trace
    weight_map: object = None  # `mapping.WeightMap` in use
    hf_out: dict | None = None  # the HF model's features and embeddings on the inputs
    reference: dict | None = None  # what they are compared with: the Keras model's, the given references or None
    against: str = "none"  # keras | reference | none

    @property
    def atol(self) -> float:
        return self.tolerances.embeds_max_abs


def convert(options: ConvertOptions, keras=None, stop_after: str | None = None):
    """`keras`: with `--trace`, where the Keras reference runs (a `keras_side.KerasProcess` the caller started
    before importing torch); by default in this process. Returns the `ConversionResult`, or with `stop_after` (a
    stage name, `stages.STAGES`) the `AlignConversion` right after that stage."""
    stages = {"read": _read, "build": _build, "copy": _copy, "compare": _compare, "report": _report, "check": _check,
              "save": _save}
    return run_stages(AlignConversion(options, keras=keras), stages, stop_after)


def _read(s: AlignConversion) -> None:
    """The run's checks, then the checkpoint: its weights, the spec derived from their shapes, the mapping table."""
    options = s.options
    s.mode = mapping_mode(options)
    s.tolerances = Tolerances.for_run(options.float64, options.atol)
    preflight(options)  # output folders and files, before any heavy work
    if options.push_to_hub and (problem := hub_problem()):
        logger.warning("the push will fail after the model is saved to %s: %s",
                       Path(options.pytorch_dump_folder_path), problem)

    with stage("read checkpoint", s.timings):
        s.checkpoint = checkpoint = open_checkpoint(options.checkpoint_path)
        s.shapes = shapes = checkpoint.shapes()
        logger.info(
            "%s: %d weights, %d optimizer/metric variables set aside",
            options.checkpoint_path, len(shapes), len(checkpoint.set_aside),
        )
        s.spec = spec = derive_spec(shapes, image_size=options.image_size or IMAGE_SIZE, seq_length=options.seq_length)
        logger.info("derived: EfficientNet width %s depth %s (%d blocks), BERT %d×%d, projection %d",
                    spec.vision.width_coefficient, spec.vision.depth_coefficient, spec.vision.num_blocks,
                    spec.text.num_layers, spec.text.hidden_size, spec.embed_dim)
        s.table = table = read_table(options, s.mode, shapes,
                                     lambda: map_by_rules(shapes, ALIGN_RULES, spec.vision.block_index()))
        if options.mapping_file and table.stray:
            logger.warning("%d mapping file entries name variables this checkpoint does not have (ignored): %s",
                           len(table.stray), table.stray[:10])


def _build(s: AlignConversion) -> None:
    """The processor and the inputs, the empty HF model (float64 with --float64)."""
    options = s.options
    with stage("prepare inputs", s.timings):
        s.processor = build_processor(options.vocab_file or default_vocab_file(), options.image_size or IMAGE_SIZE,
                                      options.seq_length)
        s.inputs = load_inputs(options, s.processor, s.spec)

    with stage("build HF model", s.timings):
        config = hf_side.align_config(s.spec)
        hf_side.override_config(config, options.hf_config)
        s.hf_model = hf_side.build_empty(config)
        if options.float64:  # on the meta device: the weights arrive cast to float64
            from tracer.engine.precision import to_float64

            s.hf_model = to_float64(s.hf_model)


def _copy(s: AlignConversion) -> None:
    """With --trace, the traced run (`trace.trace`: mapped, copied and compared tower by tower); without, the
    table's weights straight from the checkpoint. Then --mapping_out."""
    options = s.options
    if options.trace:
        s.traced = traced = trace(AlignRun(s.checkpoint, s.shapes, s.spec, s.table, s.mode, s.hf_model, s.inputs,
                                           options, s.timings, keras=s.keras))
        s.weight_map, s.coverage, s.reference, s.hf_out = traced.weight_map, traced.coverage, traced.keras_out, \
            traced.hf_out
        s.against = "keras"
        write_mapping_out(options, s.weight_map.entries)
        if s.coverage is None:
            raise ConversionError(
                f"{len(traced.unmapped)} checkpoint weight(s) have no place in AlignModel: {traced.unmapped[:20]}; "
                "the checkpoint holds weights the ALIGN architecture does not (is it a coyo-align ALIGN "
                "checkpoint?), or map them explicitly in a --mapping_file")
    else:  # no Keras model: the weights straight from the checkpoint, the outputs against the given references
        s.weight_map = s.table
        with stage("copy weights", s.timings):
            s.coverage = transfer(s.checkpoint.read, list(s.shapes), s.weight_map, s.hf_model,
                                  allow_nonfinite=options.allow_nonfinite, target="AlignModel",
                                  source="coyo-align ALIGN")
        write_mapping_out(options, s.weight_map.entries)
    s.entries = s.weight_map.entries


def _compare(s: AlignConversion) -> None:
    """Without --trace, the HF model run and compared with the given reference outputs (if any); the temperature
    carried over; the embeddings' parity; the result. The checkpoint is closed."""
    options, inputs, hf_model, traced = s.options, s.inputs, s.hf_model, s.traced
    if not options.trace:
        with stage("run HF", s.timings):
            s.hf_out = hf_embed(hf_model, inputs)
        s.reference = {k: inputs.reference[k] for k in ("image_embeds", "text_embeds")} if all(
            k in inputs.reference for k in ("image_embeds", "text_embeds")) else None
        s.against = "reference" if s.reference else "none"
        if s.reference is None:
            logger.warning("the converted model's outputs were not compared with the original's: give --inputs "
                           "with reference outputs, or run with --trace to compare it with the Keras model layer "
                           "by layer")
    temperature = float(s.checkpoint.read(s.spec.temperature_name))
    hf_model.config.temperature_init_value = temperature
    s.parity = compare_embeddings(s.reference, s.hf_out, temperature, float(hf_model.temperature.detach()), s.atol,
                                  s.against)
    s.result = result = ConversionResult(s.spec, s.entries, s.coverage, s.parity, len(s.checkpoint.set_aside),
                                         s.timings, model=hf_model, rows=traced.rows if traced else [],
                                         tolerances=s.tolerances, sensitivity=traced.sensitivity if traced else None)
    result.reference_max_abs = {k: max_abs(v, s.hf_out[k]) for k, v in inputs.reference.items() if k in s.hf_out}
    s.close()


def _report(s: AlignConversion) -> None:
    """With --trace: the cause hints, the report; then conflicts the table kept fail the run."""
    options, traced, result = s.options, s.traced, s.result
    if not options.trace:
        return
    with stage("diagnose", s.timings):
        from tracer.engine.diagnose import diagnose

        result.hints = diagnose(traced.pairs, traced.rows, s.entries, s.parity,
                                align_blocks(s.spec.vision.block_names()))
    with stage("report", s.timings):
        from tracer.engine.report import write_report

        result.report = write_report(result, report_path(options), options.checkpoint_path)
    unresolved = [c for c in traced.conflicts if not c.resolved]
    if unresolved:  # the table as given, now that the report shows what it does
        from tracer.family_pipeline import conflict_message

        raise ConversionError(conflict_message(unresolved, result.report, options.mapping_file))


def _check(s: AlignConversion) -> None:
    """The verdict: a miss of the Keras model (or of the reference outputs given) fails the run."""
    from tracer.engine.report import verdict
    from tracer.engine.sensitivity import VERDICT

    options, result, parity, atol, nothing = s.options, s.result, s.parity, s.atol, s.nothing_saved
    conditioned = verdict(result.rows, parity, result.sensitivity)[0] == VERDICT
    if conditioned:
        logger.warning("the outputs miss atol %g by what the original model itself moves under float32 round-off "
                       "of this input: ill-conditioned input, not a fault of the conversion (see %s)", atol,
                       result.report)
    if not parity.ok and not conditioned:  # NaN metrics fail too: every comparison with NaN is False
        look = (f"the per-layer report in {result.report} shows where it diverges" if result.report
                else "rerun with --trace to find the first layer that diverges")
        raise ParityError(f"the converted model does not match the checkpoint: {parity.describe()}; {look}.{nothing}",
                          result)
    diverged = [r for r in result.rows if r.diverged]
    if diverged:  # within tolerance at the end, but a layer computes something else: not silent
        first = diverged[0]
        raise ParityError(f"{len(diverged)} layer(s) diverge although the embeddings are within atol "
                          f"{atol:g}; the first is {first.keras_layer or first.hf_module} in "
                          f"{first.block} (see {result.report}).{nothing}", result)
    # Reference outputs come from the original in float32: a float64 run is held to the float32 tolerance there.
    ref_atol = options.atol if options.atol is not None else FLOAT32.embeds_max_abs
    off = {k: v for k, v in result.reference_max_abs.items() if k.endswith("embeds") and not v <= ref_atol}
    if off:
        raise ParityError(f"the converted model matches the Keras reference but not the reference outputs in "
                          f"{s.inputs.source}: {off} (atol {ref_atol:g}); those outputs were computed from other "
                          f"weights or other inputs, or the reference model differs from the original.{nothing}",
                          result)


def _save(s: AlignConversion) -> None:
    save_and_push(s, "align")


def write_mapping_file(entries: list[Entry], path: str) -> Path:
    """`--mapping_out`, written beside and renamed into place."""
    return write_file_atomically(path, lambda tmp: write_mapping(entries, tmp))


def hub_problem() -> str | None:
    """Why a push cannot work, known without touching the network; None when it may."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so nothing can be pushed to the hub: unset it"
    if not get_token():
        return "no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN"
    return None


def push(folder: Path, options: ConvertOptions) -> str:
    """Upload the saved (and reload-checked) folder; `PushError` (exit 4) on any failure, the folder is kept."""
    repo_id = options.hub_repo_id or Path(options.pytorch_dump_folder_path).resolve().name
    retry = (f"the converted model is saved and kept in {folder}; upload it later with `hf upload {repo_id} "
             f"{folder}`")
    problem = hub_problem()
    if problem:  # fail fast, without trying the network
        raise PushError(f"cannot push to the hub as `{repo_id}`: {problem}; {retry}")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          commit_message="ALIGN converted from a coyo-align checkpoint")
    except Exception as exc:  # the hub client raises many types; all mean the same to the user
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PushError(f"push to the hub as `{repo_id}` failed ({type(exc).__name__}: {cause}); check the "
                        f"network, the token's write access and the repository name; {retry}") from exc
    return repo_id
