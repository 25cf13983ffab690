"""Infer the weight mapping from paired layers, then confirm it against a rename table.

Within a paired layer, order decides: Keras creates `kernel, bias` / `gamma, beta, moving_mean,
moving_variance` in the order torch registers `weight, bias, running_mean, running_var`, so each Keras variable
takes the first unused parameter whose shape it fits under the layer's layout transform. Variables a container
owns itself (BERT's embedding tables) go to the parameters of the paired container's subtree, by shape.
Whatever is left (the temperature) is matched globally when the shape leaves exactly one candidate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tracer.engine.mapping import Conflict, Entry, WeightMap
from tracer.engine.pairing import KERNEL_TRANSFORMS, Pair, torch_layout

logger = logging.getLogger(__name__)

STATUSES = ("confirmed", "table-only", "inferred-only", "conflict")


def transform_for(kind: str, keras_shape: tuple[int, ...]) -> str:
    if len(keras_shape) == 0:
        return "scalar"
    if len(keras_shape) == 5:
        return "bn_squeeze"
    return KERNEL_TRANSFORMS.get((kind, len(keras_shape)), "identity")


@dataclass
class Inference:
    entries: list[Entry]  # source "inferred" or "numeric", in checkpoint order
    unresolved: list[str]  # checkpoint weights inference could not place
    ambiguous: dict[str, list[str]]  # variable -> equally fitting parameters, where the pick was by order


def _assign(variables: dict[str, tuple], kind: str, candidates: dict[str, tuple], taken: set[str],
            out: dict[str, Entry], ambiguous: dict[str, list[str]]) -> None:
    for name, shape in variables.items():
        if name in out:
            continue
        want = torch_layout(kind, shape)
        fits = [p for p, s in candidates.items() if p not in taken and s == want]
        if not fits:
            continue
        if len(fits) > 1:
            ambiguous[name] = fits
        taken.add(fits[0])
        out[name] = Entry(name, fits[0], transform_for(kind, shape), "inferred", tuple(shape), want)


def infer_mapping(pairs: list[Pair], checkpoint_shapes: dict[str, tuple], hf_shapes: dict[str, tuple]) -> Inference:
    """`hf_shapes`: every HF parameter/persistent buffer that needs a checkpoint value, name -> shape."""
    out: dict[str, Entry] = {}
    taken: set[str] = set()
    ambiguous: dict[str, list[str]] = {}
    # Leaves first: their parameters are their own.
    for p in pairs:
        if p.keras is not None and p.torch_weights is not None and not p.keras.is_container:
            _assign(p.keras.variables, p.keras.kind, p.torch_weights.variables, taken, out, ambiguous)
    # Containers that own variables: search the paired torch container's whole subtree.
    for p in pairs:
        if p.paired and p.keras.is_container and p.keras.variables:
            prefix = p.torch.path + "."
            subtree = {n: s for n, s in hf_shapes.items() if n.startswith(prefix)}
            _assign(p.keras.variables, "embedding", subtree, taken, out, ambiguous)
    # Odd ones out (the temperature, anything no recorded layer owns): a unique shape fit across the model.
    left = {n: s for n, s in checkpoint_shapes.items() if n not in out}
    free = {n: s for n, s in hf_shapes.items() if n not in taken}
    for name, shape in left.items():
        fits = [p for p, s in free.items() if p not in taken and s == torch_layout("", shape)]
        if len(fits) == 1:
            taken.add(fits[0])
            out[name] = Entry(name, fits[0], transform_for("", shape), "inferred", tuple(shape), tuple(shape))
    entries = [out[n] for n in checkpoint_shapes if n in out]
    unresolved = [n for n in checkpoint_shapes if n not in out]
    return Inference(entries, unresolved, ambiguous)


def reconcile(table: WeightMap | None, inferred: Inference, mode: str) -> tuple[WeightMap, list[Conflict]]:
    """Give every entry a status and choose what to use.

    `table`: the rules (or the mapping file) alone. `infer`: the tracer alone. `auto`: the table where it has
    an entry, inference for every gap. Where both have an entry and disagree, the entry in use carries a
    `Conflict` (also returned): the numbers settle it (`numeric.settle`), then `take_winners` applies them.
    """
    by_table = table.by_variable() if table else {}
    by_infer = {e.variable: e for e in inferred.entries}
    names = list(dict.fromkeys([*(e.variable for e in table.entries)] if table else []))
    names += [e.variable for e in inferred.entries if e.variable not in by_table]
    chosen, conflicts = [], []
    for name in names:
        t, i = by_table.get(name), by_infer.get(name)
        if t:
            t.conflict = None
        if i:
            i.conflict = None
        if t and i:
            same = (t.parameter, t.transform) == (i.parameter, i.transform)
            status = "confirmed" if same else "conflict"
            entry = t if mode != "infer" else i
            if not same and mode != "infer":
                conflict = Conflict(name, t.parameter, t.transform, i.parameter, i.transform)
                conflicts.append(conflict)
                t.conflict = i.conflict = conflict
        elif t:
            status, entry = "table-only", t
        else:
            status, entry = "inferred-only", i
        if mode == "table" and entry is not t:
            continue
        entry.status = status
        chosen.append(entry)
    used = {e.variable for e in chosen}
    pending = inferred.unresolved if mode != "table" else (table.unmatched if table else [])
    return WeightMap(chosen, [n for n in pending if n not in used]), conflicts


def take_winners(weight_map: WeightMap, inferred: Inference, mode: str) -> list[Conflict]:
    """After the numbers (`numeric.settle`): in `auto`, each conflict they decide is resolved by its winner, the
    entry marked `numeric` with both errors as evidence; in `table` the table stays as given. Returns the
    conflicts left unresolved (the run fails on them once the report is written)."""
    by_infer = {e.variable: e for e in inferred.entries}
    left = []
    for k, entry in enumerate(weight_map.entries):
        c = entry.conflict
        if c is None:
            continue
        if mode != "auto" or not c.winner:
            left.append(c)
            continue
        chosen = by_infer[c.variable] if c.winner == "tracer" else entry
        chosen.status, chosen.source, chosen.conflict, c.resolved = "conflict", "numeric", c, True
        loser = "table" if c.winner == "tracer" else "tracer"
        chosen.evidence = (f"numbers: the {c.winner}'s candidate fits (local rel_l2 "
                           f"{c.table_error if c.winner == 'table' else c.tracer_error:.1e}), the {loser}'s "
                           f"{c.tracer_error if c.winner == 'table' else c.table_error:.1e}")
        weight_map.entries[k] = chosen
    return left
