"""The conversion for a family that plugs in through the adapter interface (`tracer.families.base.Family`):
checkpoint -> spec -> HF model -> rules -> Keras reference -> (trace | copy and compare) -> verified save.

The family says what its checkpoints hold and how they map; this file orders the stages and is strict about
them: every checkpoint weight used by the Keras reference and mapped (or accounted for by the family, such as a
Normalization layer's statistics that become the image processor), every HF tensor written, outputs compared
with the family's tolerances.

The stages are those of the ALIGN conversion (`stages.STAGES`), functions of one `FamilyConversion`;
`convert_family(stop_after=...)` stops after a stage and returns the state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tracer.engine.mapping import map_by_rules
from tracer.engine.outputs import Outputs, compare_outputs
from tracer.engine.sensitivity import VERDICT
from tracer.errors import BadInputError, ConversionError, ParityError
from tracer.families.base import Family
from tracer.io.checkpoint import open_checkpoint
from tracer.progress import stage
from tracer.engine.row import LayerRow
from tracer.stages import Conversion, mapping_mode, read_table, report_path, run_stages, save_and_push, write_mapping_out

logger = logging.getLogger(__name__)


@dataclass
class FamilyResult:
    family: str
    spec: object
    entries: list
    coverage: object
    parity: Outputs
    set_aside: int
    timings: dict[str, float]
    accounted: dict[str, str] = field(default_factory=dict)  # checkpoint weights that are not model weights
    run: object = None  # the traced run (`engine.run.Run`), with --trace
    report: Path | None = None
    saved_to: Path | None = None
    reload_checked: int = 0
    reference_max_abs: dict[str, float] = field(default_factory=dict)
    model: object = field(default=None, repr=False)
    pushed_to: str | None = None

    @property
    def rows(self) -> list[LayerRow]:
        return self.run.rows if self.run is not None else []


@dataclass
class FamilyConversion(Conversion):
    """A family's conversion state between its stages (`stages.STAGES`); `convert_family(stop_after=...)` returns
    it."""

    family: Family | None = None
    accounted: dict = field(default_factory=dict)  # checkpoint weights that are not model weights -> what they are
    from_keras: dict = field(default_factory=dict)  # the reference's weight name -> the checkpoint's
    flipped: set = field(default_factory=set)  # reference names the checkpoint stores transposed
    keras_shapes: dict = field(default_factory=dict)  # the reference's weight name -> shape, in Keras' layout
    example: object = None  # the family's inputs for both sides
    reference: object = None  # the Keras (traced) or plain reference model
    run: object = None  # the traced run (`engine.run.Run`), with --trace
    hf_out: dict | None = None  # the HF model's outputs, where they were run

    def read(self, keras_name: str):
        """A weight by the reference's name, in Keras' layout."""
        value = self.checkpoint.read(self.from_keras[keras_name])
        return value.T.copy() if keras_name in self.flipped else value

    @property
    def atol(self) -> float | None:
        """The family's tightest output tolerance (None: it has none)."""
        return min(self.family.tolerances.values()) if self.family.tolerances else None


def convert_family(options, family: Family, stop_after: str | None = None):
    """Convert `options.checkpoint_path` with `family`'s adapter (see the module docstring). Returns the
    `FamilyResult`, or with `stop_after` (a stage name, `stages.STAGES`) the `FamilyConversion` right after that
    stage."""
    stages = {"read": _read, "build": _build, "copy": _copy, "compare": _compare, "report": _report, "check": _check,
              "save": _save}
    return run_stages(FamilyConversion(options, family=family), stages, stop_after)


def _read(s: FamilyConversion) -> None:
    """The run's checks, then the checkpoint: the spec, each weight's name in the reference (or what it is
    instead), the mapping table."""
    from tracer.output import preflight

    options, family = s.options, s.family
    s.mode = mapping_mode(options)
    preflight(options)
    if options.hf_config:
        raise BadInputError(f"--hf_config is not supported for {family.name} checkpoints yet: drop it")
    if options.float64 and not family.float64:
        raise BadInputError(f"--float64 is not supported for {family.name} checkpoints yet (its processor gives the "
                            "HF side float32 inputs): drop it")
    with stage("read checkpoint", s.timings):
        s.checkpoint = checkpoint = open_checkpoint(options.checkpoint_path)
        s.spec = spec = family.derive(checkpoint, options)
        logger.info("%s: %s", family.name, family.describe(spec))
        s.accounted = accounted = family.accounted(spec)
        to_keras = family.weight_names(checkpoint, spec)  # checkpoint name -> the reference's name
        s.from_keras = {k: c for c, k in to_keras.items()}
        s.flipped = flipped = family.stored_transposed(spec)
        s.shapes = shapes = checkpoint.shapes()
        s.keras_shapes = keras_shapes = {to_keras[n]: (tuple(reversed(shape)) if to_keras[n] in flipped else shape)
                                         for n, shape in shapes.items() if n in to_keras and n not in accounted}
        left_out = [n for n in shapes if n not in to_keras and n not in accounted]
        if left_out:
            raise ConversionError(f"{len(left_out)} checkpoint weight(s) fit nothing of the {family.name} model: "
                                  f"{left_out[:20]}")
        s.table = read_table(options, s.mode, keras_shapes,
                             lambda: map_by_rules(keras_shapes, family.rules(spec), family.block_index(spec)))


def _build(s: FamilyConversion) -> None:
    """The processor and the example inputs, the HF model (float64 with --float64), the reference model: the
    tf_keras model a trace records, or the family's plain reference; every mapped weight must be used by it."""
    options, family, spec = s.options, s.family, s.spec
    with stage("prepare inputs", s.timings):
        s.processor = family.processor(spec, options)
        s.example = family.example(spec, s.processor, options)
    from tracer.engine.precision import keras_floatx, to_float64

    with stage("build HF model", s.timings):
        s.hf_model = family.build_hf(spec, options)
        if options.float64:  # the weights arrive cast to float64
            s.hf_model = to_float64(s.hf_model)
    # A trace records the tf_keras model; a plain run compares outputs only, against `plain_reference`.
    with stage("build Keras reference" if options.trace else "build reference", s.timings), \
            keras_floatx(options.float64):
        s.reference = (family.keras_reference if options.trace else family.plain_reference)(spec, s.read)
        unused = [n for n in s.keras_shapes if n not in set(s.reference.consumed)]
        if unused:
            raise ConversionError(f"{len(unused)} checkpoint weight(s) the {family.name} reference model does not "
                                  f"use: {unused[:20]}; the checkpoint holds more than the derived model")


def _copy(s: FamilyConversion) -> None:
    """With --trace, the traced run (`tracer.api.trace`: mapped, copied and compared layer by layer); without,
    the table's weights. Then --mapping_out."""
    options, family, hf_model = s.options, s.family, s.hf_model
    if options.trace:
        import tracer.api
        from tracer.engine.state import materialize_uninitialized

        materialize_uninitialized(hf_model)
        with stage("trace", s.timings):
            s.run = tracer.api.trace(s.reference.model, hf_model, s.example.keras, torch_inputs=s.example.torch,
                                     mapping=s.table if s.table is not None else "infer", fill_gaps=s.mode == "auto",
                                     tolerances=None if options.float64 else s.atol,
                                     activation_budget_mb=options.activation_budget_mb,
                                     title=f"{family.name} conversion report",
                                     output_filter=family.output_filter(s.example), float64=options.float64)
        s.entries, s.coverage = s.run.entries, s.run.coverage
    else:
        from tracer.engine.transfer import coverage_of, transfer

        with stage("copy weights", s.timings):
            writer = family.hf_writer(hf_model)
            transfer(s.read, list(s.keras_shapes), s.table, writer, allow_nonfinite=options.allow_nonfinite,
                     target=type(hf_model).__name__)
            s.entries = s.table.entries
            s.coverage = coverage_of(writer, s.entries, len(s.keras_shapes))
    write_mapping_out(options, s.entries)


def _compare(s: FamilyConversion) -> None:
    """The outputs' parity: the trace's, or (without --trace) both models run and compared; the result."""
    family = s.family
    if s.run is not None:
        s.parity = s.run.outputs
    else:
        with stage("run both models", s.timings):
            keras_out = family.keras_outputs(s.reference, s.example)
            s.hf_out = family.hf_outputs(s.hf_model, s.example)
        s.parity = compare_outputs(list(keras_out.items()), list(s.hf_out.items()), family.tolerances, by_name=True)
    s.result = FamilyResult(family.name, s.spec, s.entries, s.coverage, s.parity, len(s.checkpoint.set_aside),
                            s.timings, s.accounted, s.run, model=s.hf_model)


def _report(s: FamilyConversion) -> None:
    """With --trace: the report; then conflicts the table kept, and a mapping with gaps, fail the run."""
    options, run = s.options, s.run
    if run is None:
        return
    with stage("report", s.timings):
        s.result.report = run.save(report_path(options))
    if run.unresolved:
        raise ConversionError(conflict_message(run.unresolved, run.report, options.mapping_file))
    if run.unmapped_keras or run.unwritten_torch:
        raise ConversionError(f"the mapping is incomplete ({'; '.join(run.gaps)}); the report in "
                              f"{run.report} shows both sides; fix the table (--mapping_file) or use "
                              "--mapping infer")


def _check(s: FamilyConversion) -> None:
    """The HF outputs against the example's reference outputs (if any); the checkpoint closed; the verdict: a miss
    fails the run."""
    family, example, result, run, parity, nothing = s.family, s.example, s.result, s.run, s.parity, s.nothing_saved
    if example.reference:
        from tracer.engine.compare import max_abs

        hf_out = s.hf_out if s.hf_out is not None else family.hf_outputs(s.hf_model, example)  # plain mode ran it
        result.reference_max_abs = {k: max_abs(v, hf_out[k]) for k, v in example.reference.items() if k in hf_out}
    s.close()
    verdict = run.verdict if run is not None else ("match" if parity.ok else "diverged")
    if verdict not in ("match", VERDICT):  # ill-conditioned: the reference's own sensitivity explains it
        where = (f"the per-layer report in {run.report} shows where" if run is not None
                 else "rerun with --trace to find the first layer that diverges")
        raise ParityError(f"the converted model does not match the checkpoint: {'; '.join(parity.reasons()) or verdict}"
                          f"; {where}.{nothing}", result)
    off = {k: v for k, v in result.reference_max_abs.items() if not v <= family.tolerances.get(k, s.atol or 0)}
    if off:
        raise ParityError(f"the converted model matches the Keras reference but not the reference outputs in "
                          f"{example.source}: {off}.{nothing}", result)


def _save(s: FamilyConversion) -> None:
    save_and_push(s, s.family)


def conflict_message(conflicts: list, report, mapping_file) -> str:
    """Why a run with conflicts the table kept fails: the entries, both candidates' local errors, the fix."""
    table = f"the rows of {mapping_file}" if mapping_file else "the rename rules"
    return (f"{len(conflicts)} mapping conflict(s) between the table and the tracer, applied as the table gives "
            f"them: {'; '.join(map(str, conflicts[:10]))}. The report in {report} shows both candidates' local "
            f"errors (mapping.csv) and where the layers diverge; use --mapping auto to let the numbers decide, or "
            f"fix {table} for these variables")


def model_card(options, family_name_or_family, spec, result) -> str:
    """The saved folder's README.md: where the weights came from, the parity figures, the tracer version and the
    command, so that a converted model carries its own evidence."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        tracer_version = version("tracer")
    except PackageNotFoundError:
        tracer_version = "unknown"
    name = getattr(family_name_or_family, "name", family_name_or_family)
    describe = getattr(family_name_or_family, "describe", None)
    lines = ["---", "library_name: transformers", "tags:", "- tracer", f"- {name}", "---", "",
             f"# {name} converted by tracer", "",
             f"- **Source weights:** `{options.checkpoint_path}`"]
    if describe is not None:
        lines.append(f"- **Derived model:** {describe(spec)}")
    lines += [f"- **Converted with:** tracer {tracer_version}",
              f"- **Command:** `{' '.join(['python', *sys.argv]) if sys.argv and sys.argv[0] else '(API)'}`", "",
              "## Parity with the original (measured at conversion)", ""]
    parity = result.parity
    lines += [f"- {line}" for line in parity.summary_lines({})]
    rows = getattr(result, "rows", None) or []
    if rows:
        from collections import Counter

        counts = Counter(r.status for r in rows)
        lines.append(f"- **Layers compared:** {len(rows)} ({', '.join(f'{n} {s}' for s, n in counts.most_common())})")
    coverage = getattr(result, "coverage", None)
    if coverage is not None:
        lines.append(f"- **Coverage:** {coverage.checkpoint_weights_used}/{coverage.checkpoint_weights_total} "
                     f"checkpoint weights used, {coverage.hf_tensors_written}/{coverage.hf_tensors_total} HF tensors "
                     "written")
    accounted = getattr(result, "accounted", None) or {}
    if accounted:
        lines.append(f"- **Not model weights:** {', '.join(f'`{k}` ({v})' for k, v in accounted.items())}")
    return "\n".join(lines) + "\n"
