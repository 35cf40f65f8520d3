"""The report's SVG charts: valid XML whatever the labels, and marks placed where the values say."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from reports.charts import AGAINST_COLOUR, FOR_COLOUR, BarPanel, bars, heatmap, viridis

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = ["</svg><script>alert(1)</script>", "a & b", "$x^2$", "nul\x00 and \x1b escape", "ünïcode ✓"]


def _parse(uri: str) -> ET.Element:
    prefix = "data:image/svg+xml;base64,"
    assert uri.startswith(prefix)
    return ET.fromstring(base64.b64decode(uri[len(prefix) :]))


def test_viridis_matches_the_table_at_its_stops_and_clips() -> None:
    assert viridis(np.array([0.0, 0.5, 1.0])) == ["#440154", "#21908d", "#fde725"]
    # halfway between the first two stops (68,1,84) and (71,44,122): (69.5, 22.5, 103) rounded half to even
    assert viridis(np.array([0.0625])) == ["#461667"]
    assert viridis(np.array([-3.0, np.nan, 7.0])) == ["#440154", "#440154", "#fde725"]


def test_heatmap_cells_carry_their_values_and_hostile_labels_stay_text() -> None:
    matrix = np.array([[0.0, 1.0, 0.5], [0.25, 0.75, 1.0]])
    root = _parse(heatmap(matrix, HOSTILE[:2], HOSTILE[2:], title=HOSTILE[0], legend="share"))
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 100
    assert not root.findall(f".//{SVG}script")
    cells = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert [c.get("fill") for c in cells] == viridis(matrix.ravel())
    assert cells[5].find(f"{SVG}title").text.endswith(": 1.00")
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert HOSTILE[0] in texts and "a & b" in texts and "nul and  escape" in texts


def test_bars_are_proportional_and_the_threshold_sits_at_its_value() -> None:
    panel = BarPanel("circle", ["water (for)", "red (against)"], [4.0, 2.0], [False, True], threshold=3.0)
    root = _parse(bars([panel], "z_lift"))
    rects = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    widths = [float(r.get("width")) for r in rects]
    assert widths[0] == pytest.approx(2 * widths[1], rel=1e-3)
    assert [r.get("fill") for r in rects] == [FOR_COLOUR, AGAINST_COLOUR]
    dashed = [ln for ln in root.iter(f"{SVG}line") if ln.get("stroke-dasharray")]
    x0 = float(rects[0].get("x"))
    assert float(dashed[0].get("x1")) - x0 == pytest.approx(0.75 * widths[0], abs=0.2)


def test_negative_values_extend_left_of_zero() -> None:
    root = _parse(bars([BarPanel("c", ["a", "b"], [-1.0, 3.0], [True, False])], "z"))
    a, b = (r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None)
    assert float(a.get("x")) + float(a.get("width")) == pytest.approx(float(b.get("x")), abs=0.2)
    assert float(b.get("width")) == pytest.approx(3 * float(a.get("width")), rel=1e-2)


def test_long_panel_titles_are_cut_and_stay_inside_the_chart() -> None:
    name = "Greater Swiss Mountain dog from a very long class list"
    root = _parse(bars([BarPanel(name, ["a"], [1.0], [False])], "z"))
    title = next(t for t in root.iter(f"{SVG}text") if t.get("font-weight") == "bold")
    assert title.text.endswith("…") and name.startswith(title.text[:-1]) and len(title.text) < len(name)
    half_width = 0.6 * 11 * len(title.text) / 2  # centred text at the layout's mean glyph width
    assert float(title.get("x")) + half_width <= float(root.get("width"))


def test_the_colour_legend_fits_a_heatmap_of_one_row() -> None:
    legend = "share of the class's images"
    root = _parse(heatmap(np.array([[0.5, 1.0]]), ["circle"], ["red", "blue"], title="t", legend=legend))
    text = next(t for t in root.iter(f"{SVG}text") if t.text == legend)
    half_length = 0.6 * 11 * len(legend) / 2  # rotated 90 degrees: it runs from y - half to y + half
    assert float(text.get("y")) - half_length >= 0
    assert float(text.get("y")) + half_length <= float(root.get("height"))
