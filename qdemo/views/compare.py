"""Two runs side by side: where their tokens part ways, and how their speed and cost compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.core.runs import RunRecord
from qdemo.views._figure import styled, wrap_title
from qdemo.views.perf import decode_steps, rolling_tps, rolling_tps_figure, run_colour, run_name, run_row


@dataclass(frozen=True)
class Divergence:
    """First step where two token sequences differ; None everywhere when they are identical. A side that
    has already ended at `step` has token None."""

    step: int | None
    a_token: int | None
    b_token: int | None


def first_divergence(a_ids: Sequence[int], b_ids: Sequence[int]) -> Divergence:
    for step, (a, b) in enumerate(zip(a_ids, b_ids)):
        if a != b:
            return Divergence(step, a, b)
    if len(a_ids) == len(b_ids):
        return Divergence(None, None, None)
    step = min(len(a_ids), len(b_ids))
    return Divergence(step, a_ids[step] if step < len(a_ids) else None, b_ids[step] if step < len(b_ids) else None)


def tps_pair_figure(runs: Sequence[RunRecord], window: int = 8) -> go.Figure:
    """Each run's decode speed (from step 1, as on the Performance tab) in a row of its own, A on top, in its run
    colour, on one shared tokens/s scale: A and B decode in one batch, step for step, so overlaid lines would
    coincide and A's would lie hidden under B's."""
    title = f"Decode speed compared (rolling over {window} tokens, from step 1)"
    if not runs:
        return rolling_tps_figure(runs, window, title=title)
    fig = make_subplots(rows=len(runs), cols=1, shared_xaxes=True, vertical_spacing=0.12)
    for row, run in enumerate(runs, start=1):
        decode = decode_steps(run)
        fig.add_trace(go.Scatter(x=[t.step for t in decode], y=rolling_tps([t.step_seconds for t in decode], window),
                                 mode="lines", name=run_name(run), legendgroup=run_name(run),
                                 line={"color": run_colour(run)}), row=row, col=1)
    fig.update_yaxes(matches="y", title_text="tokens / s")
    fig.update_xaxes(title_text="step", row=len(runs), col=1)
    return styled(fig, wrap_title(title), hovermode="x unified", legend={"orientation": "h", "y": -0.25})


# Table label → runs_table column: the same numbers, rounded the same way, as the Performance tab.
SIDE_BY_SIDE_METRICS = {"TTFT (s)": "ttft_s", "prefill tok/s": "prefill_tok_s", "decode tok/s": "decode_tok_s",
                        "tokens": "new_tokens", "peak memory MiB": "peak_mib"}


def side_by_side_frame(a: RunRecord, b: RunRecord) -> pd.DataFrame:
    rows = {side: run_row(run) for side, run in (("A", a), ("B", b))}
    return pd.DataFrame({"metric": list(SIDE_BY_SIDE_METRICS),
                         **{side: [float(row[col]) for col in SIDE_BY_SIDE_METRICS.values()]
                            for side, row in rows.items()}})


PLACEHOLDER = "–"


def empty_side_by_side() -> pd.DataFrame:
    """The side-by-side table before any run: its metric rows, with "–" for both sides."""
    return pd.DataFrame({"metric": list(SIDE_BY_SIDE_METRICS), "A": [PLACEHOLDER] * len(SIDE_BY_SIDE_METRICS),
                         "B": [PLACEHOLDER] * len(SIDE_BY_SIDE_METRICS)}, columns=["metric", "A", "B"])
