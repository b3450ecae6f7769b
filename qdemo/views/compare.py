"""Two runs side by side: where their tokens part ways, and how their speed and cost compare."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from qdemo.runs import RunRecord
from qdemo.views._figure import MIB
from qdemo.views.perf import rolling_tps_figure


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
    return rolling_tps_figure(runs, window, title=f"Decode speed compared (rolling over {window} tokens)")


SIDE_BY_SIDE_METRICS = ("TTFT (s)", "prefill tok/s", "decode tok/s", "tokens", "peak memory MiB")


def _metrics(run: RunRecord) -> list[float]:
    # A run still going has only its token count; the rest waits for its DoneEvent.
    if run.done is None:
        return [math.nan, math.nan, math.nan, float(len(run.tokens)), math.nan]
    stats = run.done.stats
    return [round(stats.ttft_seconds, 3), round(stats.prefill_tokens_per_s, 1), round(stats.decode_tokens_per_s, 1),
            float(stats.new_tokens), round(stats.peak_memory_bytes / MIB, 1)]


def side_by_side_frame(a: RunRecord, b: RunRecord) -> pd.DataFrame:
    return pd.DataFrame({"metric": list(SIDE_BY_SIDE_METRICS), "A": _metrics(a), "B": _metrics(b)})
