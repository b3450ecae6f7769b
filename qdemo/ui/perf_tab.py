"""Performance tab: layout and wiring (logic in qdemo.services.perf). This session's runs from Chat and Compare —
they survive a page reload in the browser's storage — as latency, decode speed, memory and a table with CSV."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from qdemo.services import history, perf
from qdemo.services.arguments import Arguments
from qdemo.services.files import scratch_dir
from qdemo.ui.context import SessionComponents, UIContext


ALL = "all"
FORWARDS = ("torch", "llama.cpp", "remote")
HISTORY_COLUMNS = ("run", "when (UTC)", "kind", "model", "forward", "tokens", "tok/s", "TTFT s", "ended", "link")


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
    history: HistoryParts


@dataclass(frozen=True)
class HistoryParts:
    """The stored history: this browser's runs from the run store, across restarts of the server."""

    model: gr.Dropdown
    forward: gr.Dropdown
    show: gr.Button
    line: gr.Markdown
    table: gr.Dataframe


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    parts = _layout(session, ui)
    h = parts.history
    listed = partial(list_history, parts, ui)
    ui.on([h.show.click, tab.select, h.model.input, h.forward.input], listed,
          {session.owner, h.model, h.forward}, [h.table, h.line], notice=h.line)
    outputs = [parts.latency, parts.tps, parts.memory, parts.table, parts.csv]
    ui.on(parts.refresh.click, partial(show, parts), {session.runs}, outputs, notice=parts.summary)
    ui.on(session.runs.change, partial(show, parts), {session.runs}, outputs, notice=parts.summary,
          show_progress="hidden")
    ui.on(parts.clear.click, partial(clear_runs, parts), {session.runs}, [session.runs, session.saved_runs],
          notice=parts.summary)


def _layout(session: SessionComponents, ui: UIContext) -> PerfParts:
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
                     tps=tps, memory=memory, table=table, history=_history_layout(ui))


def _history_layout(ui: UIContext) -> HistoryParts:
    gr.Markdown("### Stored history\nThis browser's runs kept by the server's run store, across restarts. "
                "**open** shows a run read-only in Chat; Inspect and the bundle then read it.")
    with gr.Row():
        model = gr.Dropdown([ALL, *ui.services.registry.models], value=ALL, label="model", elem_id="history-model",
                            min_width=160)
        forward = gr.Dropdown([ALL, *FORWARDS], value=ALL, label="forward", elem_id="history-forward",
                              min_width=120)
        show = gr.Button("Show stored runs", elem_id="history-show", min_width=120)
    line = gr.Markdown("", elem_id="history-line")
    table = gr.Dataframe(headers=list(HISTORY_COLUMNS), datatype=[*["str"] * (len(HISTORY_COLUMNS) - 1), "markdown"],
                         interactive=False, elem_id="history-table")
    return HistoryParts(model, forward, show, line, table)


def show(parts: PerfParts, data: dict) -> dict:
    runs = data[parts.session.runs]
    views = perf.perf_views(runs)
    return {parts.latency: views.latency, parts.tps: views.tps, parts.memory: views.memory,
            parts.table: views.table, parts.summary: perf.summary_line(runs),
            parts.csv: str(perf.write_csv(runs, scratch_dir())) if runs else None}


def clear_runs(parts: PerfParts, data: dict) -> dict:
    return {parts.session.runs: [], parts.session.saved_runs: []}


def list_history(parts: PerfParts, ui: UIContext, data: dict) -> dict:
    h = parts.history
    store = ui.services.store
    if store is None:
        return {h.line: "This server keeps no runs beyond its process (its run store is off).", h.table: None}
    args = Arguments(ui.services.limits)
    model = args.choice(data[h.model], "model", [ALL, *ui.services.registry.models])
    forward = args.choice(data[h.forward], "forward", [ALL, *FORWARDS])
    rows = history.history(store, history.page_owner(data[parts.session.owner]), None if model == ALL else model,
                           None if forward == ALL else forward)
    table = [[r.id, r.created_at.strftime("%Y-%m-%d %H:%M"), r.kind, r.model, r.forward, r.tokens,
              _fixed(r.tok_s, 1), _fixed(r.ttft_s, 2), r.reason, f"[open](?run={r.id})"] for r in rows]
    shown = f"{len(rows)} stored run(s)" + (f" of {model}" if model != ALL else "") + \
        (f" on {forward}" if forward != ALL else "")
    return {h.table: pd.DataFrame(table, columns=list(HISTORY_COLUMNS)), h.line: shown}


def _fixed(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
