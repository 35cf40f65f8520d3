"""The report's two charts as SVG written directly: a class × phrase heatmap and bars of z_lift per class.

Plain SVG instead of a plotting library: the charts are a few hundred rectangles and labels, and
drawing them through matplotlib cost more than the rest of the report together (see
``docs/decisions.md``, flow overhead). Every label is data and is XML-escaped; a chart is returned as a
``data:`` URI, which the report's Content-Security-Policy allows for images.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

import numpy as np

FONT = 11  # px
CHAR_W = 0.6 * FONT  # a sans-serif glyph's mean advance, for laying out labels without a font engine
FOR_COLOUR, AGAINST_COLOUR = "#2e86c1", "#c0392b"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# viridis at nine evenly spaced stops (matplotlib's table), interpolated linearly in between
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class BarPanel:
    """One class's bars: phrase labels, their z_lift, whether each is "against", and the flag threshold."""

    title: str
    labels: Sequence[str]
    values: Sequence[float]
    against: Sequence[bool]
    threshold: float | None = None


def viridis(values: np.ndarray) -> list[str]:
    """Hex colours of ``values`` in [0, 1] (clipped; NaN reads as 0)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[lo] + (x - lo)[:, None] * (_VIRIDIS[lo + 1] - _VIRIDIS[lo])
    return ["#{:02x}{:02x}{:02x}".format(*c) for c in np.rint(rgb).astype(int)]


def heatmap(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], title: str, legend: str) -> str:
    """Cells coloured by value in [0, 1] (viridis), row labels left, column labels slanted below."""
    cell_w, cell_h = 22, 16
    left = 8 + CHAR_W * max((len(r) for r in rows), default=1)
    top = 2.2 * FONT
    grid_w, grid_h = cell_w * len(columns), cell_h * len(rows)
    # labels slanted at 60 degrees: their vertical extent is sin(60°) of their length
    below = 10 + 0.87 * CHAR_W * max((len(c) for c in columns), default=1)
    # the legend runs down beside the colour bar, past it when the grid is shorter than the legend
    legend_h = CHAR_W * len(legend) + 10
    width, height = left + grid_w + 90, top + max(grid_h + below, legend_h)
    values = np.asarray(matrix, dtype=np.float64).ravel()
    parts = [_text(left, FONT * 1.3, title, weight="bold")]
    for k, (value, colour) in enumerate(zip(values, viridis(values), strict=True)):
        i, j = divmod(k, len(columns))
        parts.append(
            f'<rect x="{left + j * cell_w:.1f}" y="{top + i * cell_h:.1f}" width="{cell_w}" '
            f'height="{cell_h}" fill="{colour}"><title>{_esc(rows[i])} · {_esc(columns[j])}: '
            f"{value:.2f}</title></rect>"
        )
    for i, name in enumerate(rows):
        parts.append(_text(left - 4, top + (i + 0.7) * cell_h, name, anchor="end"))
    for j, name in enumerate(columns):
        x, y = left + (j + 0.5) * cell_w, top + grid_h + 6
        parts.append(_text(x, y, name, anchor="end", rotate=(-60, x, y)))
    parts.append(_colour_bar(left + grid_w + 14, top, grid_h, legend))
    return _svg(width, height, parts)


def bars(panels: Sequence[BarPanel], x_label: str) -> str:
    """Side-by-side horizontal bar charts, one panel per class, a dashed line at each threshold."""
    bar_h, plot_w = 14, 120
    label_w = CHAR_W * max((len(lab) for p in panels for lab in p.labels), default=1) + 8
    panel_w = label_w + plot_w + 24
    title_chars = int(1.4 * plot_w / CHAR_W)  # centred over the bars, it stays clear of its neighbours
    n_bars = max((len(p.labels) for p in panels), default=1)
    top = 2.0 * FONT
    height = top + n_bars * (bar_h + 4) + 3 * FONT
    parts = []
    for k, panel in enumerate(panels):
        x0 = k * panel_w + label_w
        values = np.nan_to_num(np.asarray(panel.values, dtype=np.float64))
        limits = [0.0, *values.tolist(), *([panel.threshold] if panel.threshold is not None else [])]
        lo, hi = min(limits), max(limits)
        scale = plot_w / (hi - lo if hi > lo else 1.0)
        parts.append(
            _text(x0 + plot_w / 2, FONT * 1.3, _fit(panel.title, title_chars), anchor="middle", weight="bold")
        )
        for i, (label, value, against) in enumerate(zip(panel.labels, values, panel.against, strict=True)):
            y = top + i * (bar_h + 4)
            start, end = sorted((x0 + (0 - lo) * scale, x0 + (value - lo) * scale))
            colour = AGAINST_COLOUR if against else FOR_COLOUR
            parts.append(
                f'<rect x="{start:.1f}" y="{y:.1f}" width="{max(end - start, 0.5):.1f}" height="{bar_h}" '
                f'fill="{colour}"><title>{_esc(label)}: {value:.2f}</title></rect>'
            )
            parts.append(_text(x0 - 4, y + bar_h * 0.8, label, anchor="end"))
        axis_y = top + n_bars * (bar_h + 4)
        parts.append(f'<line x1="{x0}" y1="{axis_y}" x2="{x0 + plot_w}" y2="{axis_y}" stroke="#444"/>')
        for tick in (lo, hi):
            parts.append(_text(x0 + (tick - lo) * scale, axis_y + FONT * 1.1, f"{tick:.1f}", anchor="middle"))
        parts.append(_text(x0 + plot_w / 2, axis_y + FONT * 2.3, x_label, anchor="middle"))
        if panel.threshold is not None:
            x = x0 + (panel.threshold - lo) * scale
            parts.append(
                f'<line x1="{x:.1f}" y1="{top - 2}" x2="{x:.1f}" y2="{axis_y}" stroke="black" '
                'stroke-dasharray="4 3"/>'
            )
    return _svg(panel_w * max(len(panels), 1) + 0.2 * plot_w, height, parts)


def _colour_bar(x: float, top: float, height: float, legend: str) -> str:
    steps = 32
    colours = viridis(np.linspace(1.0, 0.0, steps))
    h = height / steps
    parts = [
        f'<rect x="{x}" y="{top + i * h:.2f}" width="12" height="{h + 0.3:.2f}" fill="{c}"/>'
        for i, c in enumerate(colours)
    ]
    parts += [_text(x + 16, top + FONT * 0.8, "1"), _text(x + 16, top + height, "0")]
    mid_x, mid_y = x + 34, top + max(height, CHAR_W * len(legend)) / 2
    parts.append(_text(mid_x, mid_y, legend, anchor="middle", rotate=(90, mid_x, mid_y)))
    return "".join(parts)


def _text(
    x: float,
    y: float,
    text: str,
    *,
    anchor: str = "start",
    weight: str = "normal",
    rotate: tuple[float, float, float] | None = None,
) -> str:
    turn = f' transform="rotate({rotate[0]} {rotate[1]:.1f} {rotate[2]:.1f})"' if rotate else ""
    bold = ' font-weight="bold"' if weight == "bold" else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{bold}{turn}>{_esc(text)}</text>'


def _fit(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters, an ellipsis marking the cut."""
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _esc(text: str) -> str:
    """Text safe inside an SVG element: XML-escaped, characters XML cannot hold dropped."""
    return escape(_NOT_XML.sub("", str(text)))


def _svg(width: float, height: float, parts: list[str]) -> str:
    """The chart as a base64 ``data:`` URI (its width and height set, so an <img> knows its size)."""
    body = "".join(parts)
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans, Arial, sans-serif" '
        f'font-size="{FONT}"><rect width="100%" height="100%" fill="white"/>{body}</svg>'
    )
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")
