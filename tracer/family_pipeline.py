"""The conversion for a family that plugs in through the adapter interface (`tracer.families.base.Family`):
checkpoint -> spec -> HF model -> rules -> Keras reference -> (trace | copy and compare) -> verified save.

The family says what its checkpoints hold and how they map; this file orders the stages and is strict about
them: every checkpoint weight used by the Keras reference and mapped (or accounted for by the family, such as a
Normalization layer's statistics that become the image processor), every HF tensor written, outputs compared
with the family's tolerances.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tracer.engine.mapping import map_by_file, map_by_rules, read_mapping
from tracer.engine.outputs import Outputs, compare_outputs
from tracer.engine.sensitivity import VERDICT
from tracer.errors import BadInputError, ConversionError, ParityError
from tracer.families.base import Family
from tracer.io.checkpoint import open_checkpoint
from tracer.progress import stage
from tracer.engine.row import LayerRow

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


def _mode(options) -> str:
    mode = options.mapping or ("auto" if options.trace else "table")
    if mode != "table" and not options.trace:
        raise BadInputError(f"--mapping {mode} infers from a trace: add --trace")
    if mode == "infer" and options.mapping_file:
        raise BadInputError("--mapping infer uses no table: drop --mapping_file, or use --mapping auto")
    return mode


def convert_family(options, family: Family) -> FamilyResult:
    """Convert `options.checkpoint_path` with `family`'s adapter (see the module docstring)."""
    from tracer.output import preflight
    from tracer.pipeline import push, save_verified

    timings: dict[str, float] = {}
    mode = _mode(options)
    preflight(options)
    if options.hf_config:
        raise BadInputError(f"--hf_config is not supported for {family.name} checkpoints yet: drop it")
    if options.float64 and not family.float64:
        raise BadInputError(f"--float64 is not supported for {family.name} checkpoints yet (its processor gives the "
                            "HF side float32 inputs): drop it")
    with stage("read checkpoint", timings):
        checkpoint = open_checkpoint(options.checkpoint_path)
        spec = family.derive(checkpoint, options)
        logger.info("%s: %s", family.name, family.describe(spec))
        accounted = family.accounted(spec)
        to_keras = family.weight_names(checkpoint, spec)  # checkpoint name -> the reference's name
        from_keras = {k: c for c, k in to_keras.items()}
        flipped = family.stored_transposed(spec)
        shapes = checkpoint.shapes()
        keras_shapes = {to_keras[n]: (tuple(reversed(s)) if to_keras[n] in flipped else s)
                        for n, s in shapes.items() if n in to_keras and n not in accounted}
        left_out = [n for n in shapes if n not in to_keras and n not in accounted]
        if left_out:
            raise ConversionError(f"{len(left_out)} checkpoint weight(s) fit nothing of the {family.name} model: "
                                  f"{left_out[:20]}")
        table = None
        if options.mapping_file:
            table = map_by_file(keras_shapes, read_mapping(options.mapping_file))
        elif mode != "infer":
            table = map_by_rules(keras_shapes, family.rules(spec), family.block_index(spec))

    def read(keras_name: str):
        """A weight by the reference's name, in Keras' layout."""
        value = checkpoint.read(from_keras[keras_name])
        return value.T.copy() if keras_name in flipped else value

    with stage("prepare inputs", timings):
        processor = family.processor(spec, options)
        example = family.example(spec, processor, options)
    from tracer.engine.precision import keras_floatx, to_float32, to_float64

    with stage("build HF model", timings):
        hf_model = family.build_hf(spec, options)
        if options.float64:  # the weights arrive cast to float64
            hf_model = to_float64(hf_model)
    # A trace records the tf_keras model; a plain run compares outputs only, against `plain_reference`.
    with stage("build Keras reference" if options.trace else "build reference", timings), \
            keras_floatx(options.float64):
        reference = (family.keras_reference if options.trace else family.plain_reference)(spec, read)
        unused = [n for n in keras_shapes if n not in set(reference.consumed)]
        if unused:
            raise ConversionError(f"{len(unused)} checkpoint weight(s) the {family.name} reference model does not "
                                  f"use: {unused[:20]}; the checkpoint holds more than the derived model")

    run, hf_out = None, None
    atol = min(family.tolerances.values()) if family.tolerances else None
    if options.trace:
        import tracer.api
        from tracer.engine.state import materialize_uninitialized

        materialize_uninitialized(hf_model)
        with stage("trace", timings):
            run = tracer.api.trace(reference.model, hf_model, example.keras, torch_inputs=example.torch,
                                   mapping=table if table is not None else "infer", fill_gaps=mode == "auto",
                                   tolerances=None if options.float64 else atol,
                                   activation_budget_mb=options.activation_budget_mb,
                                   title=f"{family.name} conversion report",
                                   output_filter=family.output_filter(example), float64=options.float64)
        entries, parity = run.entries, run.outputs
        if options.mapping_out:
            from tracer.pipeline import write_mapping_file

            write_mapping_file(entries, options.mapping_out)
        with stage("report", timings):
            from tracer.engine.report import default_run_name

            where = options.report_dir or Path("reports") / default_run_name(options.checkpoint_path)
            run.save(where)
        if run.unresolved:
            raise ConversionError(conflict_message(run.unresolved, run.report, options.mapping_file))
        if run.unmapped_keras or run.unwritten_torch:
            raise ConversionError(f"the mapping is incomplete ({'; '.join(run.gaps)}); the report in "
                                  f"{run.report} shows both sides; fix the table (--mapping_file) or use "
                                  "--mapping infer")
        coverage = run.coverage
    else:
        from tracer.engine.transfer import coverage_of, transfer

        with stage("copy weights", timings):
            writer = family.hf_writer(hf_model)
            transfer(read, list(keras_shapes), table, writer, allow_nonfinite=options.allow_nonfinite,
                     target=type(hf_model).__name__)
            entries = table.entries
            coverage = coverage_of(writer, entries, len(keras_shapes))
        if options.mapping_out:
            from tracer.pipeline import write_mapping_file

            write_mapping_file(entries, options.mapping_out)
        with stage("run both models", timings):
            keras_out = family.keras_outputs(reference, example)
            hf_out = family.hf_outputs(hf_model, example)
        parity = compare_outputs(list(keras_out.items()), list(hf_out.items()), family.tolerances, by_name=True)
    result = FamilyResult(family.name, spec, entries, coverage, parity, len(checkpoint.set_aside), timings,
                          accounted, run, run.report if run else None, model=hf_model)
    if example.reference:
        from tracer.engine.compare import max_abs

        hf_out = hf_out if hf_out is not None else family.hf_outputs(hf_model, example)  # plain mode ran it

        result.reference_max_abs = {k: max_abs(v, hf_out[k]) for k, v in example.reference.items() if k in hf_out}
    checkpoint.close()
    save = options.save_model or options.push_to_hub
    nothing = " Nothing was saved." if save else ""
    verdict = run.verdict if run is not None else ("match" if parity.ok else "diverged")
    if verdict not in ("match", VERDICT):  # ill-conditioned: the reference's own sensitivity explains it
        where = (f"the per-layer report in {run.report} shows where" if run is not None
                 else "rerun with --trace to find the first layer that diverges")
        raise ParityError(f"the converted model does not match the checkpoint: {'; '.join(parity.reasons()) or verdict}"
                          f"; {where}.{nothing}", result)
    off = {k: v for k, v in result.reference_max_abs.items() if not v <= family.tolerances.get(k, atol or 0)}
    if off:
        raise ParityError(f"the converted model matches the Keras reference but not the reference outputs in "
                          f"{example.source}: {off}.{nothing}", result)
    if save:
        card = model_card(options, family, spec, result)
        result.model = None
        if options.float64:  # a float64 trace checks the conversion; the model is the checkpoint's float32
            hf_model = to_float32(hf_model)
        result.saved_to, result.model, result.reload_checked = save_verified(
            hf_model, processor, Path(options.pytorch_dump_folder_path), options.overwrite, timings,
            options.max_shard_size, card=card)
    if options.push_to_hub:
        with stage("push to hub", timings):
            result.pushed_to = push(result.saved_to, options)
    return result


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
