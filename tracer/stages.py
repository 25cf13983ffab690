"""The stages both conversions run, in order, and what they share.

`pipeline.convert` (ALIGN) and `family_pipeline.convert_family` (every other family) are each a list of stage
functions of one state object (a `Conversion`), run by `run_stages`:

  read     the checkpoint opened, its weights' names and shapes, the spec derived, the mapping table read
  build    the inputs and the HF model built (a family also builds its reference model)
  copy     the weights copied into the HF model: straight from the checkpoint, or by the trace (which pairs,
           maps and compares the layers as it copies them); `--mapping_out` written
  compare  the outputs compared; the result made
  report   traced: the diagnosis and the report written; conflicts the table kept fail the run here
  check    the verdict: a conversion that misses its tolerances fails the run here
  save     the verified save and the push (with --save_model / --push_to_hub)

`stop_after=` one of these names returns the state as it stands after that stage (tests inspect it); the
checkpoint is then still open where the stage that closes it has not run (`Conversion.close`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tracer.errors import BadInputError

STAGES = ("read", "build", "copy", "compare", "report", "check", "save")


@dataclass
class Conversion:
    """What a conversion's stages have made so far; each pipeline adds its own fields."""

    options: object  # `pipeline.ConvertOptions`
    timings: dict[str, float] = field(default_factory=dict)
    stopped_after: str | None = None  # the stage `stop_after` stopped after
    mode: str = "table"  # the mapping: table | infer | auto (`mapping_mode`)
    checkpoint: object = None  # `io.checkpoint`'s reader, open from read to compare/check
    shapes: dict = field(default_factory=dict)  # checkpoint weight -> shape
    spec: object = None
    table: object = None  # `mapping.WeightMap` from --mapping_file or the rules; None with --mapping infer
    processor: object = None
    hf_model: object = None
    entries: list = field(default_factory=list)  # the mapping in use, once copied
    coverage: object = None  # `transfer.Coverage`
    parity: object = None
    result: object = None  # the pipeline's result, once compared

    @property
    def saving(self) -> bool:
        """A push uploads the saved, reloaded and checked folder: either flag saves."""
        return bool(self.options.save_model or self.options.push_to_hub)

    @property
    def nothing_saved(self) -> str:
        """What a failure's message adds where the run would have saved."""
        return " Nothing was saved." if self.saving else ""

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


def check_stop_after(stop_after: str | None) -> None:
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, not {stop_after!r}")


def run_stages(state: Conversion, stages: dict[str, Callable[[Conversion], None]], stop_after: str | None = None):
    """Run `stages` (name -> function of the state, in `STAGES` order) on `state`: the result, or the state itself
    right after the stage `stop_after`."""
    check_stop_after(stop_after)
    assert tuple(stages) == STAGES, tuple(stages)
    for name, run in stages.items():
        run(state)
        if name == stop_after:
            state.stopped_after = name
            return state
    return state.result


def mapping_mode(options) -> str:
    """--mapping, or its default: auto with --trace, table without; the combinations that cannot work refused."""
    mode = options.mapping or ("auto" if options.trace else "table")
    if mode not in ("table", "infer", "auto"):
        raise BadInputError(f"--mapping must be table, infer or auto, not {mode!r}")
    if mode != "table" and not options.trace:
        raise BadInputError(f"--mapping {mode} infers from a trace: add --trace")
    if mode == "infer" and options.mapping_file:
        raise BadInputError("--mapping infer uses no table: drop --mapping_file, or use --mapping auto")
    return mode


def read_table(options, mode: str, shapes: dict, by_rules: Callable[[], object]):
    """The mapping table: --mapping_file's rows for `shapes`, else the rename rules (`by_rules()`), or None with
    --mapping infer."""
    from tracer.engine.mapping import map_by_file, read_mapping

    if options.mapping_file:
        return map_by_file(shapes, read_mapping(options.mapping_file))
    return by_rules() if mode != "infer" else None


def write_mapping_out(options, entries: list) -> None:
    """--mapping_out, when given (`pipeline.write_mapping_file`)."""
    if options.mapping_out:
        from tracer.pipeline import write_mapping_file

        write_mapping_file(entries, options.mapping_out)


def report_path(options) -> Path:
    """Where a traced run's report goes: --report_dir, or a folder named after the checkpoint under reports/."""
    from tracer.engine.report import default_run_name

    return Path(options.report_dir) if options.report_dir else Path("reports") / default_run_name(
        options.checkpoint_path)


def save_and_push(state: Conversion, family) -> None:
    """The `save` stage: with --save_model or --push_to_hub, the model (float32, as the checkpoint holds it) and
    processor saved, reloaded and checked (`pipeline.save_verified`), with a model card; then the push. The
    result's model becomes the reloaded one. `family`: the card's family (a name or a `Family`)."""
    from tracer.family_pipeline import model_card
    from tracer.progress import stage
    from tracer.pipeline import push, save_verified

    options, result, hf_model = state.options, state.result, state.hf_model
    if state.saving:
        card = model_card(options, family, state.spec, result)
        result.model = None
        if options.float64:  # a float64 trace checks the conversion; the model is the checkpoint's float32
            from tracer.engine.precision import to_float32

            hf_model = to_float32(hf_model)
        result.saved_to, result.model, result.reload_checked = save_verified(
            hf_model, state.processor, Path(options.pytorch_dump_folder_path), options.overwrite, state.timings,
            options.max_shard_size, card=card)
    if options.push_to_hub:
        with stage("push to hub", state.timings):
            result.pushed_to = push(result.saved_to, options)
