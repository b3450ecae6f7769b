"""Figure chrome every view shares, so all tabs look alike and an empty input never raises."""

from __future__ import annotations

import plotly.graph_objects as go

TEMPLATE = "plotly_white"
MIB = 1024 * 1024


def styled(fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None,
           **layout: object) -> go.Figure:
    """Template and title on every figure; axis titles only where given (subplots set their own)."""
    fig.update_layout(template=TEMPLATE, title=title, **layout)
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def empty_figure(title: str, message: str, x_title: str, y_title: str) -> go.Figure:
    """A figure with a centred note instead of data: the UI can show it before anything has run."""
    fig = styled(go.Figure(), title, x_title, y_title)
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 16, "color": "#888888"})
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig
