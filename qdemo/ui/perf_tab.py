"""Performance: latency per token, rolling decode speed, memory and a summary table over this session's runs
(appended by Chat and Compare), with a CSV download."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from qdemo.runs import RunRecord
from qdemo.ui.context import AppContext, SessionComponents
from qdemo.views.perf import latency_figure, memory_figure, rolling_tps_figure, runs_table

CSV_NAME = "qdemo-runs.csv"


@dataclass(frozen=True)
class PerfViews:
    latency: go.Figure
    tps: go.Figure
    memory: go.Figure
    table: pd.DataFrame


# --- logic (no Gradio) ----------------------------------------------------------------------------------------

def perf_views(runs: Sequence[RunRecord] | None) -> PerfViews:
    runs = list(runs or [])
    return PerfViews(latency=latency_figure(runs), tps=rolling_tps_figure(runs), memory=memory_figure(runs),
                     table=runs_table(runs))


def write_csv(runs: Sequence[RunRecord] | None, folder: str | Path | None = None) -> Path:
    """runs_table as CSV in a fresh temporary folder (or `folder`); returns the file's path."""
    target = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="qdemo-runs-"))
    path = target / CSV_NAME
    runs_table(list(runs or [])).to_csv(path, index=False, encoding="utf-8")
    return path


def summary_line(runs: Sequence[RunRecord] | None) -> str:
    runs = list(runs or [])
    if not runs:
        return "No runs yet: chat or compare, and each finished run shows up here."
    tokens = sum(len(r.tokens) for r in runs)
    return f"**{len(runs)}** run(s) this session · {tokens:,} generated tokens in all"


# --- UI -------------------------------------------------------------------------------------------------------

def build(ctx: AppContext, session: SessionComponents, tab: gr.Tab) -> None:
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="perf-refresh")
        clear = gr.Button("Clear runs", variant="stop", elem_id="perf-clear")
        csv = gr.DownloadButton("Download CSV", value=None, elem_id="perf-csv")
    summary = gr.Markdown(summary_line([]), elem_id="perf-summary")
    empty = perf_views([])
    with gr.Row():
        latency = gr.Plot(empty.latency, label="latency", elem_id="perf-latency")
        tps = gr.Plot(empty.tps, label="tokens per second", elem_id="perf-tps")
    memory = gr.Plot(empty.memory, label="memory", elem_id="perf-memory")
    table = gr.Dataframe(empty.table, label="runs", interactive=False, elem_id="perf-table")

    def show(runs):
        views = perf_views(runs)
        return [views.latency, views.tps, views.memory, views.table, summary_line(runs),
                str(write_csv(runs)) if runs else None]

    outputs = [latency, tps, memory, table, summary, csv]
    refresh.click(show, session.runs, outputs, api_visibility="private")
    session.runs.change(show, session.runs, outputs, show_progress="hidden", api_visibility="private")
    clear.click(lambda: [[], *show([])], None, [session.runs, *outputs], api_visibility="private")
