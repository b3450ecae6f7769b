"""Performance of this session's runs: figures, the runs table and its CSV, and the compact form the browser
keeps so the runs survive a page reload. No Gradio here."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go

from qdemo.core.runs import RunRecord, run_from_dict
from qdemo.views.perf import (
    latency_figure,
    memory_figure,
    rolling_tps_figure,
    runs_table_for_people,
)

CSV_NAME = "qdemo-runs.csv"
KEPT_RUNS = 30  # runs the browser keeps (each without its per-token stage distributions)


@dataclass(frozen=True)
class PerfViews:
    latency: go.Figure
    tps: go.Figure
    memory: go.Figure
    table: pd.DataFrame


def perf_views(runs: Sequence[RunRecord] | None) -> PerfViews:
    runs = list(runs or [])
    return PerfViews(latency=latency_figure(runs), tps=rolling_tps_figure(runs), memory=memory_figure(runs),
                     table=runs_table_for_people(runs))


def write_csv(runs: Sequence[RunRecord] | None, folder: str | Path | None = None) -> Path:
    """runs_table as CSV in a fresh temporary folder (or `folder`); returns the file's path."""
    target = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="qdemo-runs-"))
    path = target / CSV_NAME
    runs_table_for_people(list(runs or [])).to_csv(path, index=False, encoding="utf-8")
    return path


def summary_line(runs: Sequence[RunRecord] | None) -> str:
    runs = list(runs or [])
    if not runs:
        return "No runs yet: chat or compare, and each finished run shows up here."
    tokens = sum(len(r.tokens) for r in runs)
    return f"**{len(runs)}** run(s) this session · {tokens:,} generated tokens in all"


def next_run_id(runs: Sequence[RunRecord] | None) -> int:
    return max((r.run_id for r in runs or []), default=0) + 1


def saved(runs: Sequence[RunRecord] | None) -> str:
    """The newest runs in the compact form the browser keeps: everything the Performance tab draws, without the
    per-token stage distributions (they would fill the browser's storage). One JSON text, not a tree of objects:
    Gradio's page copies the value of every output it tracks on each progress message of an answer, and a tree of
    some 15 values per token took its main thread for seconds (a click on Stop waited behind it)."""
    out = []
    for run in list(runs or [])[-KEPT_RUNS:]:
        if run.done is None:
            continue
        slim = dataclasses.replace(run, tokens=[dataclasses.replace(t, stages=()) for t in run.tokens])
        out.append(slim.to_dict())
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def restored(data: Any) -> list[RunRecord]:
    """Runs from the browser's copy (its JSON text, or the list older pages kept); anything malformed is skipped
    (it is the browser's data, not ours)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return []
    runs = []
    for item in data if isinstance(data, list) else []:
        try:
            runs.append(run_from_dict(item))
        except (KeyError, TypeError, ValueError):
            continue
    return runs
