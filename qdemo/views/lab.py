"""Sampling lab: how often each token came out over many draws, next to how often it should have."""

from __future__ import annotations

from typing import Mapping

import plotly.graph_objects as go

from qdemo.views._figure import empty_figure, styled
from qdemo.views.labels import id_labels, plot_text

OTHER = "other"
SHOWN_EPSILON = 1e-9  # an "other" bar with less than this in it (samples and expected p) is left out


def share_text(fraction: float) -> str:
    """A bar's label, short enough for a narrow bar: "40%" from 10% up, "4.5%" below."""
    return f"{fraction:.0%}" if fraction >= 0.0995 else f"{fraction:.1%}"


def _ranked(counts: Mapping[int, int], expected: Mapping[int, float] | None) -> list[int]:
    """Every id, highest expected probability first when given (then count), else highest count first;
    ties by id, so reruns draw the same order."""
    ids = set(counts) | {i for i, p in (expected or {}).items() if p > 0}
    if expected is not None:
        return sorted(ids, key=lambda i: (-expected.get(i, 0.0), -counts.get(i, 0), i))
    return sorted(ids, key=lambda i: (-counts.get(i, 0), i))


def histogram_figure(counts: Mapping[int, int], labels: Mapping[int, str], title: str = "Sampled tokens", *,
                     expected: Mapping[int, float] | None = None, top_n: int = 20,
                     normalise: bool | None = None) -> go.Figure:
    """Bars over the top-`top_n` tokens (by expected probability when `expected` is given, else by count) and
    one "other" bar for everything else (left out when nothing is in it), each bar labelled with its share of
    the samples. With `expected` {id: p of the distribution drawn from}, a marker trace "expected p" puts the
    probability the draw should approach on every bar ("other" gets 1 − the shown expected).

    `normalise` (default: True when `expected` is given) draws the share count / total; False draws raw
    counts (the old figure: with `expected` None and few tokens it is exactly the former bar chart)."""
    normalise = expected is not None if normalise is None else normalise
    y_title = "share of samples" if normalise else "count"
    if not counts:
        return empty_figure(title, "no samples yet", "token", y_title)
    total = sum(counts.values())
    ranked = _ranked(counts, expected)
    limit = max(1, int(top_n))
    shown, rest = ranked[:limit], ranked[limit:]
    names = [plot_text(name) for name in id_labels(shown, labels)]
    if OTHER in names:  # a token that decodes to "other" must not merge with the "other" bar
        names = [f"{name} #{i}" if name == OTHER else name for name, i in zip(names, shown)]
    values = [counts.get(i, 0) for i in shown]
    ids: list[object] = list(shown)
    expect = [expected.get(i) for i in shown] if expected is not None else None
    other_count = sum(counts.get(i, 0) for i in rest)
    other_expected = max(0.0, 1.0 - sum(p for p in expect if p)) if expect is not None else 0.0
    if other_count > 0 or other_expected > SHOWN_EPSILON:
        names.append(OTHER)
        values.append(other_count)
        ids.append(f"{len(rest)} more")
        if expect is not None:
            expect.append(other_expected)
    fractions = [count / total if total else 0.0 for count in values]
    ys = fractions if normalise else values
    unit = "share" if normalise else "count"
    fig = go.Figure(go.Bar(
        x=names, y=ys, name="sampled", text=[share_text(f) for f in fractions], textposition="outside",
        cliponaxis=False, customdata=[[f, i, c] for f, i, c in zip(fractions, ids, values)],
        hovertemplate="%{x} (id %{customdata[1]})<br>%{customdata[2]} of " + str(total)
                      + " = %{customdata[0]:.1%}<extra></extra>", meta={"unit": unit}))
    if expect is not None:
        scale = 1.0 if normalise else float(total)
        fig.add_trace(go.Scatter(
            x=names, y=[None if p is None else p * scale for p in expect], mode="markers", name="expected p",
            marker={"symbol": "line-ew-open", "size": 22, "line": {"width": 3, "color": "#F58518"},
                    "color": "#F58518"},
            customdata=[None if p is None else p for p in expect],
            hovertemplate="%{x}: expected p %{customdata:.1%}<extra></extra>"))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names)
    if normalise:
        fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return styled(fig, title, "token", y_title, legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
                  uniformtext={"minsize": 9, "mode": "show"})
