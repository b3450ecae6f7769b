"""Figure chrome every view shares, so all tabs look alike and an empty input never raises."""

from __future__ import annotations

import unicodedata

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


def _width(text: str) -> int:
    """Display width: wide (CJK) characters count two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def wrap_title(title: str, width: int = 44) -> str:
    """`title` broken with <br> into lines about `width` Latin characters wide (CJK counts double), on spaces
    where it can and anywhere inside a run without spaces (Chinese), so a narrow column does not cut it off.
    Existing <br> are kept."""
    lines: list[str] = []
    for paragraph in title.split("<br>"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _width(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # a word wider than a line is cut where it must be
                if _width(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return "<br>".join(lines)
