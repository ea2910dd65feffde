"""Charts as SVG built on the server: no script, no CDN. Every plotted element carries its value in
data- attributes and a <title> (read on hover and by screen readers); pages print the same numbers
in a table beside each chart."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from markupsafe import Markup, escape

PALETTE = ("#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a")
LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def fmt(value: float | None) -> str:
    """A number as pages print it: 4 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def _attr(value: object) -> str:
    return str(escape(str(value)))


def line_chart(key: str, points: list[tuple[int, float]], *, width: int = 520, height: int = 200) -> Markup:
    """One metric across versions: ``points`` are (version number, value), drawn in version order."""
    points = sorted(points)
    left, right, top, bottom = 56, 16, 14, 30
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.06  # points on the extremes stay inside the frame
    lo, hi = lo - pad, hi + pad
    x_span = max(1, len(points) - 1)

    def px(i: int) -> float:
        return left + (width - left - right) * (i / x_span if len(points) > 1 else 0.5)

    def py(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))

    parts = [_svg_open(width, height, f"{key} by version", "line-chart", key=key)]
    parts.append(f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>')
    for v in sorted({min(ys), max(ys)}) if ys else ():
        parts.append(f'<text class="tick" x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{escape(fmt(v))}</text>')
    path = " ".join(f"{px(i):.1f},{py(y):.1f}" for i, y in enumerate(ys))
    if len(points) > 1:
        parts.append(f'<polyline class="series" fill="none" stroke="{PALETTE[0]}" stroke-width="2" points="{path}"/>')
    for i, (x, y) in enumerate(points):
        parts.append(
            f'<circle class="point" cx="{px(i):.1f}" cy="{py(y):.1f}" r="4" fill="{PALETTE[0]}" '
            f'data-version="{x}" data-key="{_attr(key)}" data-value="{y!r}"><title>{escape(key)} = {escape(fmt(y))} '
            f"(version {x})</title></circle>"
        )
        if len(points) <= 20 or i in (0, len(points) - 1):
            parts.append(f'<text class="tick" x="{px(i):.1f}" y="{height - bottom + 16}" text-anchor="middle">v{x}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    value: float | None
    label: str  # the full module name


def layer_and_kind(module: str) -> tuple[str, str]:
    """(layer, module kind) of an adapted module: model.layers.3.self_attn.q_proj -> ("3", "q_proj")."""
    found = LAYER_RE.findall(module)
    kind = module.rsplit(".", 1)[-1]
    return (found[-1] if found else "–"), kind


def heatmap(
    cells: list[Cell], *, title: str, name: str, cell: int = 34, domain: tuple[float, float] | None = None
) -> Markup:
    """A grid of rows x columns coloured by value (light: low, dark: high), value in each cell's title.

    ``domain`` fixes the colour scale (similarities: 0 to 1); by default it runs from 0 to the largest value.
    """
    rows = sorted({c.row for c in cells}, key=_natural)
    cols = sorted({c.column for c in cells}, key=_natural)
    values = [c.value for c in cells if c.value is not None and math.isfinite(c.value)]
    lo, hi = domain or (min([0.0, *values]), max([1e-12, *values]))
    left, top = 44, 70
    width = max(left + cell * len(cols) + 16, 250)
    height = top + cell * len(rows) + 30
    parts = [_svg_open(width, height, title, "heatmap", key=name)]
    for j, col in enumerate(cols):
        x = left + j * cell + cell / 2
        parts.append(f'<text class="tick" transform="translate({x:.1f},{top - 6}) rotate(-45)">{escape(col)}</text>')
    for i, row in enumerate(rows):
        parts.append(f'<text class="tick" x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.1f}" text-anchor="end">{escape(row)}</text>')
    index = {(c.row, c.column): c for c in cells}
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            c = index.get((row, col))
            if c is None:
                continue
            colour = _colour(c.value, lo, hi)
            parts.append(
                f'<rect class="cell" x="{left + j * cell}" y="{top + i * cell}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{colour}" data-module="{_attr(c.label)}" data-row="{_attr(row)}" data-column="{_attr(col)}" '
                f'data-value="{"" if c.value is None else repr(c.value)}"><title>{escape(c.label)}: {escape(fmt(c.value))}</title></rect>'
            )
    parts.append(
        f'<text class="tick" x="{left}" y="{height - 8}">scale: light {escape(fmt(lo))} … dark {escape(fmt(hi))}</text></svg>'
    )
    return Markup("".join(parts))


def bar_chart(bars: list[tuple[str, float, float | None]], *, title: str, name: str, width: int = 560) -> Markup:
    """Horizontal bars (label, value, optional maximum drawn as a faint track): effective rank per module."""
    row_h, left, right = 20, 250, 60
    height = row_h * len(bars) + 16
    top_value = max([b[2] or b[1] for b in bars] + [1e-12])
    span = width - left - right
    parts = [_svg_open(width, height, title, "bar-chart", key=name)]
    for i, (label, value, limit) in enumerate(bars):
        y = 8 + i * row_h
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(_short(label))}</text>')
        if limit:
            parts.append(f'<rect class="track" x="{left}" y="{y + 2}" width="{span * limit / top_value:.1f}" height="{row_h - 6}"/>')
        parts.append(
            f'<rect class="bar" x="{left}" y="{y + 2}" width="{span * value / top_value:.1f}" height="{row_h - 6}" '
            f'fill="{PALETTE[0]}" data-module="{_attr(label)}" data-value="{value!r}">'
            f"<title>{escape(label)}: {escape(fmt(value))}{f' of {fmt(limit)}' if limit else ''}</title></rect>"
        )
        parts.append(f'<text class="tick" x="{left + span * value / top_value + 4:.1f}" y="{y + 13}">{escape(fmt(value))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _svg_open(width: float, height: float, title: str, kind: str, *, key: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {kind}" data-chart="{_attr(key)}" role="img" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" aria-label="{_attr(title)}">'
        f"<title>{escape(title)}</title>"
    )


def _short(label: str, limit: int = 36) -> str:
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _natural(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.isdigit() else (1, text)


def _colour(value: float | None, lo: float, hi: float) -> str:
    if value is None or not math.isfinite(value):
        return "#eeeeee"
    t = 0.5 if hi == lo else (value - lo) / (hi - lo)
    # from a pale to a deep blue: readable in print and by people who cannot tell red from green
    start, end = (0xE8, 0xF1, 0xFB), (0x0B, 0x3D, 0x91)
    r, g, b = (round(s + (e - s) * t) for s, e in zip(start, end, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"
