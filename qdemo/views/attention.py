"""Attention weights of one layer (heads already averaged by the caller) as a query × key heatmap."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from qdemo.views._figure import styled
from qdemo.views.labels import token_label


def attention_heatmap(weights: np.ndarray, labels: Sequence[str], title: str) -> go.Figure:
    """weights [q, k] with one label per key. When q < k the queries are the last q tokens (e.g. only the
    generated ones). Axes are positions with the labels as tick text, because a sequence often repeats a
    token and equal category names would merge rows."""
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2:
        raise ValueError(f"attention weights must be 2-D [query, key], got shape {weights.shape}")
    q, k = weights.shape
    if len(labels) != k or q > k:
        raise ValueError(f"attention weights of shape {weights.shape} need one label per key ({k}) and at most "
                         f"as many queries as keys; got {len(labels)} labels")
    shown = [token_label(label) for label in labels]
    query_shown = shown[k - q:]
    hover = [[f"{query_shown[i]} → {shown[j]}" for j in range(k)] for i in range(q)]
    top = float(np.nanmax(weights)) if weights.size and np.isfinite(weights).any() else 0.0
    fig = go.Figure(go.Heatmap(z=weights, x=list(range(k)), y=list(range(k - q, k)), text=hover,
                               hovertemplate="%{text}: %{z:.4f}<extra></extra>", colorscale="Blues",
                               zmin=0.0, zmax=top if top > 0 else 1.0, colorbar={"title": {"text": "weight"}}))
    fig.update_xaxes(tickmode="array", tickvals=list(range(k)), ticktext=shown, tickangle=-60)
    # Reversed so the first query sits at the top, reading down like the text.
    fig.update_yaxes(tickmode="array", tickvals=list(range(k - q, k)), ticktext=query_shown, autorange="reversed")
    height = min(max(420, 18 * q + 200), 1400)  # room for each query label, within a screen
    return styled(fig, title, "key (attended to)", "query (attending)", height=height)
