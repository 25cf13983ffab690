"""Numbers decide where order cannot: sibling layers of one kind and shape whose pairing by call order may be
wrong (a port that computes value before query, two equal-shape branches called the other way round).

A sibling's own output cannot tell: any of them computes a Keras layer's output exactly once given its weights.
What tells is what consumes them. So for each such group, with every weight copied, each assignment of the Keras
layers' weights to the group's torch modules is tried, and the torch side of the smallest paired container around
the group (or, with none, the whole model) is run on the Keras side's recorded input: the assignment whose output
agrees wins. Where it is not the order's, the modules are rewritten, and their mapping entries say `numeric`, with
the runner-up's error as evidence.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tracer.engine.compare import LOCAL_REL_L2, divergence, local_output
from tracer.engine.pairing import Pair, weight_signature
from tracer.engine.transforms import get_transform

MAX_GROUP = 4  # permutations tried exhaustively: 4! = 24 at most


@dataclass
class Decision:
    keras: list[str]  # the group's Keras layer paths
    torch_by_order: list[str]  # the torch modules order gave them
    torch_by_numbers: list[str]  # the torch modules the numbers give them
    error: float  # the chosen assignment's rel_l2 where it is judged
    runner_up: float  # the best other assignment's
    by_order: float  # the call order's


def ambiguous_groups(pairs: list[Pair]) -> list[list[int]]:
    """Indices (into `pairs`) of siblings: paired weighted leaves next to each other in the pairing (no other
    weighted pair between them) that share a Keras parent, a kind, a weight signature and input and output shapes,
    two or more to a group. (That they take the same input is checked on the recorded arrays, in `decide`.)"""
    groups, current, key_of_current = [], [], None
    for i, p in enumerate(pairs):
        if not p.paired or not (p.keras.variables or p.torch.variables):
            continue
        key = None
        if not p.keras.is_container and p.keras.variables and not p.fused:
            key = (p.tower, p.keras.path.rsplit("/", 1)[0] if "/" in p.keras.path else "", p.keras.kind,
                   weight_signature(p.keras), p.keras.input_shape, p.keras.shape)
        if key is not None and key == key_of_current:
            current.append(i)
            continue
        if 2 <= len(current) <= MAX_GROUP:
            groups.append(current)
        current, key_of_current = ([i], key) if key is not None else ([], None)
    if 2 <= len(current) <= MAX_GROUP:
        groups.append(current)
    return groups


def enclosing(pairs: list[Pair], group: list[int]) -> Pair | None:
    """The smallest paired container whose torch module holds every member of the group, or None."""
    paths = [pairs[i].torch.path for i in group]
    best = None
    for p in pairs:
        if p.paired and p.torch.is_container and all(path.startswith(p.torch.path + ".") for path in paths):
            if best is None or len(p.torch.path) > len(best.torch.path):
                best = p
    return best


@contextmanager
def _holding(assignments: list[tuple[object, dict[str, np.ndarray]]]):
    """Torch modules with the given parameters or buffers (own names -> arrays in torch layout) for a moment."""
    import torch

    saved = [(m, {n: getattr(m, n).detach().clone() for n in values}) for m, values in assignments]
    try:
        with torch.no_grad():
            for module, values in assignments:
                for name, value in values.items():
                    getattr(module, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
        yield
    finally:
        with torch.no_grad():
            for module, values in saved:
                for name, value in values.items():
                    getattr(module, name).copy_(value)


def _weights(entries_of: dict, keras_record, read) -> dict[str, np.ndarray]:
    """A Keras layer's weights in torch layout, by the torch parameter's own name (`weight`, `bias`)."""
    out = {}
    for variable in keras_record.variables:
        entry = entries_of[variable]
        out[entry.parameter.rsplit(".", 1)[-1]] = get_transform(entry.transform)(read(variable))
    return out


def decide(pairs: list[Pair], groups: list[list[int]], entries: list, read: Callable[[str], np.ndarray],
           judge_whole: Callable[[], float]) -> list[Decision]:
    """Re-assign each group where another assignment fits and the order's does not. `pairs`: the group members'
    and their containers' Keras records hold one example's arrays; the torch model holds every copied weight.
    `read(keras name)`: a Keras weight; `judge_whole()`: the whole model's output error on that example (for a
    group no paired container holds). The chosen weights are left written; `pairs` and `entries` are updated."""
    entries_of = {e.variable: e for e in entries}
    decisions = []
    for group in groups:
        members = [pairs[i] for i in group]
        if any(v not in entries_of for p in members for v in p.keras.variables):
            continue
        if any(p.keras.input is None or not np.array_equal(p.keras.input, members[0].keras.input) for p in members):
            continue  # not siblings: they do not read the same tensor
        container = enclosing(pairs, group)
        if container is not None and container.keras.output is None:
            continue

        def judge() -> float:
            if container is None:
                return judge_whole()
            out = local_output(container)
            return float("inf") if out is None else divergence(container.keras.output, out).rel_l2

        weights = [_weights(entries_of, p.keras, read) for p in members]
        modules = [p.torch.module for p in members]
        scored = []
        for perm in itertools.permutations(range(len(members))):
            with _holding([(modules[j], weights[i]) for i, j in enumerate(perm)]):
                scored.append((judge(), perm))
        order = tuple(range(len(members)))
        by_order = next(e for e, perm in scored if perm == order)
        scored.sort()
        best_error, best = scored[0]
        if best == order or not best_error <= LOCAL_REL_L2 or not by_order > max(LOCAL_REL_L2, 100 * best_error):
            continue  # the order fits, or nothing does (a fault for the diagnosis, not a pairing)
        runner_up = scored[1][0]
        decisions.append(Decision([p.keras.path for p in members], [p.torch.path for p in members],
                                  [members[j].torch.path for j in best], best_error, runner_up, by_order))
        _apply(members, best, modules, weights, entries_of, best_error, runner_up, by_order)
    return decisions


def _apply(members, best, modules, weights, entries_of, error, runner_up, by_order) -> None:
    """Write the chosen assignment and re-pair: Keras layer i now pairs with the torch module `best[i]`."""
    import torch

    with torch.no_grad():
        for i, j in enumerate(best):
            for name, value in weights[i].items():
                getattr(modules[j], name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    torch_records = [(p.torch, p.torch_weights) for p in members]
    for i, j in enumerate(best):
        pair = members[i]
        pair.torch, pair.torch_weights = torch_records[j]
        for variable in pair.keras.variables:
            entry = entries_of[variable]
            entry.parameter = f"{pair.torch_weights.path}.{entry.parameter.rsplit('.', 1)[-1]}"
            entry.source = "numeric"
            entry.evidence = (f"numbers: rel_l2 {error:.1e} where it is consumed, the runner-up {runner_up:.1e}, "
                              f"the call order's {by_order:.1e}")


# ------------------------------------------------------------------------------------------------ conflicts
def _candidate_values(pair: Pair, by_parameter: dict, read) -> list[tuple[object, dict[str, np.ndarray]]] | None:
    """What a mapping (`by_parameter`: torch name -> entry) writes into the tensors of the pair's weights module
    and its submodules, as `_holding` takes it; None where a value does not fit its tensor's shape."""
    root = pair.torch_weights or pair.torch
    out = []
    for sub_path, module in root.module.named_modules():
        prefix = f"{root.path}.{sub_path}" if sub_path else root.path
        values = {}
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            entry = by_parameter.get(f"{prefix}.{name}")
            if entry is None:
                continue
            value = get_transform(entry.transform)(read(entry.variable))
            if tuple(value.shape) != tuple(tensor.shape):
                return None
            values[name] = value
        if values:
            out.append((module, values))
    return out


def _local_error(pair: Pair, values) -> float | None:
    if values is None:
        return float("inf")  # the candidate cannot even be written: it does not fit
    with _holding(values):
        out = local_output(pair)
    return None if out is None else divergence(pair.keras.output, out).rel_l2


def _owners(pairs: list[Pair]) -> dict[str, Pair]:
    """Keras variable -> the paired layer that holds it."""
    return {v: p for p in pairs if p.paired for v in p.keras.variables}


def settle(pairs: list[Pair], conflicts: list, table_entries: list, tracer_entries: list,
           read: Callable[[str], np.ndarray]) -> None:
    """Measure each conflict (`mapping.Conflict`): the paired layer that owns its Keras variable re-run on its
    recorded input (its record holds one example's arrays) with the weights the table gives its module, then
    with those the tracer gives it; the candidate whose output agrees (local rel_l2 within `LOCAL_REL_L2`) while
    the other's does not is the winner. The torch model is left as it was."""
    owner = _owners(pairs)
    table = {e.parameter: e for e in table_entries}
    tracer = {e.parameter: e for e in tracer_entries}
    for c in conflicts:
        pair = owner.get(c.variable)
        if pair is None or pair.keras.output is None:
            continue
        c.table_error = _local_error(pair, _candidate_values(pair, table, read))
        c.tracer_error = _local_error(pair, _candidate_values(pair, tracer, read))
        if c.table_error is None or c.tracer_error is None:
            continue
        fits = {side: err <= LOCAL_REL_L2 for side, err in (("table", c.table_error), ("tracer", c.tracer_error))}
        if fits["table"] != fits["tracer"]:
            c.winner = "table" if fits["table"] else "tracer"


def by_numbers(pairs: list[Pair], inference, table, mode: str, read: Callable[[str], np.ndarray],
               run_keras: Callable[[set[int]], dict], judge_whole: Callable[[], float]):
    """Where the mapping is in doubt, numbers decide; the torch model holds the tracer's mapping (`inference`)
    already. Sibling groups order alone paired are decided by their consumers (`decide`); then each conflict with
    the table is measured (`settle`). `run_keras(orders)`: one Keras run on one example, returning the records
    of those orders with their arrays. Returns (weight map, conflicts, decisions), as `infer.reconcile` gives the
    first two once the numbers are in (`infer.take_winners` then applies them)."""
    from tracer.engine.infer import reconcile
    from tracer.engine.lockstep import drop_arrays

    weight_map, conflicts = reconcile(table, inference, mode)
    # A table without gaps names every weight's place: the tracer's order-based guesses between siblings need no
    # tie-break there (BERT-Base: 72 judge runs), any disagreement with the table is measured below (`settle`).
    groups = [] if table is not None and not table.unmatched else ambiguous_groups(pairs)
    owners = _owners(pairs)
    wanted = [pairs[i] for group in groups for i in group]
    wanted += [c for group in groups if (c := enclosing(pairs, group)) is not None]
    wanted += [owners[c.variable] for c in conflicts if c.variable in owners]
    probes = list({id(p.keras): p.keras for p in wanted}.values())
    if not probes:
        return weight_map, conflicts, []
    records = run_keras({r.order for r in probes})
    shapes = _run_shapes(list({id(p): p for p in wanted}.values()), records)
    for probe in probes:  # the probe's records get this example's arrays
        run = records[probe.order]
        probe.output, probe.input, probe.inputs, probe.input_kwargs = run.output, run.input, run.inputs, run.input_kwargs
    try:
        decisions = decide(pairs, groups, inference.entries, read, judge_whole)
        weight_map, conflicts = reconcile(table, inference, mode)  # the tracer's side as the numbers left it
        settle(pairs, conflicts, table.entries if table else [], inference.entries, read)
    finally:
        for probe in probes:
            drop_arrays(probe)
        for record, shape, input_shape in shapes:
            record.shape, record.input_shape = shape, input_shape
    return weight_map, conflicts, decisions


def _torch_shape(keras_shape: tuple, probe_torch: tuple, probe_keras: tuple, layout: str) -> tuple:
    """A torch record's shape on the example, from the Keras one there and how the two related on the probe."""
    if not keras_shape or not probe_torch:
        return probe_torch
    if layout == "nchw" and len(keras_shape) == 4 == len(probe_torch):
        return (keras_shape[0], keras_shape[3], keras_shape[1], keras_shape[2])
    return tuple(keras_shape) if tuple(probe_torch) == tuple(probe_keras) else probe_torch


def _run_shapes(pairs: list[Pair], records: dict) -> list[tuple]:
    """The pairs' records take the shapes of the example's run (the probe may have run on a smaller input, as
    ALIGN's does); returns what to restore: (record, shape, input_shape)."""
    saved, seen = [], set()
    for p in pairs:
        run = records[p.keras.order]
        layout, input_layout = p.layout, p.input_layout  # as the probe's shapes tell them
        weights = p.torch_weights or p.torch
        new = {id(p.keras): (p.keras, tuple(run.shape), tuple(run.input_shape))}
        for record in {id(p.torch): p.torch, id(weights): weights}.values():
            shape = _torch_shape(tuple(run.shape), record.shape, p.keras.shape, layout) if record is p.torch \
                else record.shape
            input_shape = _torch_shape(tuple(run.input_shape), record.input_shape, p.keras.input_shape, input_layout)
            new.setdefault(id(record), (record, shape, input_shape))
        for key, (record, shape, input_shape) in new.items():
            if key not in seen:
                seen.add(key)
                saved.append((record, record.shape, record.input_shape))
        for record, shape, input_shape in new.values():
            record.shape, record.input_shape = shape, input_shape
    return saved


def rest_to_copy(weight_map, inference) -> list:
    """The entries in use that the tracer's copy did not write; those it did take its checksums."""
    copied = {(e.variable, e.parameter, e.transform): e for e in inference.entries}
    rest = []
    for e in weight_map.entries:
        twin = copied.get((e.variable, e.parameter, e.transform))
        if twin is None:
            rest.append(e)
        elif twin is not e:
            e.hf_shape, e.keras_checksum, e.hf_checksum = twin.hf_shape, twin.keras_checksum, twin.hf_checksum
    return rest
