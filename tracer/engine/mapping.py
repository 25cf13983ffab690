"""The weight mapping: `Entry(variable -> parameter, transform, source)`, built by matching rules against names,
and saved to / read from CSV or JSON so that a user can edit one entry and re-run."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tracer.errors import BadInputError, ConversionError
from tracer.engine.transforms import get_transform

# Translations applied to a rule's named groups before they fill its target template.
PARAM_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


@dataclass(frozen=True)
class Rule:
    pattern: str  # full-match regex over the Keras variable name
    target: str  # template over the pattern's named groups
    transform: str  # a name in transforms.TRANSFORMS

    def __post_init__(self):
        get_transform(self.transform)
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def apply(self, name: str, block_index: Mapping[str, int]) -> str | None:
        m = self._regex.fullmatch(name)
        if m is None:
            return None
        groups = dict(m.groupdict())
        if "param" in groups:
            groups["param"] = PARAM_NAMES.get(groups["param"], groups["param"])
        if "block" in groups:
            if groups["block"] not in block_index:
                return None
            groups["block"] = block_index[groups["block"]]
        return self.target.format(**groups)


@dataclass
class Conflict:
    """The table and the tracer map one Keras variable differently. `*_error`: the paired layer's local rel L2
    with that candidate's weights on its recorded input (None: not measured); `winner`: "table", "tracer", or ""
    (the numbers cannot tell: both fit, neither does, or the layer cannot be re-run); `resolved`: the run uses the
    winner (`--mapping auto`), rather than the table as given."""

    variable: str
    table_parameter: str
    table_transform: str
    tracer_parameter: str
    tracer_transform: str
    table_error: float | None = None
    tracer_error: float | None = None
    winner: str = ""
    resolved: bool = False

    def __str__(self) -> str:
        def err(e):
            return "" if e is None else f", local rel_l2 {e:.1e}"

        won = f"; the numbers pick the {self.winner}" if self.winner else ""
        return (f"{self.variable}: table -> {self.table_parameter} ({self.table_transform}{err(self.table_error)}), "
                f"tracer -> {self.tracer_parameter} ({self.tracer_transform}{err(self.tracer_error)}){won}")


@dataclass
class Entry:
    variable: str
    parameter: str
    transform: str
    source: str = "table"  # table | file | inferred | numeric
    keras_shape: tuple[int, ...] = ()
    hf_shape: tuple[int, ...] = ()
    status: str = ""
    keras_checksum: str = ""  # of the checkpoint tensor, and of what the HF parameter received
    hf_checksum: str = ""
    part: str = ""  # the part of the model the parameter belongs to (ALIGN's towers), when traced
    # With the torch model's own weights kept (`tracer.trace(copy_weights=False)`): the Keras weight(s) the
    # parameter equals under a layout transform (`name (transform)`; several joined by `; `), or "none".
    equals: str = ""
    evidence: str = ""  # why the entry is what it is, where numbers decided it (`numeric`)
    conflict: Conflict | None = None  # where the table and the tracer disagree on it: both candidates, measured

    def row(self) -> dict:
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "conflict"}
        row["keras_shape"] = "x".join(map(str, self.keras_shape))
        row["hf_shape"] = "x".join(map(str, self.hf_shape))
        row.update(conflict_columns(self.conflict))
        return row


CONFLICT_COLUMNS = ("table_candidate", "table_local_rel_l2", "tracer_candidate", "tracer_local_rel_l2", "winner")


def conflict_columns(c: Conflict | None) -> dict:
    """A conflict as mapping.csv's columns (empty where the entry has none)."""
    if c is None:
        return dict.fromkeys(CONFLICT_COLUMNS, "")
    return {"table_candidate": f"{c.table_parameter} ({c.table_transform})",
            "table_local_rel_l2": "" if c.table_error is None else c.table_error,
            "tracer_candidate": f"{c.tracer_parameter} ({c.tracer_transform})",
            "tracer_local_rel_l2": "" if c.tracer_error is None else c.tracer_error,
            "winner": c.winner}


@dataclass
class WeightMap:
    """Entries in checkpoint order, plus the checkpoint weights no rule matched."""

    entries: list[Entry]
    unmatched: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # table entries naming variables the checkpoint lacks

    def by_variable(self) -> dict[str, Entry]:
        return {e.variable: e for e in self.entries}


def map_by_rules(
    shapes: Mapping[str, Sequence[int]], rules: Iterable[Rule], block_index: Mapping[str, int], source: str = "table"
) -> WeightMap:
    """Match every variable against the rules; a name two rules claim, or two names one parameter, is an error."""
    rules = tuple(rules)
    entries, unmatched, owners = [], [], {}
    for name, shape in shapes.items():
        hits = [(rule, target) for rule in rules if (target := rule.apply(name, block_index)) is not None]
        if not hits:
            unmatched.append(name)
            continue
        if len(hits) > 1:
            raise ConversionError(f"`{name}` matches {len(hits)} rules: {[r.pattern for r, _ in hits]}")
        rule, target = hits[0]
        if target in owners:
            raise ConversionError(f"`{owners[target]}` and `{name}` both map to `{target}`")
        owners[target] = name
        entries.append(Entry(name, target, rule.transform, source, tuple(shape)))
    return WeightMap(entries, unmatched)


_COLUMNS = [f.name for f in fields(Entry) if f.name != "conflict"] + list(CONFLICT_COLUMNS)


def write_mapping(entries: Sequence[Entry], path: str | Path) -> Path:
    path = Path(path)
    rows = [e.row() for e in entries]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=1) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return path


def _shape(text) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(int(x) for x in text)
    return tuple(int(x) for x in str(text).split("x") if x != "")


def read_mapping(path: str | Path) -> list[Entry]:
    """Read a mapping file back; its entries become the table (source `file`)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"mapping file {path} does not exist")
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (ValueError, csv.Error, UnicodeDecodeError) as exc:
        raise BadInputError(f"mapping file {path} cannot be parsed: {exc}") from None
    entries = []
    for i, row in enumerate(rows):
        missing = {"variable", "parameter", "transform"} - set(row or {})
        if missing:
            raise BadInputError(f"mapping file {path}, row {i + 1}: missing column(s) {sorted(missing)}")
        try:
            get_transform(row["transform"])
        except ConversionError as exc:
            raise BadInputError(f"mapping file {path}, row {i + 1}: {exc}") from None
        entries.append(
            Entry(row["variable"], row["parameter"], row["transform"], "file", _shape(row.get("keras_shape", "")))
        )
    return entries


def map_by_file(shapes: Mapping[str, Sequence[int]], file_entries: Sequence[Entry]) -> WeightMap:
    """Use a mapping file as the table. Entries naming variables the checkpoint lacks are kept aside as `stray`
    (the caller reports them: an old table's `temperature:0` against coyo's `Variable`)."""
    known = {e.variable: e for e in file_entries}
    stray = sorted(set(known) - set(shapes))
    targets: dict[str, str] = {}
    for e in file_entries:
        if e.parameter in targets:
            raise BadInputError(f"the mapping file maps `{targets[e.parameter]}` and `{e.variable}` to `{e.parameter}`")
        targets[e.parameter] = e.variable
    entries = [
        Entry(n, known[n].parameter, known[n].transform, "file", tuple(s)) for n, s in shapes.items() if n in known
    ]
    return WeightMap(entries, [n for n in shapes if n not in known], stray)
