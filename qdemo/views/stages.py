"""How each stage of the sampling chain reshapes the next-token distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.events import StageTopN
from qdemo.views._figure import empty_figure, styled
from qdemo.views.labels import id_labels

# Mirrors qdemo.sampling.STAGE_ORDER; copied because importing qdemo.sampling pulls in transformers.
STAGE_ORDER = ("raw", "repetition_penalty", "temperature", "top_k", "top_p", "min_p")
KEPT_COLOUR = "#4C78A8"
CHOSEN_COLOUR = "#F58518"
REMOVED_COLOUR = "#BBBBBB"


def ordered_stages(stages: Sequence[StageTopN]) -> list[StageTopN]:
    """Chain order; unknown stage names keep their given order after the known ones."""
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(stages, key=lambda s: rank.get(s.name, len(STAGE_ORDER)))


def union_ids(stages: Sequence[StageTopN], chosen: int | None = None) -> list[int]:
    """Ids with p > 0 at some stage, by first appearance in chain order, so a token keeps one x position in
    every row. Zero-probability ids are left out: after a filter, top-N pads with arbitrary p=0 ids."""
    seen: dict[int, None] = {}
    for stage in ordered_stages(stages):
        for token_id, p in zip(stage.token_ids, stage.probs):
            if p > 0:
                seen.setdefault(token_id, None)
    if chosen is not None:
        seen.setdefault(chosen, None)
    return list(seen)


@dataclass(frozen=True)
class _Cell:
    """One token at one stage: its probability (None when unknown) and, if cut, the stage that cut it."""

    p: float | None
    removed_by: str | None = None
    p_before: float = 0.0


def _stage_prob(stage: StageTopN, token_id: int, chosen: int | None) -> float | None:
    listed = dict(zip(stage.token_ids, stage.probs))
    if token_id in listed:
        return listed[token_id]
    if token_id == chosen:
        return stage.chosen_prob
    # Top-N is sorted, so a listed zero means every token with p > 0 is listed: an absent one is 0 too.
    # Without a listed zero an absent token was merely outranked, and its p is unknown.
    return 0.0 if any(p == 0 for p in stage.probs) else None


def _cells(stages: Sequence[StageTopN], ids: Sequence[int], chosen: int | None) -> list[list[_Cell]]:
    """cells[row][column]. Once a filter sets p to 0 the token stays removed (masked logits stay -inf)."""
    rows: list[list[_Cell]] = [[] for _ in stages]
    for token_id in ids:
        removed_by, last_positive = None, 0.0
        for row, stage in zip(rows, stages):
            p = _stage_prob(stage, token_id, chosen)
            if removed_by is None and p == 0 and last_positive > 0:
                removed_by = stage.name
            if removed_by is not None:
                row.append(_Cell(p=0.0, removed_by=removed_by, p_before=last_positive))
                continue
            if p is not None and p > 0:
                last_positive = p
            row.append(_Cell(p=p))
    return rows


def stage_figure(stages: Sequence[StageTopN], labels: Mapping[int, str], chosen: int | None = None,
                 title: str = "Next-token probabilities through the sampling chain") -> go.Figure:
    """One row per stage, bars over the union of top-N tokens. Removed tokens show as grey hatched ghosts at
    the height they had before the cut; the chosen token is orange in every row."""
    if not stages:
        return empty_figure(title, "no stages recorded", "token", "probability")
    stages = ordered_stages(stages)
    ids = union_ids(stages, chosen)
    names = id_labels(ids, labels)
    fig = make_subplots(rows=len(stages), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[s.name for s in stages])
    legend_shown: set[str] = set()
    for r, (stage, cells) in enumerate(zip(stages, _cells(stages, ids, chosen)), start=1):
        kinds: dict[str, tuple[list[str], list[float], list[str]]] = {"kept": ([], [], []), "chosen": ([], [], []),
                                                                      "removed": ([], [], [])}
        for token_id, name, cell in zip(ids, names, cells):
            if cell.removed_by is not None:
                kind, y = "removed", cell.p_before
                hover = f"{name}<br>removed by {cell.removed_by}<br>p before: {cell.p_before:.4f}"
            elif cell.p is None:
                continue
            else:
                kind, y = ("chosen" if token_id == chosen else "kept"), cell.p
                hover = f"{name}<br>p = {cell.p:.4f}" + ("<br>chosen" if kind == "chosen" else "")
            xs, ys, hovers = kinds[kind]
            xs.append(name)
            ys.append(y)
            hovers.append(f"{hover}<br>id {token_id}")
        for kind, (xs, ys, hovers) in kinds.items():
            if not xs:
                continue
            fig.add_trace(_bar(kind, stage.name, xs, ys, hovers, show_legend=kind not in legend_shown), row=r, col=1)
            legend_shown.add(kind)
        fig.update_yaxes(title_text="p", range=[0, 1], row=r, col=1)
    # Explicit categories: keeps the union order in every row, and stops labels like "1" becoming numbers.
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names)
    fig.update_xaxes(title_text="token", row=len(stages), col=1)
    return styled(fig, title, barmode="overlay", height=140 * len(stages) + 140)


def _bar(kind: str, stage: str, xs: list[str], ys: list[float], hovers: list[str], show_legend: bool) -> go.Bar:
    marker: dict[str, object] = {"color": {"kept": KEPT_COLOUR, "chosen": CHOSEN_COLOUR,
                                           "removed": REMOVED_COLOUR}[kind]}
    if kind == "removed":
        marker["pattern"] = {"shape": "/", "fgcolor": "#777777"}
        marker["opacity"] = 0.6
    return go.Bar(x=xs, y=ys, name=kind, legendgroup=kind, showlegend=show_legend, marker=marker,
                  hovertext=hovers, hoverinfo="text", meta={"stage": stage, "kind": kind})


def stage_table(stages: Sequence[StageTopN], labels: Mapping[int, str]) -> pd.DataFrame:
    """Rows = tokens (union order, index = token id), a "token" column, then one column per stage in chain
    order holding that stage's probability; NaN where the token was not in that stage's top-N."""
    stages = ordered_stages(stages)
    ids = union_ids(stages)
    frame = pd.DataFrame({"token": id_labels(ids, labels)}, index=pd.Index(ids, name="token_id"))
    for stage in stages:
        listed = dict(zip(stage.token_ids, stage.probs))
        frame[stage.name] = [float(listed.get(i, math.nan)) for i in ids]
    return frame
