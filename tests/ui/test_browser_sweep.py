"""Issue 21: the Sampling lab's Sweep — its handlers on their own over the tiny model (quick), then the view in a
real browser at a laptop's and a phone's width (slow; test_browser's app, Chromium and waiting helpers)."""

from __future__ import annotations

import csv
import io
import json
import re
from types import SimpleNamespace

import pytest

from qdemo.sampling import SamplingParams
from qdemo.services.admission import Refused
from qdemo.ui import sweep_panel
from qdemo.ui.context import UIContext
from qdemo.views.sweep_view import MEASURES
from tests.conftest import tiny_services
from tests.ui.test_browser import (  # noqa: F401 - app and browser are the fixtures these tests run on
    _expect,
    _open,
    _pick,
    _plot_rendered,
    _shows,
    _tab,
    app,
    browser,
)

SIZES = {"desktop": (1366, 900), "phone": (390, 844)}


# --- the handlers on their own --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ui(tiny_dir, tmp_path_factory):
    return UIContext(tiny_services(tiny_dir, tmp_path_factory.mktemp("sweep-ui")))


def _parts():
    parts = SimpleNamespace(**{name: name for name in sweep_panel.SweepParts.__dataclass_fields__})
    lab = sweep_panel.LabInputs("model", "forward", "context", "mode", [],
                                lambda data: SamplingParams(top_k=40, max_new_tokens=1))
    return parts, lab


def _data(parts, lab, **more) -> dict:
    data = {parts.state: sweep_panel.SweepSession(), lab.model: "tiny-qwen2", lab.forward: None,
            lab.context_box: "写一首诗，about the sea", lab.mode: "chat", parts.axis_1: "temperature",
            parts.values_1: "0.6，1.3", parts.axis_2: "top_p", parts.values_2: "0.9 1.0", parts.samples: 2,
            parts.max_new: 5, parts.seed: 11}
    return {**data, **{getattr(parts, k): v for k, v in more.items()}}


def _downloaded(button) -> str:
    value = button.value
    return open(value["path"] if isinstance(value, dict) else value, encoding="utf-8").read()


class _Request:
    headers: dict = {}
    client = SimpleNamespace(host="127.0.0.1")
    session_hash = "sweep-test"


def test_a_sweep_fills_every_heatmap_opens_a_cells_samples_and_exports_them(ui):
    parts, lab = _parts()
    data = _data(parts, lab)
    updates = list(sweep_panel.run(parts, ui, lab, data, _Request()))
    final = updates[-1]
    assert final[parts.status].startswith("Sweep done: cells 4/4 · samples 8/8")
    maps = final[parts.maps]
    assert maps.count('class="sweep-map"') == len(MEASURES)
    assert len(set(re.findall(r'data-cell="(\d+)"', maps))) == 4 and "…" not in maps  # every cell measured
    result = data[parts.state].result
    seeds = [s for c in result.cells for s in c.seeds]
    assert seeds == list(range(11, 19))
    opened = sweep_panel.open_cell(parts, data, SimpleNamespace(_data={"cell": 3}))
    html = opened[parts.cell]
    assert html.count('class="tokview"') == 2 and "temperature 1.3 · top-p 1" in html
    assert [int(s) for s in re.findall(r"seed (\d+)", html)] == result.cells[3].seeds
    assert 'class="picked"' in opened[parts.maps]
    rows = list(csv.DictReader(io.StringIO(_downloaded(final[parts.csv]))))
    assert len(rows) == 8 and [int(r["seed"]) for r in rows] == seeds
    assert [r["text"] for r in rows[:2]] == [row.text for row in result.cells[0].rows]
    exported = json.loads(_downloaded(final[parts.json]))
    assert exported["context"] == "写一首诗，about the sea" and exported["axes"] == {"temperature": [0.6, 1.3],
                                                                                   "top_p": [0.9, 1]}
    assert [c["seeds"] for c in exported["cells"]] == [c.seeds for c in result.cells]


def test_stop_ends_the_sweep_with_what_finished(ui):
    parts, lab = _parts()
    data = _data(parts, lab, values_1="0.5, 0.9, 1.3", samples=8, max_new=30)
    session = data[parts.state]
    seen = []
    for update in sweep_panel.run(parts, ui, lab, data, _Request()):
        seen.append(update)
        session.stop.set()  # after the first update: the rows running end within a step, no chunk starts
    final = seen[-1][parts.status]
    done = int(re.search(r"samples (\d+)/48", final).group(1))
    assert final.startswith("Sweep stopped") and done < 48


@pytest.mark.parametrize("field,value,match", [
    ("values_1", "0.5, hot", "axis 1 values: 'hot' is not a number"),
    ("values_1", "", "axis 1 values: give at least one value"),
    ("values_1", "1," * 500, "axis 1 values is too long"),
    ("values_1", 0.5, "axis 1 values must be text"),
    ("axis_2", "temperature", "axis 2 repeats axis 1"),
    ("samples", "8", "samples per cell"),
    ("axis_1", "beam", "not a sweepable field"),
])
def test_a_bad_field_is_named(ui, field, value, match):
    parts, lab = _parts()
    data = _data(parts, lab, **{field: value})
    with pytest.raises((ValueError, Refused), match=re.escape(match)):
        list(sweep_panel.run(parts, ui, lab, data, _Request()))


def test_a_cell_outside_the_sweep_is_refused(ui):
    parts, lab = _parts()
    data = _data(parts, lab)
    assert "Run a sweep first" in sweep_panel.open_cell(parts, data, SimpleNamespace(_data={"cell": 0}))[parts.cell]
    list(sweep_panel.run(parts, ui, lab, data, _Request()))
    for bad in (4, -1, True, "1", None):
        with pytest.raises(ValueError, match="cell must be a cell of this sweep"):
            sweep_panel.open_cell(parts, data, SimpleNamespace(_data={"cell": bad}))


# --- in a browser ---------------------------------------------------------------------------------------------

def _page(request, width: int, height: int):
    return _open(request.getfixturevalue("app"), request.getfixturevalue("browser"), width=width, height=height)


def _sweep_tab(page, context: str) -> None:
    tab = page.get_by_role("tab", name="Sampling lab")
    tab.scroll_into_view_if_needed()
    tab.click()
    _pick(page, "lab-model", "Tiny random Qwen2")
    page.locator("#lab-context textarea").fill(context)
    page.get_by_role("tab", name="Sweep").click()


def _field(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.blur()


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_a_sweep_in_the_browser_fills_its_heatmaps_and_opens_a_cell(request, size):
    page = _page(request, *SIZES[size])
    try:
        _sweep_tab(page, "床前明月光，")
        _field(page, "sweep-values-1", "0.7, 1.2")
        _field(page, "sweep-values-2", "0.9, 1.0")
        _field(page, "sweep-samples", "3")
        _field(page, "sweep-max-new", "8")
        page.locator("#sweep-run").click()
        _shows(page, "#sweep-status", "Sweep done: cells 4/4 · samples 12/12")
        _expect(page.locator("#sweep-maps .sweep-map"), "a heatmap per measure").to_have_count(len(MEASURES))
        _plot_rendered(page, "sweep-scatter")
        page.locator('#sweep-maps .sweep-map').first.locator('td[data-cell="2"]').click()
        _expect(page.locator("#sweep-cell .sweep-sample"), "the cell's three samples").to_have_count(3)
        _expect(page.locator("#sweep-cell .tokview").first, "a sample's token view").to_be_visible()
        _expect(page.locator("#sweep-csv"), "the CSV download").to_be_visible()
        page.screenshot(path=str(page.shots / f"sweep-{size}.png"), full_page=True)
        if size == "phone":  # the heatmaps wrap: none wider than the screen
            widest = page.evaluate("Math.max(...[...document.querySelectorAll('#sweep-maps .sweep-map')]"
                                   ".map(e => e.getBoundingClientRect().right))")
            assert widest <= SIZES[size][0] + 1
    finally:
        page.context.close()


@pytest.mark.slow
def test_stop_in_the_browser_ends_a_long_sweep(request):
    page = _page(request, *SIZES["desktop"])
    try:
        _sweep_tab(page, "Once upon a time")
        _field(page, "sweep-values-1", "0.5, 0.7, 0.9, 1.1, 1.3")
        _field(page, "sweep-samples", "32")
        _field(page, "sweep-max-new", "400")
        page.locator("#sweep-run").click()
        _shows(page, "#sweep-status", re.compile(r"Sweep running"))
        page.locator("#sweep-stop").click()
        _shows(page, "#sweep-status", "Sweep stopped")
    finally:
        page.context.close()


def test_read_values_takes_chinese_commas_and_whole_numbers():
    assert sweep_panel.read_values("0.5，1、 2", "v") == [0.5, 1, 2]
    assert sweep_panel.read_values(" 20 40 ", "v") == [20, 40]


def test_a_second_run_stops_the_first():
    """One sweep a page: Run pressed while a sweep runs stops that one (its own stop event) before the new one."""
    parts, _ = _parts()
    data = {parts.state: sweep_panel.SweepSession()}
    first = data[parts.state].stop
    sweep_panel.arm(parts, data)
    assert first.is_set() and not data[parts.state].stop.is_set()
