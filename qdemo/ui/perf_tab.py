"""Performance tab: layout and wiring (logic in qdemo.services.perf). This session's runs from Chat and Compare —
they survive a page reload in the browser's storage — as latency, decode speed, memory and a table with CSV."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from qdemo.services import perf
from qdemo.services.files import scratch_dir
from qdemo.ui.context import SessionComponents, UIContext


@dataclass(frozen=True)
class PerfParts:
    session: SessionComponents
    refresh: gr.Button
    clear: gr.Button
    csv: gr.DownloadButton
    summary: gr.Markdown  # one line about the runs; refusals show here too
    latency: gr.Plot
    tps: gr.Plot
    memory: gr.Plot
    table: gr.Dataframe


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    parts = _layout(session)
    outputs = [parts.latency, parts.tps, parts.memory, parts.table, parts.csv]
    ui.on(parts.refresh.click, partial(show, parts), {session.runs}, outputs, notice=parts.summary)
    ui.on(session.runs.change, partial(show, parts), {session.runs}, outputs, notice=parts.summary,
          show_progress="hidden")
    ui.on(parts.clear.click, partial(clear_runs, parts), {session.runs}, [session.runs, session.saved_runs],
          notice=parts.summary)


def _layout(session: SessionComponents) -> PerfParts:
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="perf-refresh")
        clear = gr.Button("Clear runs", variant="stop", elem_id="perf-clear")
        csv = gr.DownloadButton("Download CSV", value=None, elem_id="perf-csv")
    summary = gr.Markdown(perf.summary_line([]), elem_id="perf-summary")
    empty = perf.perf_views([])
    # Side by side where both have room (about 700 px), stacked on a phone.
    with gr.Row(equal_height=False):
        latency = gr.Plot(empty.latency, label="latency", show_label=False, elem_id="perf-latency", min_width=340)
        tps = gr.Plot(empty.tps, label="decode speed", show_label=False, elem_id="perf-tps", min_width=340)
    memory = gr.Plot(empty.memory, label="memory", show_label=False, elem_id="perf-memory")
    table = gr.Dataframe(empty.table, label="runs", interactive=False, elem_id="perf-table")
    return PerfParts(session=session, refresh=refresh, clear=clear, csv=csv, summary=summary, latency=latency,
                     tps=tps, memory=memory, table=table)


def show(parts: PerfParts, data: dict) -> dict:
    runs = data[parts.session.runs]
    views = perf.perf_views(runs)
    return {parts.latency: views.latency, parts.tps: views.tps, parts.memory: views.memory,
            parts.table: views.table, parts.summary: perf.summary_line(runs),
            parts.csv: str(perf.write_csv(runs, scratch_dir())) if runs else None}


def clear_runs(parts: PerfParts, data: dict) -> dict:
    return {parts.session.runs: [], parts.session.saved_runs: []}
