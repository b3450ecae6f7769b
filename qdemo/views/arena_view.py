"""The arena's leaderboard as people read it: a table of ratings with their 95 % intervals, and the win-rate matrix as
a heatmap (row beat column this share of their battles)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qdemo.views._figure import empty_figure, styled, wrap_title
from qdemo.views.labels import percent
from qdemo.views.ratings import Rating

COLUMNS = ["rank", "contender", "rating", "95% interval", "votes"]
TITLE = "Win rate: row against column"
LABEL_WIDTH = 14  # characters per line of a contender's name on the axes
# Below this many votes a bootstrap over them has next to no spread (one vote resampled is always that vote), so
# its interval would read as certainty: "1264 – 1264" after a single battle.
INTERVAL_VOTES = 5


def leaderboard_frame(ratings: Sequence[Rating]) -> pd.DataFrame:
    """One row per contender, best first (`ratings` is in that order)."""
    rows = [[i + 1, r.name, round(r.rating), _interval(r), r.votes] for i, r in enumerate(ratings)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _interval(r: Rating) -> str:
    if r.votes < INTERVAL_VOTES:
        return f"after {INTERVAL_VOTES} votes"
    return f"{round(r.low)} – {round(r.high)}"


def empty_leaderboard() -> pd.DataFrame:
    """The table before any vote: its columns, and one row saying so."""
    return pd.DataFrame([["–", "no votes yet", "–", "–", 0]], columns=COLUMNS)


def win_rate_figure(names: Sequence[str], rates: np.ndarray) -> go.Figure:
    """rates[i, j]: the share of i's battles against j that i won (ties half); blank where they never met."""
    if not len(names):
        return empty_figure(TITLE, "no votes yet", "against", "contender")
    z = np.where(np.isnan(rates), None, rates).tolist()  # plotly leaves None cells blank
    text = [[percent(x, 0) if x == x else "" for x in row] for row in rates]
    labels = [wrap_title(name, LABEL_WIDTH) for name in names]  # long names would squeeze the cells on a phone
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, text=text, texttemplate="%{text}",
                               zmin=0.0, zmax=1.0, colorscale="RdBu", hoverongaps=False,
                               hovertemplate="%{y} beat %{x}: %{text} of their battles<extra></extra>",
                               colorbar={"title": "won", "tickformat": ".0%"}))
    fig.update_yaxes(autorange="reversed")  # the first contender on top, as in the table
    return styled(fig, wrap_title(TITLE), "against", "contender", margin={"l": 10, "r": 10})
