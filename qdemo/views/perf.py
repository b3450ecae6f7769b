"""Performance of finished and running generations: latency, throughput, memory, and a summary table."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.runs import RunRecord
from qdemo.views._figure import MIB, empty_figure, styled

NO_RUNS = "no runs yet"
TABLE_COLUMNS = ("run", "label", "model", "reason", "prompt_tokens", "new_tokens", "ttft_s", "prefill_tok_s",
                 "decode_tok_s", "peak_mib", "settings")


def run_name(run: RunRecord) -> str:
    """Trace name "#<run_id> <label> <model>", without a double space when the label is empty."""
    return " ".join(part for part in (f"#{run.run_id}", run.label, run.model) if part)


def rolling_tps(step_seconds: Sequence[float], window: int = 8) -> list[float]:
    """tokens/s over the last `window` steps (fewer at the start, so short runs still get a curve);
    NaN where the time sums to zero."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(step_seconds, dtype=float))])
    out = []
    for i in range(len(step_seconds)):
        start = max(0, i + 1 - window)
        seconds = cumulative[i + 1] - cumulative[start]
        out.append((i + 1 - start) / seconds if seconds > 0 else math.nan)
    return out


def latency_figure(runs: Sequence[RunRecord]) -> go.Figure:
    title, x_title, y_title = "Latency per token", "step", "ms per token"
    if not runs:
        return empty_figure(title, NO_RUNS, x_title, y_title)
    fig = go.Figure([go.Scatter(x=[t.step for t in run.tokens], y=[t.step_seconds * 1000 for t in run.tokens],
                                mode="lines+markers", name=run_name(run)) for run in runs])
    return styled(fig, title, x_title, y_title, hovermode="x unified")


def rolling_tps_figure(runs: Sequence[RunRecord], window: int = 8,
                       title: str | None = None) -> go.Figure:
    title = title or f"Decode speed (rolling over {window} tokens)"
    x_title, y_title = "step", "tokens / s"
    if not runs:
        return empty_figure(title, NO_RUNS, x_title, y_title)
    fig = go.Figure([go.Scatter(x=[t.step for t in run.tokens], y=rolling_tps([t.step_seconds for t in run.tokens],
                                                                                window),
                                mode="lines", name=run_name(run)) for run in runs])
    return styled(fig, title, x_title, y_title, hovermode="x unified")


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def memory_figure(runs: Sequence[RunRecord]) -> go.Figure:
    """Row 1: device memory (CUDA allocated / reserved / peak, or process RSS on CPU). Row 2: KV-cache size."""
    title = "Memory per step"
    if not runs:
        return empty_figure(title, NO_RUNS, "step", "MiB")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("device memory", "KV cache"))
    for run in runs:
        steps = [t.step for t in run.tokens]
        name = run_name(run)
        on_cuda = bool(run.tokens) and run.tokens[0].memory.device == "cuda"
        series = (("allocated", "cuda_allocated"), ("reserved", "cuda_reserved"), ("peak", "cuda_peak")) \
            if on_cuda else (("RSS", "rss_bytes"),)
        for what, attr in series:
            fig.add_trace(go.Scatter(x=steps, y=[_mib(getattr(t.memory, attr)) for t in run.tokens],
                                     mode="lines", name=f"{name} {what}", legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[_mib(t.kv_cache_bytes) for t in run.tokens], mode="lines",
                                 name=f"{name} KV cache", legendgroup=name), row=2, col=1)
    fig.update_yaxes(title_text="MiB", row=1, col=1)
    fig.update_yaxes(title_text="KV cache MiB", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return styled(fig, title, height=560)


def settings_text(settings: Mapping[str, Any]) -> str:
    """Only the knobs that change anything, e.g. "T=0.7 top_k=20 top_p=0.8 rp=1.05 seed=1" or "greedy"."""
    def num(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    if not settings:
        return ""
    temperature = settings.get("temperature", 1.0)
    parts = []
    if not settings.get("do_sample", True) or temperature == 0:
        parts.append("greedy")
    else:
        parts.append(f"T={num(temperature)}")
        if settings.get("top_k", 0):
            parts.append(f"top_k={num(settings['top_k'])}")
        if settings.get("top_p", 1.0) < 1.0:
            parts.append(f"top_p={num(settings['top_p'])}")
        if settings.get("min_p", 0.0) > 0.0:
            parts.append(f"min_p={num(settings['min_p'])}")
    if settings.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"rp={num(settings['repetition_penalty'])}")
    if settings.get("seed") is not None and parts[0] != "greedy":  # greedy ignores the seed
        parts.append(f"seed={settings['seed']}")
    return " ".join(parts)


def run_row(run: RunRecord) -> dict[str, Any]:
    """One table row. A running run has no stats yet: its counts come from the events seen so far."""
    row: dict[str, Any] = {"run": run.run_id, "label": run.label, "model": run.model,
                           "settings": settings_text(run.settings)}
    if run.done is None:
        return {**row, "reason": "running",
                "prompt_tokens": len(run.prefill.prompt_ids) if run.prefill else math.nan,
                "new_tokens": len(run.tokens), "ttft_s": math.nan, "prefill_tok_s": math.nan,
                "decode_tok_s": math.nan, "peak_mib": math.nan}
    stats = run.done.stats
    return {**row, "reason": run.done.reason, "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
            "ttft_s": round(stats.ttft_seconds, 3), "prefill_tok_s": round(stats.prefill_tokens_per_s, 1),
            "decode_tok_s": round(stats.decode_tokens_per_s, 1), "peak_mib": round(stats.peak_memory_bytes / MIB, 1)}


def runs_table(runs: Sequence[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([run_row(run) for run in runs], columns=list(TABLE_COLUMNS))
