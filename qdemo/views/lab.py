"""Sampling lab: how often each token came out over many draws."""

from __future__ import annotations

from typing import Mapping

import plotly.graph_objects as go

from qdemo.views._figure import empty_figure, styled
from qdemo.views.labels import id_labels


def histogram_figure(counts: Mapping[int, int], labels: Mapping[int, str],
                     title: str = "Sampled tokens") -> go.Figure:
    """Bars by count, most frequent first (ties by id, so reruns draw the same order)."""
    if not counts:
        return empty_figure(title, "no samples yet", "token", "count")
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ids = [token_id for token_id, _ in ordered]
    values = [count for _, count in ordered]
    total = sum(values)
    fractions = [count / total if total else 0.0 for count in values]
    names = id_labels(ids, labels)
    fig = go.Figure(go.Bar(x=names, y=values, customdata=[[f, i] for f, i in zip(fractions, ids)],
                           hovertemplate="%{x} (id %{customdata[1]})<br>%{y} of " + str(total)
                                         + " = %{customdata[0]:.1%}<extra></extra>", name="count"))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names)
    return styled(fig, title, "token", "count")
