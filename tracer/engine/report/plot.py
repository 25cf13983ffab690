"""The divergence plot of report.html: hand-written SVG, accumulated and local rel L2 over layer order."""

from __future__ import annotations

import math

from tracer.engine.report.page import esc, short_name
from tracer.engine.report.schema import _fmt, _text
from tracer.engine.row import LayerRow


def _sci(value: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def divergence_plot(rows: list[LayerRow], tolerances: dict, fault: dict | None, title: str = "",
                    accumulated_only: bool = False) -> str:
    """Accumulated and local rel-L2 over layer order (log scale), blocks as bands, tolerance line(s), the first
    fault marked (`accumulated_only`: the marked row is only the first over the accumulated tolerance).
    Hand-written SVG; every point carries a <title> tooltip."""
    W, H = 1200, 360
    left, right, top, bottom = 64, 18, 34, 46
    pw, ph = W - left - right, H - top - bottom
    n = len(rows)
    tol_local, tol_acc = tolerances["local_rel_l2"], tolerances["accumulated_rel_l2"]
    values = [getattr(r, k) for r in rows for k in ("rel_l2", "local_rel_l2")]
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
        block = r.block
        if runs and runs[-1][0] == block:
            runs[-1] = (block, runs[-1][1], i)
        else:
            runs.append((block, i, i))
    step = pw / n if n else pw
    last_label_end = -1e9
    for k, (block, a, b) in enumerate(runs):
        bx, bw = left + a * step, (b - a + 1) * step
        statuses = {str(r.status) for r in rows[a:b + 1]}
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
        fi = next((i for i, r in enumerate(rows) if r.order == fault.get("order")), None)
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
        v = r.rel_l2
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
        v, acc = r.local_rel_l2, r.rel_l2
        status = str(r.status)
        tip = (f"#{r.order} {r.keras_layer} → {r.hf_module} [{status}]\n"
               f"accumulated rel L2 {_fmt(acc)}, local rel L2 {_fmt(v)}")
        if r.hint:
            tip += f"\nhint: {r.hint}"
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
