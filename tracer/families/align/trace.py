"""The traced run: both models recorded tower by tower, their layers paired, the mapping inferred and confirmed,
the weights copied, every paired layer compared while both outputs exist.

Per tower: the Keras tower is built on a small probe input with its weights straight from the checkpoint; both
towers' call order on that probe gives the pairs (`pairing`), hence the mapping (`infer`) and the copy; then both
towers run on the real inputs side by side (`lockstep`), in chunks of examples that keep activation memory within
the budget, and only each layer's sums (`compare.Measured`) are kept. The Keras tower is released before the next
one is built. Arrays are kept only where the diagnosis needs them, from a second, one-example pass that runs only
when something diverged. Where a tower's output or rows miss their tolerance with no layer diverged, the Keras
side measures its own sensitivity to round-off (`engine.sensitivity`) while the tower is still built.

One `AlignRun` holds what the run is given and what the towers add up to; the helpers take it and, per tower,
the `Probed` call orders and pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tracer.families.align import hf as hf_side
from tracer.engine.compare import Measured, Tolerances, layer_rows, max_abs
from tracer.engine.lockstep import final_pairs, needed_for_diagnosis
from tracer.families.align.parity import with_embeds
from tracer.families.align.blocks import align_blocks
from tracer.engine.mapping import Entry, WeightMap
from tracer.memory import trim
from tracer.engine.pairing import Pair, pair_records
from tracer.progress import progress, stage
from tracer.engine.record import Record
from tracer.engine import sensitivity as conditioning
from tracer.engine.sensitivity import Sensitivity
from tracer.families.align.towers import FEATURES, TOWERS, largest_output, tower_of
from tracer.engine.numeric import rest_to_copy
from tracer.engine.transfer import Coverage, coverage_of, transfer
from tracer.engine.row import LayerRow


@dataclass
class Traced:
    weight_map: WeightMap
    conflicts: list  # `mapping.Conflict`, measured; those not `resolved` are in use as the table gives them
    unmapped: list[str]
    coverage: Coverage | None = None  # None: the mapping was incomplete or conflicting, nothing was copied
    keras_out: dict | None = None
    hf_out: dict | None = None
    pairs: list = field(default_factory=list)
    rows: list[LayerRow] = field(default_factory=list)
    parts: list = field(default_factory=list)  # per tower, its output's `sensitivity.PartSensitivity`
    sensitivity: Sensitivity | None = None  # measured when an output or a row missed and no layer diverged


WORKING_SET = 8  # arrays of a layer's size alive at once while a pair is compared (both sides, inputs, re-run, diff)


def chunk_size(largest: float, budget_mb: float) -> int:
    """Examples per chunk so that comparing the tower's largest layer (`largest` elements per example, see
    `record.largest_output`) stays within `budget_mb`."""
    return max(1, int(budget_mb * 2**20 // (largest * 4 * WORKING_SET)))


def _restrict(table: WeightMap | None, names: set[str]) -> WeightMap | None:
    if table is None:
        return None
    return WeightMap([e for e in table.entries if e.variable in names], [n for n in table.unmatched if n in names],
                     table.stray)


@dataclass
class AlignRun:
    """One traced ALIGN run: what `trace` is given, and what the towers add to it as they are traced.

    `keep_activations` keeps every array and the Keras layers (tests, debugging); otherwise activation memory
    stays within `options.activation_budget_mb` and one Keras tower is alive at a time. `keras`: where the Keras
    reference runs (a `keras_side.KerasProcess` the caller started early); by default (None) in this process.
    `writer` (the HF model's `hf.StateWriter`) is made by `trace`, and `inputs` there become float64 in a float64
    run (the HF side's pixels too)."""

    checkpoint: object  # `io.checkpoint` reader: `.read(name)`
    shapes: dict  # checkpoint weight -> shape, in checkpoint order
    spec: object  # `spec.AlignSpec`
    table: WeightMap | None  # the rename rules' or --mapping_file's map; None with --mapping infer
    mode: str  # table | infer | auto
    hf_model: object
    inputs: object  # `inputs.Inputs`
    options: object  # `pipeline.ConvertOptions`: float64, atol, activation_budget_mb
    timings: dict = field(default_factory=dict)
    keep_activations: bool = False
    keras: object = None
    writer: object = None
    # What the towers traced so far add up to:
    chosen: list[Entry] = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    pairs: list = field(default_factory=list)
    rows: list[LayerRow] = field(default_factory=list)
    parts: list = field(default_factory=list)
    features: dict = field(default_factory=lambda: {"keras": {}, "hf": {}})

    @property
    def float64(self) -> bool:
        return getattr(self.options, "float64", False)

    @property
    def tolerances(self) -> Tolerances:
        return Tolerances.for_run(self.float64, self.options.atol)

    @property
    def read(self):
        return self.checkpoint.read

    def add(self, tower: str, part: Traced) -> None:
        """A tower's part of the run (`_trace_tower`): its entries filed under the tower, as the report shows them."""
        for e in part.weight_map.entries:
            e.part = tower
        self.chosen += part.weight_map.entries
        self.conflicts += part.conflicts
        self.unmapped += part.unmapped
        if part.unmapped:
            return
        self.pairs += part.pairs
        self.rows += part.rows
        self.parts += part.parts
        self.features["keras"].update(part.keras_out)
        self.features["hf"].update(part.hf_out)


@dataclass
class Probed:
    """One tower's call order on the probe input, both sides, and its layers paired on it."""

    tower: str
    keras: list[Record]
    torch: list[Record]
    pairs: list[Pair]

    @property
    def paired(self) -> list[Pair]:
        return [p for p in self.pairs if p.paired]


def _chunk(inputs, tower: str, part: slice):
    """`part` of the examples `tower` runs on (the images for vision, the texts for text)."""
    return inputs.select(part, slice(None)) if tower == "vision" else inputs.select(slice(None), part)


def trace(run: AlignRun) -> Traced:
    """Tower by tower (`_trace_tower`), then what belongs to no tower (the temperature): record both models, pair
    their layers, infer and confirm the mapping, copy the weights, compare (see `AlignRun`)."""
    from tracer.engine.infer import infer_mapping, reconcile
    from tracer.families.align.keras_side import LocalKeras

    run.keras = run.keras or LocalKeras(run.spec, run.read, run.float64)
    run.writer = hf_side.StateWriter(run.hf_model)
    if run.float64 and not run.inputs.float64:
        from dataclasses import replace

        run.inputs = replace(run.inputs, float64=True)  # the HF side's pixels in float64 too
    for tower in TOWERS:
        run.add(tower, _trace_tower(run, tower))
        if run.unmapped:
            return Traced(WeightMap(run.chosen), run.conflicts, run.unmapped)
        if not run.keep_activations:
            run.keras.release(tower)
            trim()  # what the comparisons left in this process's heap
    shapes, table = run.shapes, run.table
    with stage("copy weights", run.timings):  # what belongs to no tower: the temperature
        used = {e.variable for e in run.chosen}
        rest = {n: s for n, s in shapes.items() if n not in used}
        free = {n: s for n, s in hf_side.hf_shapes(run.hf_model).items() if tower_of(n) is None}
        left, more = reconcile(_restrict(table, set(rest)), infer_mapping([], rest, free), run.mode)
        run.conflicts += more  # no layer computes with these: nothing to measure, the table stays as given
        order = {n: i for i, n in enumerate(shapes)}  # checkpoint order, as the table gives it
        weight_map = WeightMap(sorted(run.chosen + left.entries, key=lambda e: order[e.variable]))
        run.unmapped = [n for n in rest if n not in {e.variable for e in left.entries}]
        if run.unmapped:
            return Traced(weight_map, run.conflicts, run.unmapped)
        transfer(run.read, list(rest), left, run.writer, allow_nonfinite=True)
        coverage = coverage_of(run.writer, weight_map.entries, len(shapes))
    mark_mismatches(weight_map.entries, run.rows)
    measured = any(p.sensitivity == p.sensitivity for p in run.parts)
    accumulated = run.tolerances.accumulated_rel_l2
    sensitivity = Sensitivity(run.parts, conditioning.breakdown(run.rows, accumulated), accumulated=accumulated) \
        if measured else None
    return Traced(weight_map, run.conflicts, [], coverage, with_embeds(run.features["keras"]),
                  with_embeds(run.features["hf"]), run.pairs, run.rows, run.parts, sensitivity)


def _probe_hf(run: AlignRun, tower: str) -> list[Record]:
    """The HF tower's call order on the probe input, its modules zeroed until the weights arrive."""
    from tracer.families.align.keras_side import probe_inputs
    from tracer.families.align.record import record_torch

    for module in hf_side.tower_modules(run.hf_model, tower):
        hf_side.materialize_uninitialized(module)
    run.writer.refresh()
    return record_torch(run.hf_model, probe_inputs(run.spec.text.seq_length, run.float64), keep_outputs=False,
                        towers=(tower,))[0]


def _trace_tower(run: AlignRun, tower: str) -> Traced:
    """One tower: build the Keras tower on a probe input (weights straight from the checkpoint), record both
    towers' call order on it, pair the layers, infer and confirm the mapping, copy the weights, then compare
    (`_compare_tower`). Returns the tower's part of a `Traced`."""
    from tracer.engine.infer import infer_mapping, reconcile

    keras, table, mode, timings, shapes = run.keras, run.table, run.mode, run.timings, run.shapes
    with stage("probe HF call order", timings):  # first: a Keras worker process may still be building
        torch_probe = _probe_hf(run, tower)
    early: list[Entry] = []
    if keras.weights(tower) is None and table is not None and mode == "auto":
        with stage("copy weights", timings):  # the table's part while the worker builds; confirmed below
            early = [e for e in table.entries if tower_of(e.parameter) == tower]
            transfer(run.read, [e.variable for e in early], WeightMap(early), run.writer, allow_nonfinite=True)
    with stage("build Keras and probe call order", timings):
        keras_probe, names = keras.probe(tower)
        names = set(names)
    with stage("pair and infer", timings):
        probed = Probed(tower, keras_probe, torch_probe, pair_records(keras_probe, torch_probe))
        tower_hf = {n: s for n, s in hf_side.hf_shapes(run.hf_model).items() if tower_of(n) == tower}
        inference = infer_mapping(probed.pairs, {n: shapes[n] for n in shapes if n in names}, tower_hf)
        weight_map, conflicts = reconcile(_restrict(table, names), inference, mode)
        mapped = {e.variable for e in weight_map.entries}
        unmapped = [n for n in shapes if n in names and n not in mapped]
    if unmapped:
        return Traced(weight_map, conflicts, unmapped)
    with stage("copy weights", timings):
        copied = {(e.variable, e.parameter, e.transform) for e in early}
        in_use = {(e.variable, e.parameter, e.transform) for e in weight_map.entries}
        if not copied <= in_use:  # auto mode keeps every table entry until the numbers say otherwise
            raise RuntimeError(f"copied from the table but not in use: {sorted(copied - in_use)[:5]}")
        weights = keras.weights(tower) or run.read
        # The tracer's own mapping first (in `table` mode only where the table writes too): the numbers judge
        # doubts on it; the entries in use are then written over it.
        table_params = {e.parameter for e in weight_map.entries}
        ours = [e for e in inference.entries if (e.variable, e.parameter, e.transform) not in copied
                and (mode != "table" or e.parameter in table_params)]
        transfer(weights, list(names), WeightMap(ours), run.writer, allow_nonfinite=True)
    with stage("numbers decide", timings):
        weight_map, conflicts = _by_numbers(run, probed, inference, _restrict(table, names), weights)
    with stage("copy weights", timings):
        over = {e.parameter for e in ours}  # an early table entry the tracer's copy wrote over is written again
        written = {(e.variable, e.parameter, e.transform) for e in ours} | {c for c in copied if c[1] not in over}
        rest = [e for e in rest_to_copy(weight_map, inference) if (e.variable, e.parameter, e.transform) not in written]
        transfer(weights, list(names), WeightMap(rest), run.writer, allow_nonfinite=True)
    return _compare_tower(run, probed, weight_map, conflicts)


def _compare_tower(run: AlignRun, probed: Probed, weight_map: WeightMap, conflicts: list) -> Traced:
    """Both towers on the real inputs side by side, each pair compared as soon as both outputs exist
    (`lockstep`), in chunks of examples that keep activation memory within the budget; the reference's own
    sensitivity where the tower misses with no layer diverged; the arrays the diagnosis needs. Returns the
    tower's part of a `Traced`."""
    tower, inputs, timings, keep_activations = probed.tower, run.inputs, run.timings, run.keep_activations
    tolerances = run.tolerances
    paired = probed.paired
    total = inputs.count(tower)
    largest = largest_output(probed.keras + probed.torch, tower, inputs.image_size)
    step = total if keep_activations else chunk_size(largest, run.options.activation_budget_mb)
    measured = [Measured() for _ in paired]
    outputs: dict[str, list] = {"keras": [], "hf": []}
    name = FEATURES[tower]
    following = None if keep_activations or tower == TOWERS[-1] else TOWERS[TOWERS.index(tower) + 1]
    with stage(f"trace and compare {tower}", timings):
        for start in progress(range(0, total, step), desc=f"trace {tower}", unit="chunk"):
            chunk = _chunk(inputs, tower, slice(start, start + step))
            then = following if start + step >= total else None  # the Keras side may build the next tower
            keras_records, torch_records, out = _lockstep(run, probed, chunk, measured, keep=keep_activations,
                                                          then=then)
            outputs["keras"].append(out["keras"])
            outputs["hf"].append(out["hf"])
    for record in keras_records + torch_records:  # the last chunk's records stand for the whole run
        record.shape = (total, *record.shape[1:]) if record.shape else record.shape
    by_probe_pair = dict(zip(map(id, paired), measured))
    tower_pairs = final_pairs(probed.pairs, keras_records, torch_records, by_probe_pair)
    rows = layer_rows(tower_pairs, weight_map.entries, align_blocks(run.spec.vision.block_names()), tolerances)
    needed = None if keep_activations else {"keras": set(), "torch": set()}
    features = {side: np.concatenate(v) for side, v in outputs.items()}
    embeds = {side: with_embeds({name: f})[name.replace("features", "embeds")] for side, f in features.items()}
    off = not max_abs(embeds["keras"], embeds["hf"]) <= tolerances.embeds_max_abs  # where its error enters is worth a hint
    embeds_name = name.replace("features", "embeds")
    part = conditioning.PartSensitivity(embeds_name, max_abs(embeds["keras"], embeds["hf"]), float("nan"),
                                        tolerances.embeds_max_abs, tower)
    conditioning.annotate(rows, {})
    if conditioning.wanted(rows, off, tolerances.accumulated_rel_l2):
        with stage(f"reference sensitivity {tower}", timings):
            sums, perturbed = _sensitivity(run, probed, max(1, step // 2))
        if sums is not None:
            conditioning.annotate(rows, sums)
            perturbed = with_embeds({name: perturbed})[embeds_name]
            part = conditioning.part(embeds_name, embeds["keras"], embeds["hf"], perturbed, tolerances.embeds_max_abs,
                                     tower)
    if needed is not None and (off or any(r.diverged for r in rows)):
        with stage(f"capture {tower} for diagnosis", timings):
            needed = needed_for_diagnosis(rows, tower_pairs, off)
            keras_records, torch_records, _ = _lockstep(
                run, probed, inputs.select(slice(1), slice(1)), [Measured() for _ in paired],
                keep=lambda side, order: order in needed[side])
        tower_pairs = final_pairs(probed.pairs, keras_records, torch_records, by_probe_pair)
    if needed is not None:  # a record holds its Keras layer alive: keep only those the diagnosis may look at
        for record in keras_records:
            if record.order not in needed["keras"]:
                record.layer = None
    return Traced(weight_map, conflicts, [], None, {name: features["keras"]}, {name: features["hf"]}, tower_pairs, rows,
                  [part])


def _by_numbers(run: AlignRun, probed: Probed, inference, table: WeightMap | None, read):
    """`numeric.by_numbers` for one tower (`table`: its part of the run's), the Keras side run by `run.keras` on
    the first example, `read` the tower's weights; then the winners taken (`infer.take_winners`). Returns the
    weight map and every conflict, measured."""
    from tracer.engine.infer import take_winners
    from tracer.engine.lockstep import drop_arrays
    from tracer.engine.numeric import by_numbers

    def run_keras(orders: set[int]) -> dict:
        def sink(record):
            if record.order not in orders:
                drop_arrays(record)

        records = run.keras.run(probed.tower, run.inputs.select(slice(1), slice(1)), sink, orders,
                                lambda order: order in orders)
        return {r.order: r for r in records}

    weight_map, conflicts, _ = by_numbers(probed.pairs, inference, table, run.mode, read, run_keras,
                                          lambda: float("inf"))
    take_winners(weight_map, inference, run.mode)
    return weight_map, conflicts


def _sensitivity(run: AlignRun, probed: Probed, step: int):
    """The reference's own sensitivity at the tower's paired layers over every example of it, in chunks of `step`
    (half the comparison's: each runs twice, as one batch): ({(tower, Keras layer path): Sums}, the perturbed
    Keras output), or (None, None) where the tower's input has no round-off (`LocalKeras.sensitivity`)."""
    tower = probed.tower
    path_of = {p.keras.order: p.keras.path for p in probed.paired}
    sums: dict = {}
    ends: list = []
    for start in range(0, run.inputs.count(tower), step):
        answer = run.keras.sensitivity(tower, _chunk(run.inputs, tower, slice(start, start + step)), path_of)
        if answer is None:
            return None, None
        conditioning.merge(sums, answer[0])
        ends.append(answer[1])
    return {(tower, path_of[o]): s for o, s in sums.items()}, np.concatenate(ends)


def _lockstep(run: AlignRun, probed: Probed, chunk, measured: list[Measured], keep=False, then=None):
    """One chunk of one tower (`probed.tower`) through both models side by side; adds each pair's metrics to
    `measured` (one per paired probe pair). `keep`: which arrays to keep, as `Lockstep` takes it; `then`: the
    tower the Keras side may build once this chunk is done."""
    from tracer.engine.lockstep import Lockstep
    from tracer.families.align.record import record_torch

    tower, keras_probe, torch_probe, paired = probed.tower, probed.keras, probed.torch, probed.paired
    k_order = {id(r): i for i, r in enumerate(keras_probe)}
    t_order = {id(r): i for i, r in enumerate(torch_probe)}
    index = [(k_order[id(p.keras)], t_order[id(p.torch)]) for p in paired]
    last_keras: dict[str, np.ndarray] = {}

    def on_pair(i, k, t):
        probe = paired[i]  # a fused pair's weight record is the probe's: it holds the same module as the run's
        weights = t if probe.torch_weights is probe.torch else probe.torch_weights
        measured[i].add(Pair(tower, k, t, weights))

    step = Lockstep(index, {"keras": [r.path for r in keras_probe], "torch": [r.path for r in torch_probe]}, on_pair,
                    keep=keep)
    keras_sink = step.sink("keras")

    def keras_side(record):
        last_keras["output"] = record.output  # the tower's last record is its output: keep it past the comparison
        keras_sink(record)

    # The Keras orders whose arrays are needed: paired ones, kept ones, and the tower's output (the last record).
    keep_keras = (lambda order: keep("keras", order)) if callable(keep) else (lambda order: bool(keep))
    wanted = {k for k, _ in index} | {o for o in range(len(keras_probe)) if keep_keras(o)} | {len(keras_probe) - 1}

    def run_keras():
        return run.keras.run(tower, chunk, keras_side, wanted, keep_keras, then)

    def run_torch():
        return record_torch(run.hf_model, chunk, sink=step.sink("torch"), towers=(tower,))

    keras_records, (torch_records, hf_features) = step.run(run_keras, run_torch)
    return keras_records, torch_records, {"keras": np.array(last_keras["output"]), "hf": hf_features[FEATURES[tower]]}


def mark_mismatches(entries: list[Entry], rows: list[LayerRow]) -> None:
    """A `confirmed` entry whose layer's own output does not match is not confirmed: mark it `mismatch`."""
    faulty = {v.split(" -> ")[0] for r in rows if r.diverged for v in r.weights.split("; ") if v}
    for e in entries:
        if e.status == "confirmed" and e.variable in faulty:
            e.status = "mismatch"
