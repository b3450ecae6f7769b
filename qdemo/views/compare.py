"""Two runs side by side: where their tokens part ways, and how their speed and cost compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from qdemo.core.runs import RunRecord
from qdemo.views.perf import rolling_tps_figure, run_row


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


def tps_overlay_figure(runs: Sequence[RunRecord], window: int = 8) -> go.Figure:
    """Both runs' decode speed (from step 1, as on the Performance tab), each in its run colour."""
    return rolling_tps_figure(runs, window, title=f"Decode speed compared (rolling over {window} tokens, from step 1)")


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
