"""Small server-side SVG charts (no JavaScript, nothing fetched from a CDN). Every text is escaped;
colours are presentation attributes, so the page's Content-Security-Policy can forbid inline styles."""

from __future__ import annotations

from html import escape

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


def _fmt(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.0f}k"
    if float(v).is_integer():
        return f"{int(v)}"
    return f"{v:.3g}"


def funnel(stages: list[dict], width: int = 640) -> str:
    """Horizontal bars: rows in (light) and rows out (dark) per stage, with drop counts."""
    if not stages:
        return ""
    bar_h, gap, label_w = 18, 14, 110
    top = max(max(s.get("rows_in") or 0, s.get("rows_out") or 0) for s in stages) or 1
    plot_w = width - label_w - 90
    height = len(stages) * (2 * bar_h + gap) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart funnel" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="stage funnel">']
    y = 5
    for s in stages:
        rin, rout = s.get("rows_in") or 0, s.get("rows_out") or 0
        win, wout = plot_w * rin / top, plot_w * rout / top
        out.append(f'<text x="0" y="{y + bar_h + 4}" font-size="12" fill="#222">{escape(str(s["stage"]))}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{win:.1f}" height="{bar_h}" fill="#c6d6ea">'
                   f'<title>rows in: {rin}</title></rect>')
        out.append(f'<text x="{label_w + win + 4:.1f}" y="{y + 13}" font-size="11" fill="#555">in {_fmt(rin)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + bar_h}" width="{wout:.1f}" height="{bar_h}" fill="#4e79a7">'
                   f'<title>rows out: {rout}</title></rect>')
        out.append(f'<text x="{label_w + wout + 4:.1f}" y="{y + bar_h + 13}" font-size="11" fill="#222">'
                   f'out {_fmt(rout)}</text>')
        y += 2 * bar_h + gap
    out.append("</svg>")
    return "".join(out)


def line_chart(title: str, xs: list[str], series: dict[str, list[float | None]], width: int = 640,
               height: int = 240) -> str:
    """One line per series over categorical x values (runs, oldest first); None leaves a gap."""
    left, right, top_m, bottom = 48, 150, 24, 46
    pw, ph = width - left - right, height - top_m - bottom
    values = [v for vs in series.values() for v in vs if v is not None]
    if not values or not xs:
        return ""
    lo, hi = min(values), max(values)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad

    def px(i: int) -> float:
        return left + (pw * i / (len(xs) - 1) if len(xs) > 1 else pw / 2)

    def py(v: float) -> float:
        return top_m + ph * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart trend" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="14" font-size="13" font-weight="bold" fill="#222">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top_m + ph}" x2="{left + pw}" y2="{top_m + ph}" stroke="#999"/>',
           f'<line x1="{left}" y1="{top_m}" x2="{left}" y2="{top_m + ph}" stroke="#999"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<text x="{left - 4}" y="{py(v) + 4:.1f}" font-size="10" text-anchor="end" fill="#555">'
                   f'{_fmt(round(v, 3))}</text>')
        out.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + pw}" y2="{py(v):.1f}" stroke="#eee"/>')
    step = max(1, len(xs) // 6)
    for i, x in enumerate(xs):
        if i % step == 0 or i == len(xs) - 1:
            label = x if len(x) <= 22 else x[:21] + "…"
            anchor = "start" if i == 0 and len(xs) > 1 else "end" if i == len(xs) - 1 and len(xs) > 1 else "middle"
            out.append(f'<text x="{px(i):.1f}" y="{top_m + ph + 14}" font-size="9" text-anchor="{anchor}" '
                       f'fill="#555">{escape(label)}<title>{escape(x)}</title></text>')
    for n, (name, vs) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        pts, path = [], []
        for i, v in enumerate(vs):
            if v is None:
                if len(path) > 1:
                    pts.append(path)
                path = []
                continue
            path.append((px(i), py(v), v, xs[i]))
        if path:
            pts.append(path)
        for seg in pts:
            if len(seg) > 1:
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in seg)
                out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for x, y, v, xl in seg:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}">'
                           f'<title>{escape(name)} @ {escape(xl)}: {v:.4g}</title></circle>')
        ly = top_m + 12 + 16 * n
        out.append(f'<rect x="{left + pw + 12}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
        label = name if len(name) <= 20 else name[:19] + "…"
        out.append(f'<text x="{left + pw + 26}" y="{ly}" font-size="11" fill="#222">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _pack(tasks: list[tuple[int, float, float]]) -> list[int]:
    """Sub-lane per task (greedy interval packing): tasks that overlap in time get different lanes."""
    ends: list[float] = []
    out = []
    for _, a, b in tasks:
        lane = next((i for i, e in enumerate(ends) if e <= a), None)
        if lane is None:
            ends.append(b)
            lane = len(ends) - 1
        else:
            ends[lane] = b
        out.append(lane)
    return out


def timeline(stages: dict[str, list[tuple[int, float, float]]], width: int = 760, max_lanes: int = 8) -> str:
    """A Gantt-like chart of shard tasks: one band per stage, one bar per task from its start to its end
    on a time axis shared by all stages (seconds since the first start), so an operator sees how stages
    overlap. Tasks running at once within a stage stack in up to `max_lanes` sub-lanes."""
    stages = {k: sorted(v, key=lambda t: (t[1], t[0])) for k, v in stages.items() if v}
    if not stages:
        return ""
    t0 = min(a for v in stages.values() for _, a, _ in v)
    t1 = max(b for v in stages.values() for _, _, b in v)
    span = max(t1 - t0, 1e-6)
    label_w, right, lane_h, gap, axis_h = 110, 16, 7, 8, 24
    plot_w = width - label_w - right
    packed = {k: [min(x, max_lanes - 1) for x in _pack(v)] for k, v in stages.items()}
    heights = {k: (max(p) + 1) * lane_h for k, p in packed.items()}
    height = sum(heights.values()) + gap * len(stages) + axis_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart timeline" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="shard tasks over time">']
    y = 4
    for n, (stage, tasks) in enumerate(stages.items()):
        colour = PALETTE[n % len(PALETTE)]
        h = heights[stage]
        out.append(f'<text x="0" y="{y + min(h, 14) - 2}" font-size="12" fill="#222">{escape(str(stage))}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{h}" fill="#f4f4f4"/>')
        for (shard, a, b), lane in zip(tasks, packed[stage], strict=True):
            x = label_w + plot_w * (a - t0) / span
            w = max(1.0, plot_w * (b - a) / span)
            out.append(f'<rect class="task" x="{x:.1f}" y="{y + lane * lane_h}" width="{w:.1f}" '
                       f'height="{lane_h - 1}" fill="{colour}"><title>{escape(str(stage))} shard {int(shard)}: {a - t0:.1f} s → '
                       f'{b - t0:.1f} s</title></rect>')
        y += h + gap
    for k in range(5):
        x = label_w + plot_w * k / 4
        out.append(f'<line x1="{x:.1f}" y1="{y - gap + 2}" x2="{x:.1f}" y2="{y + 2}" stroke="#999"/>')
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        out.append(f'<text x="{x:.1f}" y="{y + 14}" font-size="10" text-anchor="{anchor}" fill="#555">'
                   f'{_fmt(round(span * k / 4, 1))} s</text>')
    out.append("</svg>")
    return "".join(out)
