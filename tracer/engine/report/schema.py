"""What the report says: the columns of its CSV files, the rows and frames, the verdict, summary.json's
content (`summary`) and the end-of-run lines (`format_summary`). The schema is documented in the package
docstring (tracer/engine/report/__init__.py)."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from tracer.engine import compare
from tracer.engine.mapping import CONFLICT_COLUMNS, conflict_columns
from tracer.engine.row import COLUMNS, LayerRow, Status

LAYER_COLUMNS = COLUMNS
BLOCK_COLUMNS = [
    "tower", "block", "block_order", "first_order", "last_order", "layers", "status",
    "max_abs", "rel_l2", "local_max_abs", "local_rel_l2", "diverged", "amplified", "unpaired",
    "first_diverged_keras_layer", "first_diverged_hf_module", "hint",
]
MAPPING_COLUMNS = [
    "variable", "parameter", "transform", "source", "status", "keras_shape", "hf_shape",
    "keras_checksum", "hf_checksum", "equals", "evidence", *CONFLICT_COLUMNS,
]
SUMMARY_KEYS = [
    "schema_version", "checkpoint", "verdict", "verdict_text", "verdict_reasons", "sensitivity",
    "image_embeds_max_abs", "text_embeds_max_abs",
    "image_embeds_cosine_min", "text_embeds_cosine_min", "temperature", "coverage", "mapping_sources",
    "mapping_statuses", "layers", "layer_statuses", "first_local_divergence", "first_accumulated_divergence",
    "towers", "diverged_blocks", "tolerances", "hints", "reference_max_abs", "set_aside", "timings", "spec", "files",
]
DIVERGENCE_KEYS = ["tower", "order", "block", "keras_layer", "hf_module", "status", "max_abs", "rel_l2",
                   "local_max_abs", "local_rel_l2", "hint"]
STATUSES = [s.value for s in Status]
STATUS_RANK = {"ok": 0, "unpaired": 1, "amplified": 2, "diverged": 3}
MAPPING_SOURCES = ["table", "inferred", "numeric", "file"]
FILES = ["layers.csv", "blocks.csv", "mapping.csv", "summary.json", "report.html"]
SCHEMA_VERSION = 1


def default_run_name(checkpoint_path: str) -> str:
    path = Path(checkpoint_path.rstrip("/"))
    name = f"{path.parent.name}-{path.name}" if path.parent.name else path.name
    return f"{name or 'checkpoint'}-{time.strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------------ helpers
_float = compare.as_float


def _worst(values) -> float:
    finite = [v for v in map(_float, values) if math.isfinite(v)]
    return max(finite) if finite else float("nan")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _towers(rows: list[LayerRow]) -> list[str]:
    return list(dict.fromkeys(r.tower for r in rows))


def _tolerances(parity=None, tolerances: compare.Tolerances = compare.FLOAT32) -> dict:
    tol = tolerances.as_dict()
    if parity is not None:
        tol.update(parity.tolerances())
    tol["fault_growth"] = tolerances.fault_growth
    return tol


def _jsonable(value):
    """NaN/Inf -> None, numpy scalars -> Python, tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalar
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


# ------------------------------------------------------------------------------------------------ frames
def layers_frame(rows: list[LayerRow]) -> pd.DataFrame:
    return pd.DataFrame([r.record() for r in rows], columns=LAYER_COLUMNS)


def block_rows(rows: list[LayerRow]) -> list[dict]:
    """One row per (tower, block) in order of first appearance, aggregated as `BLOCK_COLUMNS` documents."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.tower, row.block or ""), []).append(row)
    out, per_tower = [], Counter()
    for (tower, block), members in groups.items():
        statuses = Counter(r.status for r in members)
        diverged = [r for r in members if r.diverged]
        hints = [r.hint for r in (diverged or members) if r.hint] or [r.hint for r in members if r.hint]
        orders = [int(r.order) for r in members]
        out.append({
            "tower": tower, "block": block, "block_order": per_tower[tower],
            "first_order": min(orders), "last_order": max(orders), "layers": len(members),
            "status": max((r.status for r in members), key=lambda s: STATUS_RANK.get(s, 0)),
            "max_abs": _worst(r.max_abs for r in members),
            "rel_l2": _worst(r.rel_l2 for r in members),
            "local_max_abs": _worst(r.local_max_abs for r in members),
            "local_rel_l2": _worst(r.local_rel_l2 for r in members),
            "diverged": statuses.get("diverged", 0), "amplified": statuses.get("amplified", 0),
            "unpaired": statuses.get("unpaired", 0),
            "first_diverged_keras_layer": diverged[0].keras_layer if diverged else "",
            "first_diverged_hf_module": diverged[0].hf_module if diverged else "",
            "hint": hints[0] if hints else "",
        })
        per_tower[tower] += 1
    return out


def blocks_frame(rows: list[LayerRow]) -> pd.DataFrame:
    return pd.DataFrame(block_rows(rows), columns=BLOCK_COLUMNS)


def mapping_rows(entries) -> list[dict]:
    out = []
    for e in entries:
        out.append({
            "variable": e.variable, "parameter": e.parameter, "transform": e.transform, "source": e.source,
            "status": _text(getattr(e, "status", "")),
            "keras_shape": "x".join(map(str, getattr(e, "keras_shape", ()) or ())),
            "hf_shape": "x".join(map(str, getattr(e, "hf_shape", ()) or ())),
            "keras_checksum": _text(getattr(e, "keras_checksum", "")),
            "hf_checksum": _text(getattr(e, "hf_checksum", "")),
            "equals": _text(getattr(e, "equals", "")),
            "evidence": _text(getattr(e, "evidence", "")),
            **conflict_columns(getattr(e, "conflict", None)),
        })
    return out


def mapping_frame(entries) -> pd.DataFrame:
    return pd.DataFrame(mapping_rows(entries), columns=MAPPING_COLUMNS)


# ------------------------------------------------------------------------------------------------ summary
def _local_fault(row: LayerRow, tolerances: compare.Tolerances = compare.FLOAT32) -> bool:
    local = row.local_rel_l2
    if math.isfinite(local) and local > tolerances.local_rel_l2:
        return True
    return row.diverged  # also a sub-tolerance activation fault (diagnose.SUSPECT_LOCAL)


def _accumulated_fault(row: LayerRow, tolerances: compare.Tolerances = compare.FLOAT32) -> bool:
    return row.rel_l2 > tolerances.accumulated_rel_l2


def _divergence(row: LayerRow | None) -> dict | None:
    if row is None:
        return None
    return _jsonable({k: getattr(row, k) for k in DIVERGENCE_KEYS})


def first_divergences(rows: list[LayerRow], tolerances: compare.Tolerances = compare.FLOAT32
                      ) -> tuple[dict | None, dict | None]:
    """(first row over the local tolerance, first row over the accumulated tolerance), as rows; `tolerances`:
    the run's set (its precision's)."""
    local = next((r for r in rows if _local_fault(r, tolerances)), None)
    accumulated = next((r for r in rows if _accumulated_fault(r, tolerances)), None)
    return local, accumulated


def _statuses(rows: list[LayerRow]) -> dict:
    counts = Counter(r.status for r in rows)
    return {**{s: counts.get(s, 0) for s in STATUSES}, **{s: n for s, n in counts.items() if s not in STATUSES}}


def verdict(rows: list[LayerRow], parity, sensitivity=None) -> tuple[str, list[str]]:
    """`match`, `ill-conditioned` or `diverged`, and why: diverged layers, then what the outputs' comparison
    (`parity.reasons()`) finds; `ill-conditioned` where the reference's own `sensitivity` explains the missed
    outputs and rows over tolerance (`sensitivity.rule`; never a diverged layer or a temperature not carried
    over)."""
    from tracer.engine import sensitivity as conditioning

    reasons = []
    diverged = sum(r.diverged for r in rows)
    if diverged:
        reasons.append(f"{diverged} layer(s) diverged")
    reasons += parity.reasons()
    if reasons and getattr(parity, "temperature_match", True) and conditioning.rule(rows, sensitivity):
        return conditioning.VERDICT, reasons + [conditioning.explanation(sensitivity)]
    return ("diverged" if reasons else "match"), reasons


def verdict_text(word: str) -> str:
    from tracer.engine import sensitivity as conditioning

    return conditioning.VERDICT_TEXT if word == conditioning.VERDICT else word


def summary(result, checkpoint_path: str) -> dict:
    p, rows = result.parity, result.rows
    entries = result.entries or []
    sensitivity = getattr(result, "sensitivity", None)
    name, reasons = verdict(rows, p, sensitivity)
    tolerances = getattr(result, "tolerances", None) or compare.FLOAT32  # the run's precision's set
    local, accumulated = first_divergences(rows, tolerances)
    towers = {}
    for tower in _towers(rows):
        members = [r for r in rows if r.tower == tower]
        t_local, t_acc = first_divergences(members, tolerances)
        towers[tower] = {
            "layers": len(members), "layer_statuses": _statuses(members),
            "first_local_divergence": _divergence(t_local), "first_accumulated_divergence": _divergence(t_acc),
            "final_rel_l2": members[-1].rel_l2,
        }
    sources = Counter(e.source for e in entries)
    spec = getattr(result, "spec", None)
    out = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": str(checkpoint_path),
        "verdict": name,
        "verdict_text": verdict_text(name),
        "verdict_reasons": reasons,
        "sensitivity": sensitivity.as_dict(rows) if sensitivity is not None else None,
        **p.summary_fields(),
        "coverage": result.coverage.as_dict() if getattr(result, "coverage", None) else None,
        "mapping_sources": {**{s: sources.get(s, 0) for s in MAPPING_SOURCES}, **sources},
        "mapping_statuses": dict(Counter(_text(getattr(e, "status", "")) for e in entries)),
        "layers": len(rows),
        "layer_statuses": _statuses(rows),
        "first_local_divergence": _divergence(local),
        "first_accumulated_divergence": _divergence(accumulated),
        "towers": towers,
        "diverged_blocks": [f"{b['tower']}/{b['block']}" for b in block_rows(rows) if b["status"] == "diverged"],
        "tolerances": _tolerances(p, tolerances),
        "hints": [str(h) for h in getattr(result, "hints", None) or []],
        "reference_max_abs": dict(getattr(result, "reference_max_abs", None) or {}),
        "set_aside": getattr(result, "set_aside", None),
        "timings": {k: round(v, 3) for k, v in (getattr(result, "timings", None) or {}).items()},
        "spec": spec.to_dict() if hasattr(spec, "to_dict") else None,
        "files": FILES,
    }
    return _jsonable(out)


# ------------------------------------------------------------------------------------------------ CLI summary
def _fmt(value, spec: str = ".2e") -> str:
    v = _float(value)
    if math.isnan(v):
        return "—"
    if v == 0:
        return "0"
    return format(v, spec)


def _where(d: dict) -> str:
    return (f"{d['tower']} {d['keras_layer'] or '(no Keras layer)'} -> {d['hf_module'] or '(no HF module)'} "
            f"[{d['block']}]")


def format_summary(result) -> str:
    """The end-of-run lines: verdict, embedding differences, first divergence with its hint, report path."""
    data = summary(result, "")
    lines = []
    counts = data["layer_statuses"]
    layers = (f" ({counts['diverged']} of {data['layers']} layers diverged, {counts['amplified']} amplified)"
              if data["layers"] else "")
    lines.append(f"verdict: {data['verdict_text'].upper()}{layers}")
    for reason in data["verdict_reasons"]:
        lines.append(f"  - {reason}")
    lines += result.parity.summary_lines(data)
    local, accumulated = data["first_local_divergence"], data["first_accumulated_divergence"]
    if local:
        lines.append(f"first divergence: {_where(local)}: own error rel {_fmt(local['local_rel_l2'])}, "
                     f"max|Δ| {_fmt(local['local_max_abs'])}")
        if local["hint"]:
            lines.append(f"  hint: {local['hint']}")
    if accumulated and (not local or (accumulated["tower"], accumulated["order"]) != (local["tower"], local["order"])):
        lines.append(f"first over tolerance (accumulated): {_where(accumulated)}: rel {_fmt(accumulated['rel_l2'])}")
    for hint in data["hints"]:
        lines.append(f"hint: {hint}")
    report = getattr(result, "report", None)
    if report:
        lines.append(f"report: {Path(report) / 'report.html'}")
    return "\n".join(lines)
