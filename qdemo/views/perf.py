"""Performance of finished and running generations: latency, throughput, memory, and a summary table."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.core.events import TokenEvent
from qdemo.core.runs import RunRecord
from qdemo.views._figure import MIB, empty_figure, styled

NO_RUNS = "no runs yet"
TABLE_COLUMNS = ("run", "label", "model", "reason", "prompt_tokens", "new_tokens", "ttft_s", "prefilled_tokens",
                 "reused_tokens", "prefill_tok_s", "decode_tok_s", "peak_mib", "settings")


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


# One colour per run, the same in every chart (plotly's default qualitative palette).
RUN_PALETTE = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF",
               "#FECB52")
_MEMORY_DASH = {"allocated": "solid", "reserved": "dash", "peak": "dot", "RSS": "solid"}


def run_colour(run: RunRecord | int) -> str:
    """The run's colour in every chart: fixed by its run_id over RUN_PALETTE."""
    run_id = run if isinstance(run, int) else run.run_id
    return RUN_PALETTE[run_id % len(RUN_PALETTE)]


def decode_steps(run: RunRecord) -> list[TokenEvent]:
    """The tokens after the first: step 0's time holds the prefill (the wait for the first token), so it is
    not decode speed."""
    return [t for t in run.tokens if t.step >= 1]


def ttft_seconds(run: RunRecord) -> float:
    """Time to first token: from the stats when done, else the first step's time so far (NaN before it)."""
    if run.done is not None:
        return run.done.stats.ttft_seconds
    return run.tokens[0].step_seconds if run.tokens else math.nan


def latency_figure(runs: Sequence[RunRecord]) -> go.Figure:
    """Top: one bar per run, time to first token (s): prefill and the first step, a different cost from
    decoding. Bottom: decode latency, ms per token, from step 1."""
    title = "Latency: first token, then per decoded token"
    if not runs:
        return empty_figure(title, NO_RUNS, "step", "ms per token")
    fig = make_subplots(rows=2, cols=1, row_heights=[0.32, 0.68], vertical_spacing=0.16,
                        subplot_titles=("time to first token (s)", "decode latency per token (ms, from step 1)"))
    for run in runs:
        name, colour = run_name(run), run_colour(run)
        decode = decode_steps(run)
        fig.add_trace(go.Scatter(x=[t.step for t in decode], y=[t.step_seconds * 1000 for t in decode],
                                 mode="lines+markers", name=name, legendgroup=name, line={"color": colour},
                                 hovertemplate=name + "<br>step %{x}: %{y:.1f} ms<extra></extra>"),
                      row=2, col=1)
    for run in runs:
        name, ttft = run_name(run), ttft_seconds(run)
        short = " ".join(part for part in (f"#{run.run_id}", run.label) if part)
        fig.add_trace(go.Bar(y=[short], x=[ttft], orientation="h", name=f"{name} TTFT", legendgroup=name,
                             showlegend=False, marker={"color": run_colour(run)},
                             text=[f"{ttft:.2f} s" if math.isfinite(ttft) else "–"], textposition="auto",
                             hovertemplate=name + "<br>first token after %{x:.3f} s<extra></extra>",
                             meta={"kind": "ttft"}), row=1, col=1)
    fig.update_yaxes(title_text="run", type="category", autorange="reversed", row=1, col=1)
    fig.update_xaxes(rangemode="tozero", ticksuffix=" s", row=1, col=1)  # the unit on the ticks: no title to collide
    fig.update_yaxes(title_text="ms per token", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return styled(fig, title, height=480 + 24 * len(runs), hovermode="closest", legend=legend_below(-0.12))


def rolling_tps_figure(runs: Sequence[RunRecord], window: int = 8,
                       title: str | None = None) -> go.Figure:
    """Decode speed: tokens/s rolling over the last `window` decode steps (step 1 on; step 0 holds the
    prefill and the first-token wait, charted in latency_figure)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    title = title or f"Decode speed (rolling over {window} tokens, from step 1)"
    x_title, y_title = "step", "tokens / s"
    if not runs:
        return empty_figure(title, NO_RUNS, x_title, y_title)
    traces = []
    for run in runs:
        decode = decode_steps(run)
        traces.append(go.Scatter(x=[t.step for t in decode], y=rolling_tps([t.step_seconds for t in decode], window),
                                 mode="lines", name=run_name(run), legendgroup=run_name(run),
                                 line={"color": run_colour(run)}))
    fig = go.Figure(traces)
    return styled(fig, title, x_title, y_title, hovermode="x unified", legend=legend_below(-0.25))


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


CPU_MEMORY_AXIS = "process RSS (MiB)"
CUDA_MEMORY_AXIS = "CUDA allocated / reserved / peak (MiB)"


def memory_axis_title(runs: Sequence[RunRecord]) -> str:
    """What the device-memory axis measures for these runs (both when CPU and CUDA runs are mixed)."""
    devices = {run.tokens[0].memory.device for run in runs if run.tokens}
    if devices == {"cuda"}:
        return CUDA_MEMORY_AXIS
    if "cuda" in devices:
        return "CUDA allocated / reserved / peak, or process RSS (MiB)"
    return CPU_MEMORY_AXIS


def memory_figure(runs: Sequence[RunRecord]) -> go.Figure:
    """Row 1: device memory (CUDA allocated / reserved / peak, or process RSS on CPU). Row 2: KV-cache size.
    Each run keeps its colour; the series of one run differ by dash."""
    title = "Memory per step"
    if not runs:
        return empty_figure(title, NO_RUNS, "step", "MiB")
    axis = memory_axis_title(runs)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=(axis.replace(" (MiB)", ""), "KV cache"))
    for run in runs:
        steps = [t.step for t in run.tokens]
        name, colour = run_name(run), run_colour(run)
        on_cuda = bool(run.tokens) and run.tokens[0].memory.device == "cuda"
        series = (("allocated", "cuda_allocated"), ("reserved", "cuda_reserved"), ("peak", "cuda_peak")) \
            if on_cuda else (("RSS", "rss_bytes"),)
        for what, attr in series:
            fig.add_trace(go.Scatter(x=steps, y=[_mib(getattr(t.memory, attr)) for t in run.tokens],
                                     mode="lines", name=f"{name} {what}", legendgroup=name,
                                     line={"color": colour, "dash": _MEMORY_DASH[what]}), row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[_mib(t.kv_cache_bytes) for t in run.tokens], mode="lines",
                                 name=f"{name} KV cache", legendgroup=name, line={"color": colour}), row=2, col=1)
    fig.update_yaxes(title_text=axis, row=1, col=1)
    fig.update_yaxes(title_text="KV cache (MiB)", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return styled(fig, title, height=560 + 20 * len(runs), legend=legend_below(-0.12))


def legend_below(y: float) -> dict[str, object]:
    """A horizontal legend under the plot: beside it, the run names squeeze a phone's 380 px plot to a sliver."""
    return {"orientation": "h", "yanchor": "top", "y": y, "x": 0}


def settings_text(settings: Mapping[str, Any]) -> str:
    """Only the knobs that change anything: "T=0.7 top_k=20 top_p=0.8 rp=1.05 seed=1" when sampling,
    "greedy rp=1.1" (greedy ignores the seed), "beam×4 rp=1.05" for beam search."""
    def num(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    if not settings:
        return ""
    temperature = settings.get("temperature", 1.0)
    beams = settings.get("num_beams", 1) or 1
    sampled = False
    parts = []
    if beams > 1:
        parts.append(f"beam×{num(beams)}")
    elif not settings.get("do_sample", True) or temperature == 0:
        parts.append("greedy")
    else:
        sampled = True
        parts.append(f"T={num(temperature)}")
        if settings.get("top_k", 0):
            parts.append(f"top_k={num(settings['top_k'])}")
        if settings.get("top_p", 1.0) < 1.0:
            parts.append(f"top_p={num(settings['top_p'])}")
        if settings.get("min_p", 0.0) > 0.0:
            parts.append(f"min_p={num(settings['min_p'])}")
    if settings.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"rp={num(settings['repetition_penalty'])}")
    if sampled and settings.get("seed") is not None:  # greedy and beam search are deterministic: no seed
        parts.append(f"seed={settings['seed']}")
    return " ".join(parts)


REASON_WORDS = {"eos": "finished", "stop_token": "finished (stop token)", "max_tokens": "length limit",
                "stopped": "stopped", "time_limit": "time limit", "error": "error"}


def reason_words(reason: str | None) -> str:
    """Why a run ended, in words ("length limit", not "max_tokens"); unknown reasons pass through."""
    if reason is None:
        return "running"
    return REASON_WORDS.get(reason, str(reason))


def run_row(run: RunRecord) -> dict[str, Any]:
    """One table row. A running run has no stats yet: its counts come from the events seen so far. Beside the
    prefill rate: the prompt tokens it prefilled and those a kept cache held (a follow-up turn prefills only what is
    new, and the rate is over those)."""
    reused = run.prefill.reused_tokens if run.prefill else 0
    prompt = len(run.prefill.prompt_ids) if run.prefill else math.nan
    row: dict[str, Any] = {"run": run.run_id, "label": run.label, "model": run.model, "forward": run.forward,
                           "settings": settings_text(run.settings), "prefilled_tokens": prompt - reused,
                           "reused_tokens": reused if run.prefill else math.nan}
    if run.done is None:
        return {**row, "reason": "running", "prompt_tokens": prompt,
                "new_tokens": len(run.tokens), "ttft_s": math.nan, "prefill_tok_s": math.nan,
                "decode_tok_s": math.nan, "peak_mib": math.nan}
    stats = run.done.stats
    return {**row, "reason": reason_words(run.done.reason), "prompt_tokens": stats.prompt_tokens,
            "new_tokens": stats.new_tokens,
            "ttft_s": round(stats.ttft_seconds, 3), "prefill_tok_s": round(stats.prefill_tokens_per_s, 1),
            "decode_tok_s": round(stats.decode_tokens_per_s, 1), "peak_mib": round(stats.peak_memory_bytes / MIB, 1)}


def runs_table(runs: Sequence[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([run_row(run) for run in runs], columns=list(TABLE_COLUMNS))


# Column names for people (the table on the page and its CSV); runs_table keeps the short keys code uses.
TABLE_HEADERS = {"prompt_tokens": "prompt tokens", "new_tokens": "new tokens", "ttft_s": "first token (s)",
                 "prefilled_tokens": "prefilled tokens", "reused_tokens": "reused tokens",
                 "prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s", "peak_mib": "peak memory (MiB)"}


def runs_table_for_people(runs: Sequence[RunRecord]) -> pd.DataFrame:
    return runs_table(runs).rename(columns=TABLE_HEADERS)
