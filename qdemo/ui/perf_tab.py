"""Performance tab: wiring only (logic in qdemo.services.perf). This session's runs from Chat and Compare —
they survive a page reload in the browser's storage — as latency, decode speed, memory and a table with CSV."""

from __future__ import annotations

import gradio as gr

from qdemo.services import perf
from qdemo.services.files import scratch_dir
from qdemo.ui.context import SessionComponents, UIContext


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="perf-refresh")
        clear = gr.Button("Clear runs", variant="stop", elem_id="perf-clear")
        csv = gr.DownloadButton("Download CSV", value=None, elem_id="perf-csv")
    summary = gr.Markdown(perf.summary_line([]), elem_id="perf-summary")
    empty = perf.perf_views([])
    with gr.Row(equal_height=False):
        latency = gr.Plot(empty.latency, label="latency", show_label=False, elem_id="perf-latency")
        tps = gr.Plot(empty.tps, label="decode speed", show_label=False, elem_id="perf-tps")
    memory = gr.Plot(empty.memory, label="memory", show_label=False, elem_id="perf-memory")
    table = gr.Dataframe(empty.table, label="runs", interactive=False, elem_id="perf-table")

    def show(data):
        runs = data[session.runs]
        views = perf.perf_views(runs)
        return {latency: views.latency, tps: views.tps, memory: views.memory, table: views.table,
                summary: perf.summary_line(runs), csv: str(perf.write_csv(runs, scratch_dir())) if runs else None}

    outputs = [latency, tps, memory, table, csv]
    ui.on(refresh.click, show, {session.runs}, outputs, notice=summary)
    ui.on(session.runs.change, show, {session.runs}, outputs, notice=summary, show_progress="hidden")

    def clear_runs(data):
        return {session.runs: [], session.saved_runs: []}

    ui.on(clear.click, clear_runs, {session.runs}, [session.runs, session.saved_runs], notice=summary)
