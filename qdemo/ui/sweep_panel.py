"""The Sampling lab's Sweep: the lab's context, model and sliders as the base settings, a grid over one or two of
them, N seeded samples per cell decoded as rows of one batch (qdemo.services.sweep). Heatmaps per measure fill in
as rows finish; a click on a cell opens its samples side by side with their token views; Stop ends the sweep with
what has finished; CSV and JSON export every sample."""

from __future__ import annotations

import html
import re
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import gradio as gr

from qdemo.sampling import SamplingParams
from qdemo.services import history
from qdemo.services import sweep as service
from qdemo.services.settings import whole_number
from qdemo.ui import forward_picker
from qdemo.ui.context import UIContext, download, event_index
from qdemo.views import sweep_view as views
from qdemo.views.tokens import TOKEN_VIEW_CSS, token_view_html

NO_AXIS = "none"
HINT = ("Pick one or two settings and their values: every cell of the grid samples the lab's context N times "
        "(seeds shown: each sample re-runs from its seed), after one shared prefill.")
UI_INTERVAL_S = 0.25  # heatmaps redraw at most this often while rows finish
MAX_VALUES_CHARS = 200


class SweepSession:
    """This page's sweep: its stop event and the last result the cell view and the exports read. A plain class:
    Gradio reads a dataclass State's value with dataclasses.asdict, which cannot copy an Event."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.result: service.SweepProgress | None = None
        self.meta: dict = {}

    def __deepcopy__(self, memo: dict) -> "SweepSession":
        return type(self)()


@dataclass(frozen=True)
class LabInputs:
    """What the sweep reads from the lab around it."""

    model: Any
    forward: Any
    context_box: Any
    mode: Any
    controls: list  # the lab's sampling sliders, in the order `params_of` reads them
    params_of: Callable[[dict], SamplingParams]  # the sliders' values → the sweep's base settings
    owner: Any = None  # the page's browser id (SessionComponents.owner): whose stored sweep it is


@dataclass(frozen=True)
class SweepParts:
    state: gr.State
    axis_1: gr.Dropdown
    values_1: gr.Textbox
    axis_2: gr.Dropdown
    values_2: gr.Textbox
    samples: gr.Number
    max_new: gr.Number
    seed: gr.Number
    run: gr.Button
    stop: gr.Button
    status: gr.Markdown
    maps: gr.HTML
    scatter: gr.Plot
    cell: gr.HTML
    csv: gr.DownloadButton
    json: gr.DownloadButton

    def settings(self) -> set:
        return {self.axis_1, self.values_1, self.axis_2, self.values_2, self.samples, self.max_new, self.seed}


def wire(ui: UIContext, parts: SweepParts, lab: LabInputs) -> None:
    on = partial(ui.on, notice=parts.status)
    inputs = {parts.state, lab.model, lab.forward, lab.context_box, lab.mode, *lab.controls, *parts.settings(),
              *([lab.owner] if lab.owner is not None else [])}
    step = on(parts.run.click, partial(arm, parts), {parts.state}, [parts.status, parts.cell], queue=False)
    ui.after(step, partial(run, parts, ui, lab), inputs,
             [parts.status, parts.maps, parts.scatter, parts.csv, parts.json], notice=parts.status, runs_model=True,
             show_progress="hidden")
    on(parts.stop.click, partial(stop, parts), {parts.state}, None, queue=False)
    on(parts.maps.select, partial(open_cell, parts), {parts.state}, [parts.cell, parts.maps], queue=False)


def layout() -> SweepParts:
    axes = list(service.AXES)
    gr.Markdown(HINT)
    with gr.Row():
        axis_1 = gr.Dropdown(axes, value="temperature", label="axis 1", elem_id="sweep-axis-1", min_width=140)
        values_1 = gr.Textbox("0.5, 0.8, 1.2", label="its values (up to 5)", elem_id="sweep-values-1", min_width=140)
    with gr.Row():
        axis_2 = gr.Dropdown([NO_AXIS, *axes], value="top_p", label="axis 2", elem_id="sweep-axis-2", min_width=140)
        values_2 = gr.Textbox("0.8, 0.95, 1.0", label="its values", elem_id="sweep-values-2", min_width=140)
    with gr.Row():
        samples = gr.Number(service.DEFAULT_SAMPLES, minimum=1, maximum=service.MAX_SAMPLES, precision=0,
                            label=f"samples per cell (1–{service.MAX_SAMPLES})", elem_id="sweep-samples", min_width=100)
        max_new = gr.Number(48, minimum=1, precision=0, label="max new tokens", elem_id="sweep-max-new", min_width=100)
        seed = gr.Number(0, minimum=0, precision=0, label="first seed", elem_id="sweep-seed", min_width=100)
    with gr.Row():
        run_btn = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
        stop_btn = gr.Button("Stop", elem_id="sweep-stop")
    status = gr.Markdown("", elem_id="sweep-status")
    maps = gr.HTML("", elem_id="sweep-maps", js_on_load=views.CELL_CLICK_JS,
                   head=f"<style>{views.CSS}{TOKEN_VIEW_CSS}</style>")
    scatter = gr.Plot(show_label=False, elem_id="sweep-scatter")
    cell = gr.HTML("", elem_id="sweep-cell")
    with gr.Row():
        csv = gr.DownloadButton("Download CSV", elem_id="sweep-csv", visible=False)
        json = gr.DownloadButton("Download JSON", elem_id="sweep-json", visible=False)
    return SweepParts(gr.State(SweepSession()), axis_1, values_1, axis_2, values_2, samples, max_new, seed, run_btn,
                      stop_btn, status, maps, scatter, cell, csv, json)


# --- handlers -------------------------------------------------------------------------------------------------------

def arm(parts: SweepParts, data: dict) -> dict:
    """At click time: a sweep still running is stopped (one sweep a page), then a fresh stop event (a late Stop
    never reaches the new sweep), and the old cell view goes."""
    data[parts.state].stop.set()
    data[parts.state].stop = threading.Event()
    return {parts.status: "Sweep queued…", parts.cell: ""}


def stop(parts: SweepParts, data: dict) -> None:
    data[parts.state].stop.set()


def read_values(text: Any, field_name: str) -> list[float]:
    """'0.5, 0.8, 1.2' (commas, Chinese commas or spaces) → numbers; anything else names the field."""
    if not isinstance(text, str):
        raise ValueError(f"{field_name} must be text such as 0.5, 0.8, 1.2")
    if len(text) > MAX_VALUES_CHARS:
        raise ValueError(f"{field_name} is too long ({len(text)} characters; at most {MAX_VALUES_CHARS})")
    pieces = [p for p in re.split(r"[,，、\s]+", text.strip()) if p]
    if not pieces:
        raise ValueError(f"{field_name}: give at least one value")
    values = []
    for piece in pieces:
        try:
            values.append(float(piece))
        except ValueError:
            raise ValueError(f"{field_name}: {piece[:20]!r} is not a number") from None
    return [int(v) if v.is_integer() else v for v in values]


def read_axes(parts: SweepParts, data: dict) -> dict[str, list[float]]:
    axes = {data[parts.axis_1]: read_values(data[parts.values_1], "axis 1 values")}
    second = data[parts.axis_2]
    if second != NO_AXIS:
        if second == data[parts.axis_1]:
            raise ValueError(f"axis 2 repeats axis 1 ({second}): pick another setting or none")
        axes[second] = read_values(data[parts.values_2], "axis 2 values")
    return axes


def run(parts: SweepParts, ui: UIContext, lab: LabInputs, data: dict, request: gr.Request) -> Iterator[dict]:
    session: SweepSession = data[parts.state]
    axes = read_axes(parts, data)
    base = lab.params_of(data).replace(max_new_tokens=whole_number(data[parts.max_new], "max new tokens"))
    samples, seed = whole_number(data[parts.samples], "samples per cell"), whole_number(data[parts.seed], "first seed")
    model = forward_picker.model_ref(data[lab.model], data[lab.forward])
    meta = {"model": model, "context": data[lab.context_box], "mode": data[lab.mode], "axes": axes,
            "samples": samples, "seed": seed, "base": base.to_dict()}
    shown, progress, stop = 0.0, None, session.stop  # this sweep's own stop: a later Run replaces the session's
    for progress in service.sweep(ui.services, ui.client(request), data[lab.context_box], data[lab.mode], model, base,
                                  axes, samples, seed, stop):
        if progress.done or time.monotonic() - shown >= UI_INTERVAL_S:
            shown = time.monotonic()
            yield _progress(parts, progress, stop)
    if progress is not None:
        session.result, session.meta = progress, meta
        cells = service.view_cells(progress)
        owner = history.page_owner(data.get(lab.owner)) if lab.owner is not None else None
        history.keep_sweep(ui.services.store, owner, model, progress.forward, meta, views.export_body(cells, {}))
        yield {**_progress(parts, progress, stop, cells), **_finished(parts, meta, cells)}


def _progress(parts: SweepParts, progress: service.SweepProgress, stop: threading.Event,
              cells: list[views.SweepCell] | None = None) -> dict:
    cells = cells if cells is not None else service.view_cells(progress)
    done = sum(c.measures is not None and c.measures.samples == len(c.seeds) for c in cells)
    line = views.progress_line(done, len(cells), progress.rows_done, progress.rows_total, progress.done,
                               stopped=progress.done and stop.is_set())
    note = (f" · one prefill of {progress.prompt_tokens} tokens, {progress.rows_per_chunk} rows a step"
            if progress.prompt_tokens else "")
    hint = " · click a cell for its samples" if progress.done else ""
    notice = f"\n\n{progress.notice}" if progress.notice else ""
    return {parts.status: line + note + hint + notice, parts.maps: views.heatmaps_html(cells)}


def _finished(parts: SweepParts, meta: dict, cells: list[views.SweepCell]) -> dict:
    return {parts.scatter: views.scatter_figure(cells),
            parts.csv: download("qdemo-sweep.csv", views.export_csv(cells)),
            parts.json: download("qdemo-sweep.json", views.export_json(cells, meta))}


def open_cell(parts: SweepParts, data: dict, evt: gr.EventData) -> dict:
    """A click on a heatmap cell: that cell's samples side by side, each with its seed and token view."""
    session: SweepSession = data[parts.state]
    picked = event_index(evt, "cell")
    result = session.result
    if result is None:
        return {parts.cell: "<p>Run a sweep first; then click a cell.</p>"}
    if isinstance(picked, bool) or not isinstance(picked, int) or not 0 <= picked < len(result.cells):
        raise ValueError(f"cell must be a cell of this sweep (0 to {len(result.cells) - 1})")
    return {parts.cell: _cell_html(result, picked),
            parts.maps: views.heatmaps_html(service.view_cells(result), picked)}


def _cell_html(result: service.SweepProgress, index: int) -> str:
    cell = result.cells[index]
    boxes = []
    for k, (seed, row) in enumerate(zip(cell.seeds, cell.rows)):
        if row is None:
            body, facts = "<p>(did not run: the sweep was stopped or hit its time limit)</p>", "not run"
        else:
            texts = [result.labels.get(e.token_id, "") for e in row.events]
            body = token_view_html(row.events, texts, result.labels)
            facts = f"{len(row.events)} tokens" + (" · ended" if row.sample.ended else "")
        boxes.append(f'<div class="sweep-sample"><h5>sample {k + 1} · seed {seed} · {facts}</h5>{body}</div>')
    title = html.escape(views.cell_label(cell.settings))
    return f'<h4>{title}</h4><div class="sweep-samples">{"".join(boxes)}</div>'
