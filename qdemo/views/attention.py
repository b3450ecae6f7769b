"""Attention weights as query × key heatmaps: one layer (heads averaged, or one head) large, or every head of a
layer as small multiples. A log scale shows the small weights a linear one washes out."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.views._figure import empty_figure, styled
from qdemo.views.labels import plot_text, token_label

SCALES = ("linear", "log")
LOG_FLOOR = 1e-6  # weights below this are drawn as this on the log scale
COLOURSCALE = "Blues"


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"attention scale must be one of {', '.join(SCALES)}, got {scale!r}")


def _check_labels(shape: tuple[int, ...], q: int, k: int, labels: Sequence[str]) -> None:
    if len(labels) != k or q > k:
        raise ValueError(f"attention weights of shape {shape} need one label per key ({k}) and at most "
                         f"as many queries as keys; got {len(labels)} labels")


def _top(weights: np.ndarray) -> float:
    finite = weights[np.isfinite(weights)] if weights.size else weights
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def log_weights(weights: np.ndarray) -> np.ndarray:
    """log10 of the weights, clipped at LOG_FLOOR (an exact 0 has no logarithm)."""
    return np.log10(np.clip(np.asarray(weights, dtype=float), LOG_FLOOR, None))


def _log_ticks(top: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks at the powers of ten from LOG_FLOOR up to `top`, labelled with the real weight."""
    high = math.ceil(math.log10(top)) if top > 0 else 0
    exponents = range(int(math.log10(LOG_FLOOR)), min(high, 0) + 1)
    return [float(e) for e in exponents], [f"1e{e}" if e < -3 else f"{10.0 ** e:g}" for e in exponents]


def _colour_range(weights: np.ndarray, scale: str) -> tuple[float, float, dict[str, object]]:
    """zmin, zmax and the colour bar for `scale`; the log bar's ticks name real weights, not logarithms."""
    top = _top(weights)
    if scale == "linear":
        return 0.0, top, {"title": {"text": "weight"}}
    tickvals, ticktext = _log_ticks(top)
    return math.log10(LOG_FLOOR), math.log10(top), {"title": {"text": "weight (log)"}, "tickvals": tickvals,
                                                    "ticktext": ticktext}


def _hover(shown: Sequence[str], q: int) -> list[list[str]]:
    k = len(shown)
    query_shown = shown[k - q:]
    return [[f"{query_shown[i]} → {shown[j]}" for j in range(k)] for i in range(q)]


def attention_heatmap(weights: np.ndarray, labels: Sequence[str], title: str, *, scale: str = "linear") -> go.Figure:
    """weights [q, k] with one label per key. When q < k the queries are the last q tokens (e.g. only the
    generated ones). Axes are positions with the labels as tick text, because a sequence often repeats a
    token and equal category names would merge rows. scale "log" colours log10(weight) (clipped at 1e-6),
    with colour-bar ticks and hover in real weights."""
    _check_scale(scale)
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2:
        raise ValueError(f"attention weights must be 2-D [query, key], got shape {weights.shape}")
    q, k = weights.shape
    _check_labels(weights.shape, q, k, labels)
    shown = [plot_text(token_label(label)) for label in labels]
    query_shown = shown[k - q:]
    zmin, zmax, colorbar = _colour_range(weights, scale)
    z = weights if scale == "linear" else log_weights(weights)
    fig = go.Figure(go.Heatmap(z=z, x=list(range(k)), y=list(range(k - q, k)), text=_hover(shown, q),
                               customdata=weights, hovertemplate="%{text}: %{customdata:.4g}<extra></extra>",
                               colorscale=COLOURSCALE, zmin=zmin, zmax=zmax, colorbar=colorbar))
    fig.update_xaxes(tickmode="array", tickvals=list(range(k)), ticktext=shown, tickangle=-60)
    # Reversed so the first query sits at the top, reading down like the text.
    fig.update_yaxes(tickmode="array", tickvals=list(range(k - q, k)), ticktext=query_shown, autorange="reversed")
    height = min(max(420, 18 * q + 200), 1400)  # room for each query label, within a screen
    return styled(fig, title, "key (attended to)", "query (attending)", height=height)


def grid_columns(heads: int) -> int:
    """Columns of the small-multiple grid: about the square root of the head count."""
    return max(1, math.ceil(math.sqrt(heads)))


def attention_grid(weights: np.ndarray, labels: Sequence[str], title: str, *, scale: str = "linear") -> go.Figure:
    """Every head of one layer as small multiples: weights [heads, q, k], ≈ √heads columns, one shared
    colour range, no tick labels (the hover names query → key token and the weight), titles "head N"."""
    _check_scale(scale)
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 3:
        raise ValueError(f"attention weights must be 3-D [head, query, key], got shape {weights.shape}")
    heads, q, k = weights.shape
    if heads == 0 or q == 0 or k == 0:
        return empty_figure(title, "no attention weights", "key (attended to)", "query (attending)")
    _check_labels(weights.shape, q, k, labels)
    shown = [plot_text(token_label(label)) for label in labels]
    hover = _hover(shown, q)
    cols = grid_columns(heads)
    rows = math.ceil(heads / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(heads)],
                        horizontal_spacing=0.02, vertical_spacing=min(0.06, 0.3 / rows))
    zmin, zmax, colorbar = _colour_range(weights, scale)
    for h in range(heads):
        z = weights[h] if scale == "linear" else log_weights(weights[h])
        fig.add_trace(go.Heatmap(z=z, x=list(range(k)), y=list(range(k - q, k)), text=hover, customdata=weights[h],
                                 coloraxis="coloraxis", name=f"head {h}",
                                 hovertemplate=f"head {h}<br>" + "%{text}: %{customdata:.4g}<extra></extra>"),
                      row=h // cols + 1, col=h % cols + 1)
    fig.update_xaxes(showticklabels=False, ticks="", showgrid=False)
    fig.update_yaxes(showticklabels=False, ticks="", showgrid=False, autorange="reversed")
    fig.update_annotations(font_size=11)
    # The first column's y and the last row's x say what the axes are; the cells carry no tick labels.
    fig.update_yaxes(title_text="query", title_font_size=11, col=1)
    fig.update_xaxes(title_text="key", title_font_size=11, row=rows)
    fig.update_layout(coloraxis={"colorscale": COLOURSCALE, "cmin": zmin, "cmax": zmax,
                                 "colorbar": {**colorbar, "thickness": 12}})
    return styled(fig, title, height=max(320, 130 * rows + 110))


def sink_figure(first: np.ndarray, special: np.ndarray, model: str) -> go.Figure:
    """Two layers × heads heatmaps: attention mass on the first token, and on the other special tokens."""
    layers, heads = first.shape
    fig = make_subplots(rows=1, cols=2, subplot_titles=("on the first token", "on other template/control tokens"),
                        horizontal_spacing=0.12)
    for col, values in ((1, first), (2, special)):
        fig.add_trace(go.Heatmap(z=values, x=list(range(heads)), y=list(range(layers)), zmin=0, zmax=1,
                                 colorscale="Blues", showscale=col == 2,
                                 hovertemplate="layer %{y} · head %{x}<br>mass %{z:.1%}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
        fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=col)
    return styled(fig, f"{model} · attention sinks per head (mean over attending positions)",
                  height=max(320, 18 * layers + 140))
