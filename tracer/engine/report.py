"""Write the divergence report of a traced run into one folder (default `reports/<run-name>/`).

Every file is written into a temporary folder beside the destination and renamed into place at the end, so an
interrupted run never leaves a half-written report (an older report of the same name is replaced only once
the new one is complete).

Files
-----
``layers.csv`` (`LAYER_COLUMNS`): one row per paired layer (and per unpaired layer that computes something), in
execution order per tower (vision first, then text).

    tower            vision | text
    order            0-based position of the row within its tower
    block            `stem`, `block1a`…, `pooling` (vision); `embeddings`, `layer_._i`, `pooler`, `projection`
                     (text); the tower's name for the containers around them
    keras_layer      the Keras layer's path, keras_class its class
    hf_module        the HF module's dotted name, hf_class its class
    keras_shape      output shapes as `AxBxC` (each in its own layout: NHWC for Keras, NCHW for torch)
    hf_shape
    max_abs          accumulated error: HF's output vs Keras' output with the whole upstream computed by each
    mean_abs           side (max |Δ|, mean |Δ|, ‖Δ‖/‖keras‖, cosine)
    rel_l2
    cosine
    local_max_abs    local error: the HF module run on the Keras layer's own input (max |Δ|, relative L2);
    local_rel_l2       empty where it cannot be measured
    growth           rel_l2 / the previous row's rel_l2 in the same tower
    reference_sensitivity          the original model against itself on its input moved by float32 round-off
    reference_sensitivity_max_abs    (rel L2, max|Δ|; tracer/engine/sensitivity.py): measured only when an
                     output or a row misses its tolerance and no layer is locally off; empty otherwise
    status           ok | amplified (accumulated error over tolerance, own error within) | diverged (own error
                     over tolerance) | unpaired (a layer without a partner)
    weights          `variable -> parameter; …` for the weights the Keras layer owns
    mapping_source   where those mappings came from: table | inferred | numeric | file (comma separated)
    hint             a likely cause, for diverged rows (tracer/engine/diagnose.py); empty otherwise

``blocks.csv`` (`BLOCK_COLUMNS`): one row per (tower, block), in order of first appearance.

    tower, block
    block_order          0-based position of the block within its tower
    first_order          the first and last layer `order` in the block
    last_order
    layers               number of layer rows in the block
    status               the worst of its rows: diverged > amplified > unpaired > ok
    max_abs, rel_l2      the worst accumulated error among its rows
    local_max_abs        the worst local error among its rows (empty when none was measured)
    local_rel_l2
    diverged, amplified, unpaired   how many of its rows have that status
    first_diverged_keras_layer      the first diverged row in the block (empty when none)
    first_diverged_hf_module
    hint                 the first diverged row's hint, else the first non-empty hint in the block

``mapping.csv`` (`MAPPING_COLUMNS`): every checkpoint variable and the HF parameter it was written to. Readable
back as a `--mapping_file`.

    variable, parameter, transform
    source               table | inferred | numeric | file
    status               confirmed | mismatch | inferred-only | … (tracer/engine/infer.py)
    keras_shape, hf_shape
    keras_checksum       a checksum of the checkpoint tensor and of the tensor written into the HF model, when
    hf_checksum            the transfer computed them (`Entry.keras_checksum` / `Entry.hf_checksum`); else empty
    equals               `tracer.trace(copy_weights=False)`: the Keras weight(s) the torch tensor holds under a
                           layout transform, `name (transform)` joined by `; `, or `none`; else empty
    evidence             for `numeric` entries: the local errors that decided them; else empty
    table_candidate      where the table and the tracer disagree (`mapping.Conflict`): each one's
    table_local_rel_l2     `parameter (transform)` and the paired layer's local rel L2 with its weights on the
    tracer_candidate       recorded input; `winner`: table | tracer | empty (the numbers cannot tell); else empty
    tracer_local_rel_l2
    winner

``summary.json``: the stable contract other tools read (`SUMMARY_KEYS`; floats that are NaN/Inf are null).

    schema_version           1
    checkpoint               the checkpoint path
    verdict                  "match" | "ill-conditioned" | "diverged": "diverged" when any layer row is
                             `diverged`, when either final embedding misses the tolerance (max |Δ| > atol), or
                             when the temperature was not carried over; `amplified` rows alone never make a run
                             diverge. "ill-conditioned" (a match): outputs miss their tolerance, no layer
                             diverged, and every missed output and row over tolerance is within
                             sensitivity.SAME_SIZE of what the original model itself moves by under a one-ulp
                             change of its input (the input's conditioning, not the port)
    verdict_text             the verdict for a person: "match", "match (ill-conditioned input)", "diverged"
    verdict_reasons          the reasons above, as sentences ([] on a match)
    sensitivity              null (not measured), or `sensitivity.Sensitivity.as_dict(rows)`: {"parts": [{"part",
                             "error" (Keras vs HF max|Δ|), "sensitivity" (Keras vs perturbed Keras), "tolerance",
                             "missed", "explained", "ratio"}], "breakdown" (the first row whose
                             reference_sensitivity exceeds the accumulated tolerance), "factor", "perturbation",
                             "rows_measured", "rows_over_tolerance", "rows_unexplained", "first_unexplained"}
    image_embeds_max_abs     max |Δ| of the L2-normalised image / text embeddings
    text_embeds_max_abs
    image_embeds_cosine_min  the smallest per-example cosine similarity of those embeddings
    text_embeds_cosine_min
    temperature              {"checkpoint", "hf", "match"}
    coverage                 {"hf_tensors_written", "hf_tensors_total", "checkpoint_weights_used",
                              "checkpoint_weights_total"} (null when no weights were copied)
    mapping_sources          entries per source; table, inferred, numeric and file are always present
    mapping_statuses         entries per status
    layers                   number of layer rows
    layer_statuses           rows per status; ok, amplified, diverged and unpaired are always present
    first_local_divergence   null or {"tower", "order", "block", "keras_layer", "hf_module", "status", "max_abs",
                             "rel_l2", "local_max_abs", "local_rel_l2", "hint"}: the first row whose own error
                             exceeds the local tolerance (where no local measurement exists: the first row
                             whose status is `diverged`, i.e. a jump in accumulated error)
    first_accumulated_divergence   the same shape: the first row whose accumulated rel_l2 exceeds tolerance
    towers                   {"vision"|"text": {"layers", "layer_statuses", "first_local_divergence",
                              "first_accumulated_divergence", "final_rel_l2"}}
    diverged_blocks          ["vision/stem", …]: blocks whose status is diverged, in order
    tolerances               the run's compare.Tolerances, FLOAT32 or (--float64) FLOAT64 ({"local_rel_l2",
                             "accumulated_rel_l2", "amplified_max_abs", "embeds_max_abs"}, the last being the run's
                             atol) plus "fault_growth"
    hints                    run-level hints (tracer/engine/diagnose.py)
    reference_max_abs        HF vs reference outputs given with the inputs ({} when none)
    set_aside                optimizer / metric variables ignored in the checkpoint
    timings                  seconds per pipeline stage (up to the report)
    spec                     the derived model description (AlignSpec.to_dict())
    files                    the files of the report

``report.html``: the same, for a person; self-contained (inline CSS and SVG, no script, opens from disk).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from tracer.engine import compare
from tracer.engine.mapping import CONFLICT_COLUMNS, conflict_columns

LAYER_COLUMNS = [
    "tower", "order", "block", "keras_layer", "keras_class", "hf_module", "hf_class", "keras_shape", "hf_shape",
    "max_abs", "mean_abs", "rel_l2", "cosine", "local_max_abs", "local_rel_l2", "growth",
    "reference_sensitivity", "reference_sensitivity_max_abs", "status", "weights", "mapping_source", "hint",
]
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
STATUSES = ["ok", "amplified", "diverged", "unpaired"]
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


def _finite(value) -> bool:
    return math.isfinite(_float(value))


def _worst(values) -> float:
    finite = [v for v in map(_float, values) if math.isfinite(v)]
    return max(finite) if finite else float("nan")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _towers(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["tower"] for r in rows))


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
def layers_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=LAYER_COLUMNS)
    for column in ("weights", "mapping_source", "hint"):
        frame[column] = frame[column].fillna("")
    return frame


def block_rows(rows: list[dict]) -> list[dict]:
    """One row per (tower, block) in order of first appearance, aggregated as `BLOCK_COLUMNS` documents."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tower"], row.get("block") or ""), []).append(row)
    out, per_tower = [], Counter()
    for (tower, block), members in groups.items():
        statuses = Counter(r.get("status", "") for r in members)
        diverged = [r for r in members if r.get("status") == "diverged"]
        hints = [_text(r.get("hint")) for r in (diverged or members)]
        hints = [h for h in hints if h] or [h for h in (_text(r.get("hint")) for r in members) if h]
        orders = [int(r["order"]) for r in members]
        out.append({
            "tower": tower, "block": block, "block_order": per_tower[tower],
            "first_order": min(orders), "last_order": max(orders), "layers": len(members),
            "status": max((r.get("status", "ok") for r in members), key=lambda s: STATUS_RANK.get(s, 0)),
            "max_abs": _worst(r.get("max_abs") for r in members),
            "rel_l2": _worst(r.get("rel_l2") for r in members),
            "local_max_abs": _worst(r.get("local_max_abs") for r in members),
            "local_rel_l2": _worst(r.get("local_rel_l2") for r in members),
            "diverged": statuses.get("diverged", 0), "amplified": statuses.get("amplified", 0),
            "unpaired": statuses.get("unpaired", 0),
            "first_diverged_keras_layer": diverged[0]["keras_layer"] if diverged else "",
            "first_diverged_hf_module": diverged[0]["hf_module"] if diverged else "",
            "hint": hints[0] if hints else "",
        })
        per_tower[tower] += 1
    return out


def blocks_frame(rows: list[dict]) -> pd.DataFrame:
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
def _local_fault(row: dict, tolerances: compare.Tolerances = compare.FLOAT32) -> bool:
    local = _float(row.get("local_rel_l2"))
    if math.isfinite(local) and local > tolerances.local_rel_l2:
        return True
    return row.get("status") == "diverged"  # also a sub-tolerance activation fault (diagnose.SUSPECT_LOCAL)


def _accumulated_fault(row: dict, tolerances: compare.Tolerances = compare.FLOAT32) -> bool:
    return _float(row.get("rel_l2")) > tolerances.accumulated_rel_l2


def _divergence(row: dict | None) -> dict | None:
    if row is None:
        return None
    out = {k: row.get(k) for k in DIVERGENCE_KEYS}
    out["hint"] = _text(out["hint"])
    return _jsonable(out)


def first_divergences(rows: list[dict], tolerances: compare.Tolerances = compare.FLOAT32
                      ) -> tuple[dict | None, dict | None]:
    """(first row over the local tolerance, first row over the accumulated tolerance), as rows; `tolerances`:
    the run's set (its precision's)."""
    local = next((r for r in rows if _local_fault(r, tolerances)), None)
    accumulated = next((r for r in rows if _accumulated_fault(r, tolerances)), None)
    return local, accumulated


def _statuses(rows: list[dict]) -> dict:
    counts = Counter(r.get("status", "") for r in rows)
    return {**{s: counts.get(s, 0) for s in STATUSES}, **{s: n for s, n in counts.items() if s not in STATUSES}}


def verdict(rows: list[dict], parity, sensitivity=None) -> tuple[str, list[str]]:
    """`match`, `ill-conditioned` or `diverged`, and why: diverged layers, then what the outputs' comparison
    (`parity.reasons()`) finds; `ill-conditioned` where the reference's own `sensitivity` explains the missed
    outputs and rows over tolerance (`sensitivity.rule`; never a diverged layer or a temperature not carried
    over)."""
    from tracer.engine import sensitivity as conditioning

    reasons = []
    diverged = sum(r.get("status") == "diverged" for r in rows)
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
        members = [r for r in rows if r["tower"] == tower]
        t_local, t_acc = first_divergences(members, tolerances)
        towers[tower] = {
            "layers": len(members), "layer_statuses": _statuses(members),
            "first_local_divergence": _divergence(t_local), "first_accumulated_divergence": _divergence(t_acc),
            "final_rel_l2": _float(members[-1].get("rel_l2")),
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


# ------------------------------------------------------------------------------------------------ writing
def write_report(result, destination: str | Path, checkpoint_path: str, data: dict | None = None) -> Path:
    """Write every report file into a hidden folder beside `destination`, renamed into place when complete.
    `data`: the summary, when the caller has it (else `summary(result, checkpoint_path)`)."""
    from tracer.output import write_folder_atomically

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)

    def fill(folder: Path) -> None:
        layers_frame(result.rows).to_csv(folder / "layers.csv", index=False)
        blocks_frame(result.rows).to_csv(folder / "blocks.csv", index=False)
        mapping_frame(result.entries or []).to_csv(folder / "mapping.csv", index=False)
        nonlocal data
        data = data or summary(result, checkpoint_path)
        (folder / "summary.json").write_text(json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        (folder / "report.html").write_text(render_html(result, data), encoding="utf-8")

    # The destination was checked (or refused) before the run began; a report is replaced as a whole.
    return write_folder_atomically(destination, fill, overwrite=True)


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


# ------------------------------------------------------------------------------------------------ HTML
def esc(value) -> str:
    return html.escape(_text(value), quote=True)


def short_name(path: str) -> str:
    """A Keras layer path without the containers around it (`a/b/c` -> `c`'s last two parts)."""
    parts = path.split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else path


def _entry_tower(entry) -> str:
    return getattr(entry, "part", "") or "model"


CSS = """
:root { --ok:#1a7f37; --ok-bg:#dafbe1; --bad:#cf222e; --bad-bg:#ffebe9; --amp:#9a6700; --amp-bg:#fff8c5;
        --grey:#57606a; --grey-bg:#eaeef2; --line:#d0d7de; --ink:#1f2328; --acc:#0969da; --loc:#e16f24; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #f6f8fa; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 18px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 18px 0 8px; color: var(--grey); text-transform: uppercase; letter-spacing: .04em; }
.sub { color: var(--grey); margin-bottom: 16px; word-break: break-all; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin: 16px 0; }
.verdict { display: flex; align-items: center; gap: 18px; padding: 16px 20px; border-radius: 10px; margin: 8px 0 16px;
           border: 1px solid; }
.verdict.match, .verdict.ill-conditioned { background: var(--ok-bg); border-color: #4ac26b; }
.verdict.diverged { background: var(--bad-bg); border-color: #ff8182; }
.verdict .word { font-size: 28px; font-weight: 800; letter-spacing: .06em; }
.verdict.match .word, .verdict.ill-conditioned .word { color: var(--ok); } .verdict.diverged .word { color: var(--bad); }
.verdict ul { margin: 0; padding-left: 18px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .k { color: var(--grey); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 650; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .d { color: var(--grey); font-size: 12px; }
.good { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--amp); }
.hints { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 8px; padding: 10px 14px; margin-top: 12px; }
.hints ul { margin: 4px 0 0; padding-left: 20px; }
.fault { border-left: 4px solid var(--bad); background: var(--bad-bg); padding: 8px 12px; border-radius: 4px;
         margin: 8px 0; }
.fault.amp { border-left-color: var(--amp); background: var(--amp-bg); }
.fault.none { border-left-color: var(--ok); background: var(--ok-bg); }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace;
         font-size: 12px; white-space: nowrap; }
td.over { color: var(--bad); font-weight: 600; }
td.path, td.hint { overflow-wrap: anywhere; }
td.hint { min-width: 240px; max-width: 460px; }
.scroll { overflow-x: auto; }
tr.first-fault td { background: #ffebe9; }
tr.first-fault td:first-child { box-shadow: inset 4px 0 0 var(--bad); }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 11.5px; font-weight: 600; }
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.diverged { background: var(--bad-bg); color: var(--bad); }
.badge.amplified { background: var(--amp-bg); color: var(--amp); }
.badge.unpaired, .badge.other { background: var(--grey-bg); color: var(--grey); }
.flag { color: var(--bad); font-weight: 700; font-size: 11px; margin-left: 6px; white-space: nowrap; }
details { margin-top: 12px; border: 1px solid var(--line); border-radius: 8px; background: #fff; }
details > summary { cursor: pointer; padding: 8px 12px; font-weight: 600; }
details > div { max-height: 560px; overflow: auto; border-top: 1px solid var(--line); }
svg.plot { width: 100%; height: auto; display: block; background: #fff; }
svg.plot text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
.meta { color: var(--grey); font-size: 12px; }
.meta td { border: 0; padding: 1px 10px 1px 0; }
footer { color: var(--grey); font-size: 12px; margin-top: 20px; }
"""


def _sci(value: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _path(value) -> str:
    """An escaped dotted/slashed name that may wrap after its separators."""
    return esc(value).replace(".", ".<wbr>").replace("/", "/<wbr>")


def _badge(status: str) -> str:
    cls = {"confirmed": "ok", "mismatch": "diverged"}.get(status, status)
    cls = cls if cls in ("ok", "diverged", "amplified", "unpaired") else "other"
    return f'<span class="badge {cls}">{esc(status or "—")}</span>'


def _num(value, spec: str = ".2e", tol: float | None = None) -> str:
    over = tol is not None and _float(value) > tol
    return f'<td class="num{" over" if over else ""}">{esc(_fmt(value, spec))}</td>'


# --------------------------------------------------------------------------------------------- the SVG plot
def divergence_plot(rows: list[dict], tolerances: dict, fault: dict | None, title: str = "",
                    accumulated_only: bool = False) -> str:
    """Accumulated and local rel-L2 over layer order (log scale), blocks as bands, tolerance line(s), the first
    fault marked (`accumulated_only`: the marked row is only the first over the accumulated tolerance).
    Hand-written SVG; every point carries a <title> tooltip."""
    W, H = 1200, 360
    left, right, top, bottom = 64, 18, 34, 46
    pw, ph = W - left - right, H - top - bottom
    n = len(rows)
    tol_local, tol_acc = tolerances["local_rel_l2"], tolerances["accumulated_rel_l2"]
    values = [_float(r.get(k)) for r in rows for k in ("rel_l2", "local_rel_l2")]
    positive = [v for v in values if math.isfinite(v) and v > 0]
    lo = math.floor(math.log10(min(positive + [tol_local, tol_acc])) - 0.25) - (0 if positive else 1)
    hi = max(math.ceil(math.log10(max(positive + [tol_local, tol_acc]))),
             math.ceil(math.log10(max(tol_local, tol_acc))) + 1)
    lo = max(lo, -16)
    if hi <= lo:
        hi = lo + 1
    if hi - lo < 3:
        lo = hi - 3
    floor_value = 10.0 ** lo

    def x(i: float) -> float:
        return left + (pw * (i + 0.5) / n if n else pw / 2)

    def y(v: float) -> float:
        v = max(v, floor_value)
        return top + ph * (hi - math.log10(v)) / (hi - lo)

    parts = [f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{esc(title or "divergence by depth")}">']
    # block bands
    runs: list[tuple[str, int, int]] = []
    for i, r in enumerate(rows):
        block = _text(r.get("block"))
        if runs and runs[-1][0] == block:
            runs[-1] = (block, runs[-1][1], i)
        else:
            runs.append((block, i, i))
    step = pw / n if n else pw
    last_label_end = -1e9
    for k, (block, a, b) in enumerate(runs):
        bx, bw = left + a * step, (b - a + 1) * step
        statuses = {_text(r.get("status")) for r in rows[a:b + 1]}
        if "diverged" in statuses:
            fill = "#ffe3e0" if k % 2 else "#fff3f1"
        else:
            fill = "#f0f3f6" if k % 2 else "#ffffff"
        parts.append(f'<rect x="{bx:.1f}" y="{top}" width="{bw:.1f}" height="{ph}" fill="{fill}">'
                     f'<title>{esc(block)}</title></rect>')
        label_w = 6.2 * len(block)
        cx = bx + bw / 2
        if bw >= 14 and cx - label_w / 2 > last_label_end + 4:
            parts.append(f'<text x="{cx:.1f}" y="{top - 8}" font-size="10.5" fill="#57606a" '
                         f'text-anchor="middle">{esc(block)}</text>')
            last_label_end = cx + label_w / 2
    # grid + y axis
    for e in range(lo, hi + 1):
        gy = y(10.0 ** e)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#d8dee4" '
                     f'stroke-width="{1 if e % 2 == 0 else 0.6}"/>')
        parts.append(f'<text x="{left - 8}" y="{gy + 4:.1f}" font-size="11" fill="#57606a" '
                     f'text-anchor="end">1e{e}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#8c959f"/>')
    # x ticks
    if n:
        tick = next((t for t in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000) if n / t <= 14), 2000)
        for i in range(0, n, tick):
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#8c959f"/>'
                         f'<text x="{x(i):.1f}" y="{top + ph + 17}" font-size="11" fill="#57606a" '
                         f'text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{left}" y="{H - 8}" font-size="12" fill="#57606a">'
                 f'layer (execution order) →</text>')
    parts.append(f'<text x="16" y="{top + ph / 2}" font-size="12" fill="#57606a" text-anchor="middle" '
                 f'transform="rotate(-90 16 {top + ph / 2})">relative L2 error</text>')
    # tolerance lines
    tol_lines = [(tol_acc, "tolerance")] if tol_local == tol_acc else [(tol_acc, "accumulated tolerance"),
                                                                       (tol_local, "local tolerance")]
    for tol, label in tol_lines:
        ty = y(tol)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#cf222e" '
                     f'stroke-dasharray="6 4" stroke-width="1.3"/>'
                     f'<text x="{left + 6}" y="{ty + 14:.1f}" font-size="11" fill="#cf222e">'
                     f'{esc(label)} {esc(_sci(tol))}</text>')
    # first fault
    if fault is not None:
        fi = next((i for i, r in enumerate(rows) if r.get("order") == fault.get("order")), None)
        if fi is not None:
            fx = x(fi)
            name = short_name(_text(fault.get("keras_layer")) or _text(fault.get("hf_module")))
            label = f"{'first over tolerance' if accumulated_only else 'first fault'}: {name}"
            colour = "#9a6700" if accumulated_only else "#cf222e"
            dash = ' stroke-dasharray="5 3"' if accumulated_only else ""
            anchor = "start" if fx < left + pw * 0.6 else "end"
            dx = 6 if anchor == "start" else -6
            parts.append(f'<line x1="{fx:.1f}" x2="{fx:.1f}" y1="{top}" y2="{top + ph}" stroke="{colour}" '
                         f'stroke-width="2"{dash}/>'
                         f'<text x="{fx + dx:.1f}" y="{top + 16}" font-size="12" font-weight="700" fill="{colour}" '
                         f'text-anchor="{anchor}">{esc(label)}</text>')
    # accumulated line (broken where unmeasured)
    segment: list[str] = []
    lines = []
    for i, r in enumerate(rows):
        v = _float(r.get("rel_l2"))
        if math.isfinite(v):
            segment.append(f"{x(i):.1f},{y(v):.1f}")
        elif segment:
            lines.append(segment)
            segment = []
    if segment:
        lines.append(segment)
    for seg in lines:
        if len(seg) == 1:
            cx, cy = seg[0].split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="#0969da"/>')
        else:
            parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="#0969da" stroke-width="2" '
                         f'stroke-linejoin="round"/>')
    # local points + tooltips
    r_pt = 3.2 if n <= 200 else 2.2
    for i, r in enumerate(rows):
        v, acc = _float(r.get("local_rel_l2")), _float(r.get("rel_l2"))
        status = _text(r.get("status"))
        tip = (f"#{r.get('order')} {_text(r.get('keras_layer'))} → {_text(r.get('hf_module'))} [{status}]\n"
               f"accumulated rel L2 {_fmt(acc)}, local rel L2 {_fmt(v)}")
        if _text(r.get("hint")):
            tip += f"\nhint: {_text(r.get('hint'))}"
        if math.isfinite(v):
            colour = "#cf222e" if status == "diverged" else "#e16f24"
            radius = r_pt + 1.3 if status == "diverged" else r_pt
            hollow = v <= 0
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{radius}" '
                         f'fill="{"#fff" if hollow else colour}" stroke="{colour}" stroke-width="1.2">'
                         f'<title>{esc(tip)}</title></circle>')
        elif math.isfinite(acc):
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(acc):.1f}" r="6" fill="transparent">'
                         f'<title>{esc(tip)}</title></circle>')
    # legend
    lx, ly = left + pw - 318, H - 10
    parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly - 2}" y2="{ly - 2}" stroke="#0969da" stroke-width="2"/>'
                 f'<text x="{lx + 28}" y="{ly + 2}" font-size="11" fill="#1f2328">accumulated</text>'
                 f'<circle cx="{lx + 108}" cy="{ly - 2}" r="3.2" fill="#e16f24"/>'
                 f'<text x="{lx + 116}" y="{ly + 2}" font-size="11" fill="#1f2328">local</text>'
                 f'<circle cx="{lx + 160}" cy="{ly - 2}" r="4.5" fill="#cf222e"/>'
                 f'<text x="{lx + 168}" y="{ly + 2}" font-size="11" fill="#1f2328">diverged</text>'
                 f'<circle cx="{lx + 232}" cy="{ly - 2}" r="3.2" fill="#fff" stroke="#e16f24"/>'
                 f'<text x="{lx + 240}" y="{ly + 2}" font-size="11" fill="#1f2328">exact (0)</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------- tables
def _block_table(blocks: list[dict], tolerances: dict, fault: dict | None) -> str:
    tol_l, tol_a = tolerances["local_rel_l2"], tolerances["accumulated_rel_l2"]
    hints = any(b["hint"] for b in blocks)
    head = ("<tr><th>block</th><th>layers</th><th>status</th><th>local rel L2</th><th>local max|Δ|</th>"
            "<th>accum. rel L2</th><th>accum. max|Δ|</th><th>first diverged layer</th>"
            f"{'<th>hint</th>' if hints else ''}</tr>")
    body = []
    for b in blocks:
        first = fault is not None and fault.get("block") == b["block"]
        flag = '<span class="flag">◀ first fault</span>' if first else ""
        counts = ", ".join(f"{b[s]} {s}" for s in ("diverged", "amplified", "unpaired") if b[s])
        hint_cell = f"<td class=hint>{esc(b['hint'])}</td>" if hints else ""
        body.append(
            f'<tr{" class=first-fault" if first else ""}><td><b>{esc(b["block"])}</b>{flag}</td>'
            f'<td class="num">{b["layers"]}</td>'
            f'<td>{_badge(b["status"])}{f"<br><span class=meta>{esc(counts)}</span>" if counts else ""}</td>'
            f'{_num(b["local_rel_l2"], tol=tol_l)}{_num(b["local_max_abs"])}'
            f'{_num(b["rel_l2"], tol=tol_a)}{_num(b["max_abs"])}'
            f'<td class="path mono">{_path(short_name(b["first_diverged_keras_layer"]))}</td>'
            f'{hint_cell}</tr>')
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _layer_table(rows: list[dict], tolerances: dict, fault: dict | None) -> str:
    tol_l, tol_a = tolerances["local_rel_l2"], tolerances["accumulated_rel_l2"]
    hints = any(_text(r.get("hint")) for r in rows)
    head = ("<tr><th>#</th><th>block</th><th>Keras layer</th><th>HF module</th><th>shape</th><th>status</th>"
            "<th>local rel L2</th><th>accum. rel L2</th><th>accum. max|Δ|</th><th>cosine</th><th>growth</th>"
            "<th>ref. sensitivity</th>"
            f"<th>source</th>{'<th>hint</th>' if hints else ''}</tr>")
    body = []
    for r in rows:
        first = fault is not None and fault.get("order") == r.get("order")
        hint_cell = f'<td class=hint>{esc(r.get("hint"))}</td>' if hints else ""
        shape = _text(r.get("keras_shape"))
        if _text(r.get("hf_shape")) and _text(r.get("hf_shape")) != shape:
            shape = f"{shape} / {_text(r.get('hf_shape'))}"
        body.append(
            f'<tr{" class=first-fault" if first else ""}><td class="num">{esc(r.get("order"))}</td>'
            f'<td>{esc(r.get("block"))}</td>'
            f'<td class="path mono">{_path(short_name(_text(r.get("keras_layer"))))} '
            f'<span class="meta">{esc(r.get("keras_class"))}</span></td>'
            f'<td class="path mono">{_path(r.get("hf_module"))} <span class="meta">{esc(r.get("hf_class"))}</span></td>'
            f'<td class="mono">{esc(shape)}</td><td>{_badge(_text(r.get("status")))}</td>'
            f'{_num(r.get("local_rel_l2"), tol=tol_l)}{_num(r.get("rel_l2"), tol=tol_a)}{_num(r.get("max_abs"))}'
            f'{_num(r.get("cosine"), ".7f")}{_num(r.get("growth"), ".3g")}{_num(r.get("reference_sensitivity"))}'
            f'<td>{esc(r.get("mapping_source"))}</td>{hint_cell}</tr>')
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _mapping_table(rows: list[dict]) -> str:
    checksums = any(r["keras_checksum"] or r["hf_checksum"] for r in rows)
    cols = ["variable", "parameter", "transform", "source", "status", "keras_shape", "hf_shape"]
    if checksums:
        cols += ["keras_checksum", "hf_checksum"]
    if any(r["table_candidate"] for r in rows):  # both sides of each conflict, with their local errors
        cols += list(CONFLICT_COLUMNS)
    head = "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            if c == "status":
                cells.append(f"<td>{_badge(r[c]) if r[c] else ''}</td>")
            elif c in ("table_local_rel_l2", "tracer_local_rel_l2"):
                cells.append(f'<td class="mono">{esc(_fmt(r[c]) if r[c] != "" else "")}</td>')
            elif c in ("variable", "parameter", "keras_checksum", "hf_checksum"):
                cells.append(f'<td class="path mono">{_path(r[c])}</td>')
            else:
                cells.append(f'<td class="mono">{esc(r[c])}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fault_box(fault: dict | None, accumulated: dict | None, what: str = "") -> str:
    if fault is None and accumulated is None:
        return f'<div class="fault none">No layer{what} exceeds the tolerances.</div>'
    out = []
    if fault is not None:
        hint = f'<br>hint: <b>{esc(fault["hint"])}</b>' if fault.get("hint") else ""
        out.append(
            f'<div class="fault"><b>First fault{what}:</b> <code>{esc(fault["keras_layer"])}</code> → '
            f'<code>{esc(fault["hf_module"])}</code> in <b>{esc(fault["block"])}</b> (#{esc(fault["order"])}): '
            f'own error rel L2 {esc(_fmt(fault["local_rel_l2"]))}, max|Δ| {esc(_fmt(fault["local_max_abs"]))}'
            f'{hint}</div>')
    if accumulated is not None and (fault is None or (accumulated["tower"], accumulated["order"])
                                    != (fault["tower"], fault["order"])):
        out.append(
            f'<div class="fault amp"><b>First over tolerance (accumulated){what}:</b> '
            f'<code>{esc(accumulated["keras_layer"])}</code> in <b>{esc(accumulated["block"])}</b> '
            f'(#{esc(accumulated["order"])}): rel L2 {esc(_fmt(accumulated["rel_l2"]))}'
            f'{" — no layer of its own is over tolerance: accumulated float error" if fault is None else ""}</div>')
    return "".join(out)


def _sensitivity_box(sensitivity: dict | None) -> str:
    """The reference's own sensitivity beside the port's error, per output, and where conditioning breaks down."""
    if not sensitivity:
        return ""
    items = "".join(
        f"<li><code>{esc(o['part'])}</code>: Keras vs HF max|Δ| {esc(_fmt(o['error']))}, the original against "
        f"itself on the perturbed input {esc(_fmt(o['sensitivity']))} "
        f"({'explained' if o['explained'] else 'NOT explained'} within x{esc(_fmt(sensitivity['factor'], 'g'))})"
        f"</li>" for o in sensitivity["parts"])
    b = sensitivity.get("breakdown")
    where = (f"<br>conditioning breaks down at <code>{esc(b['keras_layer'])}</code> in <b>{esc(b['block'])}</b> "
             f"(#{esc(b['order'])}): the original itself moves by rel L2 {esc(_fmt(b['reference_sensitivity']))} "
             f"there" if b else "")
    rows = (f"<br>{esc(sensitivity['rows_over_tolerance'])} row(s) over the accumulated tolerance, "
            f"{esc(sensitivity['rows_unexplained'])} not explained by the sensitivity")
    return (f'<div class="fault amp"><b>Reference sensitivity</b> (input moved by '
            f'{esc(sensitivity["perturbation"])}):<ul>{items}</ul>{where}{rows}</div>')


def _card(key: str, value: str, detail: str = "", cls: str = "") -> str:
    return (f'<div class="card"><div class="k">{esc(key)}</div><div class="v {cls}">{esc(value)}</div>'
            f'<div class="d">{esc(detail)}</div></div>')


def render_html(result, data: dict | None = None) -> str:
    """The report page: verdict and final differences first, then per tower the divergence plot, the blocks
    (first fault highlighted), the layers and the mapping."""
    data = data or summary(result, "")
    rows, tol = result.rows, data["tolerances"]
    title = getattr(result, "title", None) or "tracer report"
    part_titles = getattr(result, "part_titles", None) or {}
    mapping = mapping_rows(result.entries or [])
    towers_of_entries = [_entry_tower(e) for e in (result.entries or [])]
    verdict_word = data["verdict"]
    shown = data.get("verdict_text") or verdict_word
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(verdict_word.upper())} · {esc(title)} · {esc(data['checkpoint'])}</title>",
           f"<style>{CSS}</style></head><body><main>"]
    out.append(f"<h1>{esc(title)}</h1>")
    out.append(f'<div class="sub">checkpoint <code>{esc(data["checkpoint"] or "—")}</code> · '
               f'{esc(time.strftime("%Y-%m-%d %H:%M:%S"))} · files: '
               + " ".join(f'<a href="{esc(f)}">{esc(f)}</a>' for f in FILES if f != "report.html") + "</div>")
    # verdict banner
    counts = data["layer_statuses"]
    reasons = "".join(f"<li>{esc(r)}</li>" for r in data["verdict_reasons"])
    detail = (f"{data['layers']} layers compared: {counts['ok']} ok, {counts['amplified']} amplified, "
              f"{counts['diverged']} diverged, {counts['unpaired']} unpaired" if data["layers"] else "no layer trace")
    out.append(f'<div class="verdict {esc(verdict_word)}"><div class="word">{esc(shown.upper())}</div>'
               f'<div><div>{esc(detail)}</div>{f"<ul>{reasons}</ul>" if reasons else ""}</div></div>')
    out.append(_sensitivity_box(data.get("sensitivity")))
    # cards
    cards = [_card(*card) for card in result.parity.cards(data)]
    cov = data["coverage"]
    if cov:
        full = (cov["hf_tensors_written"] == cov["hf_tensors_total"]
                and cov["checkpoint_weights_used"] == cov["checkpoint_weights_total"])
        cards.append(_card("coverage", f"{cov['hf_tensors_written']}/{cov['hf_tensors_total']}",
                           f"HF tensors written · {cov['checkpoint_weights_used']}/"
                           f"{cov['checkpoint_weights_total']} checkpoint weights used",
                           "good" if full else "warn"))
    sources = ", ".join(f"{n} {s}" for s, n in data["mapping_sources"].items() if n) or "—"
    statuses = ", ".join(f"{n} {s or '—'}" for s, n in data["mapping_statuses"].items()) or "—"
    cards.append(_card("mapping", f"{len(mapping)} entries", f"{sources} · {statuses}",
                       "bad" if data["mapping_statuses"].get("mismatch") else ""))
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    if data["hints"]:
        out.append('<div class="hints"><b>Hints</b><ul>' + "".join(f"<li>{esc(h)}</li>" for h in data["hints"])
                   + "</ul></div>")
    out.append(_fault_box(data["first_local_divergence"], data["first_accumulated_divergence"]))
    # towers
    for tower in _towers(rows):
        members = [r for r in rows if r["tower"] == tower]
        info = data["towers"][tower]
        fault = info["first_local_divergence"]
        marked = fault or info["first_accumulated_divergence"]
        c = info["layer_statuses"]
        title = part_titles.get(tower, tower)
        badge = "diverged" if c["diverged"] else ("amplified" if c["amplified"] else "ok")
        out.append(f'<section id="{esc(tower)}"><h2>{esc(title)} {_badge(badge)}</h2>')
        out.append(f'<div class="meta">{info["layers"]} layers: {c["ok"]} ok, {c["amplified"]} amplified, '
                   f'{c["diverged"]} diverged, {c["unpaired"]} unpaired · final accumulated rel L2 '
                   f'{esc(_fmt(info["final_rel_l2"]))}</div>')
        out.append(_fault_box(fault, info["first_accumulated_divergence"], " in this tower"))
        out.append("<h3>Divergence by depth</h3>")
        out.append(divergence_plot(members, tol, marked, title, accumulated_only=fault is None))
        out.append("<h3>Blocks</h3>")
        out.append(f'<div class="scroll">{_block_table(block_rows(members), tol, fault)}</div>')
        out.append(f'<details><summary>All {len(members)} layers</summary><div>'
                   f'{_layer_table(members, tol, fault)}</div></details>')
        tower_map = [m for m, t_ in zip(mapping, towers_of_entries) if t_ == tower]
        if tower_map:
            bad = sum(m["status"] == "mismatch" for m in tower_map)
            disputed = sum(bool(m["table_candidate"]) for m in tower_map)
            out.append(f'<details{" open" if disputed else ""}><summary>Mapping: {len(tower_map)} weights'
                       f'{f" ({bad} mismatch)" if bad else ""}{f" ({disputed} in conflict)" if disputed else ""}'
                       f'</summary><div>{_mapping_table(tower_map)}</div></details>')
        out.append("</section>")
    rest = [m for m, t_ in zip(mapping, towers_of_entries) if t_ not in _towers(rows)]
    if rest:
        out.append(f'<section><h2>Other weights</h2><details open><summary>Mapping: {len(rest)} weights</summary>'
                   f'<div>{_mapping_table(rest)}</div></details></section>')
    # footer
    spec = data.get("spec") or {}
    vision, text = spec.get("vision") or {}, spec.get("text") or {}
    spec_line = ""
    if vision and text:
        spec_line = (f"EfficientNet width {vision.get('width_coefficient')} depth {vision.get('depth_coefficient')}, "
                     f"BERT {text.get('num_layers')}×{text.get('hidden_size')}, projection {spec.get('embed_dim')}")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in data["timings"].items())
    tols = ", ".join(f"{k} {v:g}" for k, v in tol.items())
    out.append(f"<footer><table class=meta><tr><td>model</td><td>{esc(spec_line or '—')}</td></tr>"
               f"<tr><td>tolerances</td><td>{esc(tols)}</td></tr>"
               f"<tr><td>timings</td><td>{esc(timings or '—')}</td></tr></table></footer>")
    out.append("</main></body></html>\n")
    return "".join(out)
