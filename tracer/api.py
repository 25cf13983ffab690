"""`tracer.trace(keras_model, torch_model, inputs)`: any tf_keras model against any torch module, in process.

Both models run once on one example to learn their call order (the probe), their layers are paired, the weight
mapping is inferred (or taken from a table) and the Keras weights copied; then both run side by side on every
example, in chunks that keep activation memory within `activation_budget_mb`, each paired layer compared as soon as
both outputs exist. The result is a `Run`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tracer.engine import sensitivity as conditioning
from tracer.engine.compare import Measured, Tolerances, layer_rows, max_abs, module_blocks, nhwc_to_nchw
from tracer.engine.hint import Hint
from tracer.engine.infer import infer_mapping, reconcile
from tracer.engine.lockstep import Lockstep, final_pairs, needed_for_diagnosis
from tracer.engine.mapping import Entry, WeightMap, map_by_file, read_mapping
from tracer.engine.outputs import compare_outputs, flatten
from tracer.engine.pairing import Pair, pair_records
from tracer.engine.run import Run
from tracer.errors import BadInputError

logger = logging.getLogger(__name__)

WORKING_SET = 8  # arrays of a layer's size alive at once while a pair is compared (both sides, inputs, re-run, diff)
DEFAULT_BUDGET_MB = 512


# ------------------------------------------------------------------------------------------------ inputs
def _numpy_tree(value):
    """Inputs as numpy, keeping their structure (an array, a list/tuple or a dict of arrays)."""
    if isinstance(value, dict):
        return {k: _numpy_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numpy_tree(v) for v in value)
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _leaves(tree) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [a for v in tree for a in _leaves(v)]
    return [tree]


def _select(tree, part: slice):
    return _map_leaves(lambda a: a[part], tree)


def _batch(tree, what: str) -> int:
    sizes = {a.shape[0] for a in _leaves(tree) if a.ndim}
    if len(sizes) != 1:
        raise BadInputError(f"the {what} must share one batch size on their first axis; got batch sizes {sorted(sizes)}")
    return sizes.pop()


def _map_leaves(fn, tree):
    """`fn` on every array of an input tree (dict, list, tuple), the tree's shape kept."""
    if isinstance(tree, dict):
        return {k: _map_leaves(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_leaves(fn, v) for v in tree)
    return fn(tree)


def _as_float64(tree):
    """Float arrays as float64 (a float64 run), the rest as they are."""
    return _map_leaves(lambda a: a.astype(np.float64) if a.dtype.kind == "f" else a, tree)


def torch_inputs_from_keras(tree):
    """The torch side of Keras inputs: 4-D float arrays become NCHW float32, integer arrays int64, other floats
    float32; a dict stays a dict (keyword arguments), a list stays a list (positional)."""
    if isinstance(tree, dict):
        return {k: torch_inputs_from_keras(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(torch_inputs_from_keras(v) for v in tree)
    a = np.asarray(tree)
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    a = a.astype(np.float64 if a.dtype == np.float64 else np.float32, copy=False)
    return np.ascontiguousarray(nhwc_to_nchw(a))


def _torch_call(tree) -> tuple[tuple, dict]:
    import torch

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    if isinstance(tree, dict):
        return (), {k: tensor(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return tuple(tensor(v) for v in tree), {}
    return (tensor(tree),), {}


def _keras_call(tree):
    if isinstance(tree, (list, tuple)):
        return list(tree)
    return tree


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ running
def _run_keras(model, inputs, keep, sink=None):
    from tracer.engine.record.keras import recording

    with recording(model, "model", keep, sink) as records:
        try:
            out = model(_keras_call(inputs), training=False)
        except BadInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here is the inputs not fitting the model
            raise BadInputError(f"the Keras model rejects the inputs ({_first_line(exc)}); give `inputs` as the "
                                "model takes them: an array, a list or a dict of arrays") from exc
    return records, flatten(out)


def _run_torch(model, inputs, keep, sink=None):
    import torch

    from tracer.engine.record.torch import recording

    args, kwargs = _torch_call(inputs)
    with recording(model, keep, sink) as records, torch.inference_mode():
        try:
            out = model(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise BadInputError(f"the torch model's forward fails on the inputs derived from the Keras inputs "
                                f"({_first_line(exc)}); pass them yourself with `torch_inputs=` (a tensor, a tuple "
                                "of positional tensors or a dict of keyword tensors)") from exc
    return records, flatten(out)


def keras_variables(model) -> dict:
    """The Keras model's variables by name (without `:0`); two variables of one name are refused."""
    found: dict = {}
    for v in model.weights:
        name = v.name.removesuffix(":0")
        if name in found and found[name] is not v:
            raise BadInputError(f"the Keras model has two variables named `{name}`: tracer maps weights by name; "
                                "give its layers distinct names")
        found[name] = v
    return found


def _fitting_transform(keras_shape: tuple, torch_shape: tuple) -> str:
    """The layout transform that turns a Keras weight of this shape into the torch one (identity first)."""
    from tracer.engine.transforms import TRANSFORMS

    for t in TRANSFORMS.values():
        if len(keras_shape) in t.keras_rank and t.shape(keras_shape) == tuple(torch_shape):
            return t.name
    raise BadInputError(f"no layout transform turns a Keras weight of shape {keras_shape} into {torch_shape}")


def _table(mapping, shapes: dict, torch_shapes: dict) -> WeightMap | None:
    if mapping is None or (isinstance(mapping, str) and mapping == "infer"):
        return None
    if isinstance(mapping, WeightMap):
        return mapping
    if isinstance(mapping, (str, Path)):
        return map_by_file(shapes, read_mapping(mapping))
    if isinstance(mapping, dict):  # {keras name: torch name}: the transform from the two shapes
        unknown = [t for t in mapping.values() if t not in torch_shapes]
        if unknown:
            raise BadInputError(f"the mapping names torch tensors the model does not have: {unknown[:10]}")
        entries = [Entry(k, t, _fitting_transform(shapes[k], torch_shapes[t]) if k in shapes else "identity", "file")
                   for k, t in mapping.items()]
        return map_by_file(shapes, entries)
    if isinstance(mapping, (list, tuple)):
        return map_by_file(shapes, list(mapping))
    raise BadInputError(f"mapping must be 'infer', a mapping file, a dict or a WeightMap, not {type(mapping).__name__}")


def _value_matches(entries: list[Entry], variables: dict, torch_model) -> None:
    """With the torch model's own weights: set each entry's `equals` to the Keras weight(s) its parameter holds
    (compared by checksum under every layout transform that fits), or "none"."""
    from tracer.engine.transfer import tensor_checksum
    from tracer.engine.transforms import TRANSFORMS

    index: dict[str, list[str]] = {}
    for name, v in variables.items():
        value = np.asarray(v.numpy())
        for t in TRANSFORMS.values():
            if value.ndim in t.keras_rank:
                index.setdefault(tensor_checksum(t(value)), []).append(f"{name} ({t.name})")
    state = torch_model.state_dict()
    for e in entries:
        tensor = state.get(e.parameter)
        if tensor is None:
            continue
        found = index.get(tensor_checksum(tensor.detach().cpu().numpy().astype(np.float32, copy=False)), [])
        e.equals = "; ".join(dict.fromkeys(found)) or "none"
        e.hf_shape = tuple(tensor.shape)


class _Side:
    """Runs one chunk of both models side by side, comparing each paired layer as both outputs exist."""

    def __init__(self, keras_model, torch_model, pairs, keras_probe, torch_probe):
        self.keras_model, self.torch_model = keras_model, torch_model
        self.pairs, self.paired = pairs, [p for p in pairs if p.paired]
        k_order = {id(r): i for i, r in enumerate(keras_probe)}
        t_order = {id(r): i for i, r in enumerate(torch_probe)}
        self.index = [(k_order[id(p.keras)], t_order[id(p.torch)]) for p in self.paired]
        self.expected = {"keras": [r.path for r in keras_probe], "torch": [r.path for r in torch_probe]}

    def run(self, keras_in, torch_in, measured: list[Measured], keep=False):
        def on_pair(i, k, t):
            probe = self.paired[i]
            weights = t if probe.torch_weights is probe.torch else probe.torch_weights
            measured[i].add(Pair(probe.tower, k, t, weights))

        step = Lockstep(self.index, self.expected, on_pair, keep=keep)
        (keras_records, keras_out), (torch_records, torch_out) = step.run(
            lambda: _run_keras(self.keras_model, keras_in, True, step.sink("keras")),
            lambda: _run_torch(self.torch_model, torch_in, True, step.sink("torch")))
        return keras_records, torch_records, keras_out, torch_out


def trace(keras_model, torch_model, inputs, *, torch_inputs=None, mapping="infer", copy_weights: bool = True,
          tolerances: dict | float | None = None, activation_budget_mb: float = DEFAULT_BUDGET_MB,
          block_of: Callable | None = None, diagnose: bool = True, title: str = "tracer report",
          fill_gaps: bool = False, output_filter: Callable | None = None, float64: bool = False) -> Run:
    """Trace `keras_model` (any tf_keras model) against `torch_model` (any `torch.nn.Module`) on `inputs`.

    `inputs`: what the Keras model takes (an array, a list or a dict of arrays, batch first). `torch_inputs`:
    what the torch model takes, when it differs from the derived NCHW/int64 copy. `mapping`: "infer", a mapping
    file (CSV/JSON), a `{keras name: torch name}` dict or a `WeightMap`. `copy_weights=False` keeps the torch
    model's own weights and says which Keras weight each equals. `tolerances`: max|Δ| per model output (by the
    Keras output's name, or one number for all; default: the precision's, `compare.Tolerances`). `block_of(pair)`:
    the report's block of a row (default: the torch module tree). `float64`: both sides in float64 (the Keras
    model rebuilt in float64 unless it is already, see `precision.keras_float64`; the torch model turned double
    in place; float inputs cast) and every layer judged by `compare.FLOAT64`."""
    import torch

    from tracer.engine.diagnose import diagnose as run_diagnosis
    from tracer.engine.diagnose import suspect
    from tracer.engine.record.keras import check_tf_keras
    from tracer.engine.state import hf_shapes

    check_tf_keras(keras_model)
    if not isinstance(torch_model, torch.nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got a {type(torch_model).__name__}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    tol = Tolerances.for_run(float64)
    if float64:
        from tracer.engine.precision import keras_float64, to_float64

        keras_model = keras_float64(keras_model)
        to_float64(torch_model)
        if tolerances is None:
            tolerances = tol.embeds_max_abs
    keras_in = _numpy_tree(inputs)
    if float64:
        keras_in = _as_float64(keras_in)
    total = _batch(keras_in, "inputs")
    torch_in = _numpy_tree(torch_inputs) if torch_inputs is not None else torch_inputs_from_keras(keras_in)
    if float64:
        torch_in = _as_float64(torch_in)
    if _batch(torch_in, "torch inputs") != total:
        raise BadInputError(f"`torch_inputs` has another batch size than `inputs` ({total})")
    was_training = torch_model.training
    torch_model.eval()
    try:
        keras_probe, _ = _run_keras(keras_model, _select(keras_in, slice(0, 1)), False)
        torch_probe, _ = _run_torch(torch_model, _select(torch_in, slice(0, 1)), False)
        pairs = pair_records(keras_probe, torch_probe)
        paired = [p for p in pairs if p.paired]
        if not paired:
            raise BadInputError(f"nothing in the two models pairs: no Keras layer ({len(keras_probe)} recorded) has "
                                f"a torch module ({len(torch_probe)} recorded) of the same kind and output shape; "
                                "are they the same architecture?")
        timings["probe and pair"] = time.perf_counter() - started

        variables = keras_variables(keras_model)
        shapes = {n: tuple(v.shape) for n, v in variables.items()}
        torch_shapes = hf_shapes(torch_model)
        inference = infer_mapping(pairs, shapes, torch_shapes)
        table = _table(mapping, shapes, torch_shapes)
        mode = "infer" if table is None else "auto" if fill_gaps else "table"
        if copy_weights:
            read = {n: (lambda v=v: np.asarray(v.numpy())) for n, v in variables.items()}
            weight_map, conflicts = _copy_by_numbers(
                keras_model, torch_model, _select(keras_in, slice(0, 1)), _select(torch_in, slice(0, 1)), pairs,
                inference, table, mode, lambda name: read[name]())
        else:
            weight_map, conflicts = reconcile(table, inference, mode)
        for e in weight_map.entries:
            e.part = "model"
        mapped = {e.variable for e in weight_map.entries}
        preprocessing = {n for p in pairs if p.keras is not None and p.keras.kind == "rescale"
                         for n in p.keras.variables}
        unmapped = [n for n in shapes if n not in mapped and n not in preprocessing]
        targets = {e.parameter for e in weight_map.entries}
        unwritten = [n for n in torch_shapes if n not in targets]
        if not copy_weights:
            _value_matches(weight_map.entries, variables, torch_model)
        timings["mapping and copy"] = time.perf_counter() - started - sum(timings.values())

        side = _Side(keras_model, torch_model, pairs, keras_probe, torch_probe)
        largest = max((int(np.prod(r.shape[1:])) for r in keras_probe + torch_probe if r.shape), default=1)
        step = max(1, int(activation_budget_mb * 2**20 // (largest * 4 * WORKING_SET)))
        measured = [Measured() for _ in paired]
        keras_out, torch_out = [], []
        for begin in range(0, total, step):
            part = slice(begin, begin + step)
            keras_records, torch_records, k_out, t_out = side.run(_select(keras_in, part), _select(torch_in, part),
                                                                  measured)
            keras_out.append(k_out)
            torch_out.append(t_out)
        for record in keras_records + torch_records:  # the last chunk's records stand for the whole run
            record.shape = (total, *record.shape[1:]) if record.shape else record.shape
        by_probe = dict(zip(map(id, paired), measured))
        final = final_pairs(pairs, keras_records, torch_records, by_probe)
        block_of = block_of or module_blocks(final)
        rows = layer_rows(final, weight_map.entries, block_of, tol)
        keep = output_filter or (lambda outputs: outputs)
        keras_outputs = keep(_concat(keras_out))
        outputs = compare_outputs(keras_outputs, keep(_concat(torch_out)), tolerances)
        timings["trace and compare"] = time.perf_counter() - started - sum(timings.values())
        sensitivity = None
        if conditioning.wanted(rows, not outputs.ok, tol.accumulated_rel_l2):
            sensitivity = _reference_sensitivity(keras_model, keras_in, paired, rows, outputs, keras_outputs, keep,
                                                 max(1, step // 2), tol.accumulated_rel_l2)
            timings["reference sensitivity"] = time.perf_counter() - started - sum(timings.values())

        hints: list[Hint] = []
        if diagnose and (not outputs.ok or any(r.diverged or suspect(r) for r in rows)):
            needed = needed_for_diagnosis(rows, final, not outputs.ok)
            keras_records, torch_records, _, _ = side.run(
                _select(keras_in, slice(0, 1)), _select(torch_in, slice(0, 1)), [Measured() for _ in paired],
                keep=lambda s, order: order in needed[s])
            final_arrays = final_pairs(pairs, keras_records, torch_records, by_probe)
            hints = run_diagnosis(final_arrays, rows, weight_map.entries, outputs, block_of)
            final = final_arrays
            timings["diagnose"] = time.perf_counter() - started - sum(timings.values())
    finally:
        torch_model.train(was_training)
    for record in (r for p in final for r in (p.keras,) if r is not None):
        record.layer = None  # a record would keep the Keras layer (and its variables) alive
    return Run(rows=rows, pairs=final, entries=weight_map.entries, outputs=outputs, hints=hints,
               conflicts=conflicts, unmapped_keras=unmapped, unwritten_torch=unwritten,
               preprocessing=sorted(preprocessing), copied=copy_weights, timings=timings, title=title,
               tolerances=tol, sensitivity=sensitivity)


def _reference_sensitivity(keras_model, keras_in, paired, rows, outputs, keras_outputs, keep, step,
                           accumulated: float):
    """The Keras model's own sensitivity (`engine.sensitivity`): run on its inputs and their round-off-perturbed
    copy as one batch, in chunks of `step` examples, each paired layer's two halves compared as it is recorded;
    the rows get their `reference_sensitivity`, each compared output its part. None when no input is a float
    (token ids have no round-off to perturb)."""
    if not any(conditioning.perturbable(a) for a in _leaves(keras_in)):
        return None
    path_of = {p.keras.order: (p.tower, p.keras.path) for p in paired}
    sums: dict = {}
    perturbed_chunks = []
    for begin in range(0, _batch(keras_in, "inputs"), step):
        chunk = _select(keras_in, slice(begin, begin + step))
        n = _batch(chunk, "inputs")
        meter = conditioning.Meter(path_of, n)
        _, out = _run_keras(keras_model, _map_leaves(conditioning.doubled, chunk), True, meter)
        conditioning.merge(sums, meter.sums)
        perturbed_chunks.append([(name, a[n:]) for name, a in out])
    conditioning.annotate(rows, {path_of[order]: s for order, s in sums.items()})
    plain, perturbed = dict(keras_outputs), dict(keep(_concat(perturbed_chunks)))
    parts = [conditioning.PartSensitivity(p.keras_name, p.max_abs, max_abs(plain[k], perturbed[k]), p.atol)
             for p in outputs.pairs if (k := p.keras_name) in plain and k in perturbed]
    return conditioning.Sensitivity(parts, conditioning.breakdown(rows, accumulated), accumulated=accumulated)


def _copy_by_numbers(keras_model, torch_model, keras_example, torch_example, pairs: list[Pair], inference,
                     table, mode: str, read: Callable[[str], np.ndarray]):
    """Copy the weights, numbers deciding where the mapping is in doubt. The tracer's own mapping is copied first;
    sibling groups order alone paired are decided by their consumers' outputs (`numeric.decide`); then each
    conflict with the table is measured on its layer's recorded input (`numeric.settle`), and the mapping in use
    (the table as given in `table` mode; the winners in `auto`) is copied over. One more Keras run on one example
    keeps what the groups, their containers and the conflicting layers received and gave.
    Returns the weight map and its conflicts (all of them measured)."""
    from tracer.engine.infer import reconcile, take_winners
    from tracer.engine.lockstep import drop_arrays
    from tracer.engine.numeric import by_numbers, rest_to_copy
    from tracer.engine.state import StateWriter
    from tracer.engine.transfer import tensor_checksum, transfer

    writer = StateWriter(torch_model)
    target = type(torch_model).__name__
    weight_map, conflicts = reconcile(table, inference, mode)
    in_use = {e.parameter for e in weight_map.entries}
    # In `table` mode a tensor the table leaves out keeps the torch model's own value: the tracer's copy is undone.
    kept = {n: t.detach().clone() for n, t in torch_model.state_dict().items()
            if mode == "table" and n in {e.parameter for e in inference.entries} - in_use}
    transfer(read, [], WeightMap(inference.entries), writer, allow_nonfinite=True, target=target)

    def run_keras(orders: set[int]) -> dict:
        records, keras_out[:] = _run_keras(keras_model, keras_example, True,
                                           sink=lambda r: None if r.order in orders else drop_arrays(r))
        return {r.order: r for r in records}

    def judge_whole() -> float:
        _, torch_out = _run_torch(torch_model, torch_example, False)
        compared = compare_outputs(keras_out, torch_out)
        return max((p.rel_l2 for p in compared.pairs), default=float("inf"))

    keras_out: list = []
    weight_map, conflicts, decisions = by_numbers(pairs, inference, table, mode, read, run_keras, judge_whole)
    if decisions:
        state = torch_model.state_dict()
        for e in inference.entries:
            if e.source == "numeric":
                e.hf_checksum = tensor_checksum(state[e.parameter].detach().numpy())
    for d in decisions:
        logger.info("numbers re-paired %s: %s -> %s (rel_l2 %.1e where consumed; by call order %.1e)", d.keras,
                    d.torch_by_order, d.torch_by_numbers, d.error, d.by_order)
    take_winners(weight_map, inference, mode)
    transfer(read, [], WeightMap(rest_to_copy(weight_map, inference)), writer, allow_nonfinite=True, target=target)
    if kept:
        writer.write(kept)
    return weight_map, conflicts


def _concat(chunks: list[list[tuple[str, np.ndarray]]]) -> list[tuple[str, np.ndarray]]:
    if not chunks:
        return []
    return [(name, np.concatenate([c[i][1] for c in chunks])) for i, (name, _) in enumerate(chunks[0])]
