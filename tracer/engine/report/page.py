"""How the report is shown and written: report.html (CSS, tables, the page) and `write_report`, which writes
every file of the report folder atomically."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from tracer.engine.mapping import CONFLICT_COLUMNS
from tracer.engine.row import LayerRow
from tracer.engine.report.schema import (
    FILES, _fmt, _float, _text, _towers, block_rows, blocks_frame, layers_frame, mapping_frame, mapping_rows,
    summary,
)


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


def _layer_table(rows: list[LayerRow], tolerances: dict, fault: dict | None) -> str:
    tol_l, tol_a = tolerances["local_rel_l2"], tolerances["accumulated_rel_l2"]
    hints = any(r.hint for r in rows)
    head = ("<tr><th>#</th><th>block</th><th>Keras layer</th><th>HF module</th><th>shape</th><th>status</th>"
            "<th>local rel L2</th><th>accum. rel L2</th><th>accum. max|Δ|</th><th>cosine</th><th>growth</th>"
            "<th>ref. sensitivity</th>"
            f"<th>source</th>{'<th>hint</th>' if hints else ''}</tr>")
    body = []
    for r in rows:
        first = fault is not None and fault.get("order") == r.order
        hint_cell = f'<td class=hint>{esc(r.hint)}</td>' if hints else ""
        shape = r.keras_shape
        if r.hf_shape and r.hf_shape != shape:
            shape = f"{shape} / {r.hf_shape}"
        body.append(
            f'<tr{" class=first-fault" if first else ""}><td class="num">{esc(r.order)}</td>'
            f'<td>{esc(r.block)}</td>'
            f'<td class="path mono">{_path(short_name(r.keras_layer))} '
            f'<span class="meta">{esc(r.keras_class)}</span></td>'
            f'<td class="path mono">{_path(r.hf_module)} <span class="meta">{esc(r.hf_class)}</span></td>'
            f'<td class="mono">{esc(shape)}</td><td>{_badge(str(r.status))}</td>'
            f'{_num(r.local_rel_l2, tol=tol_l)}{_num(r.rel_l2, tol=tol_a)}{_num(r.max_abs)}'
            f'{_num(r.cosine, ".7f")}{_num(r.growth, ".3g")}{_num(r.reference_sensitivity)}'
            f'<td>{esc(r.mapping_source)}</td>{hint_cell}</tr>')
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
    from tracer.engine.report.plot import divergence_plot  # plot.py uses esc and short_name from here

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
        members = [r for r in rows if r.tower == tower]
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
