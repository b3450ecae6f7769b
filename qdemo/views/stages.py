"""How each stage of the sampling chain reshapes the next-token distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.core.events import StageTopN
from qdemo.views._figure import empty_figure, styled, wrap_title
from qdemo.views.labels import id_labels, percent, plot_text, stage_words

# The chain order of qdemo.sampling.build_stages (views import no torch or transformers, so it is written out here).
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


NO_CHANGE = "no change"
SAME_WITHIN = 1e-6
TOKEN_ROW_PX = 30
GREEDY_NOTE = "greedy: the sampling stages are skipped; the token is the argmax after the repetition penalty"
BEAM_NOTE = "beam search: the sampling stages do not apply; each token shows its beam transition probability"
# Value at which a stage of the chain does nothing, and how its note says so.
_NEUTRAL: dict[str, tuple[float, str]] = {"repetition_penalty": (1.0, "no change (off)"),
                                          "temperature": (1.0, "no change (off)"),
                                          "top_k": (0, "off"), "top_p": (1.0, "off"), "min_p": (0.0, "off")}


def setting_text(value: object) -> str:
    """A setting as written in titles: 1.0 → "1.0", 0.05 → "0.05", 20 → "20"."""
    if isinstance(value, float):
        return f"{value:.1f}" if value.is_integer() else f"{value:g}"
    return str(value)


def stage_title(name: str, settings: Mapping[str, object] | None = None) -> str:
    """A stage in words, with its setting when known: "top-p 0.8", "raw (model)", "beam transition"."""
    words = stage_words(name)
    if settings and name in _NEUTRAL and settings.get(name) is not None:
        return f"{words} {setting_text(settings[name])}"
    return words


def column_title(name: str, settings: Mapping[str, object] | None = None) -> str:
    """`stage_title` broken over lines for a narrow column: "repetition<br>penalty<br>1.05"."""
    return stage_title(name, settings).replace(" ", "<br>")


def _distribution(stage: StageTopN) -> dict[int, float]:
    return {i: p for i, p in zip(stage.token_ids, stage.probs) if p > 0}


def same_distribution(a: StageTopN, b: StageTopN, tolerance: float = SAME_WITHIN) -> bool:
    """The two stages' top-N (ids with p > 0) are the same tokens with probabilities within `tolerance`, and
    so is the chosen token's probability (when both are known)."""
    da, db = _distribution(a), _distribution(b)
    if da.keys() != db.keys() or any(abs(da[i] - db[i]) > tolerance for i in da):
        return False
    ca, cb = a.chosen_prob, b.chosen_prob
    return not (math.isfinite(ca) and math.isfinite(cb) and abs(ca - cb) > tolerance)


def _is_greedy(settings: Mapping[str, object]) -> bool:
    return not settings.get("do_sample", True) or settings.get("temperature", 1.0) == 0


def stage_notes(stages: Sequence[StageTopN], settings: Mapping[str, object] | None = None) -> list[str]:
    """One sentence per stage of the chain that did nothing for this token: stages the settings switch off
    ("top-k 0: off", "temperature 1.0: no change (off)") and recorded stages whose top-N equals the previous
    stage's ("repetition penalty 1.05: no change for this token's top-N"). Greedy and beam runs say why the
    sampling stages are missing."""
    settings = settings or {}
    chain = ordered_stages(stages)
    if any(stage.name == "beam" for stage in chain) or int(settings.get("num_beams", 1) or 1) > 1:
        return [BEAM_NOTE]
    greedy = bool(settings) and _is_greedy(settings)
    recorded = {stage.name: i for i, stage in enumerate(chain)}
    notes = []
    for name in STAGE_ORDER[1:]:
        if greedy and name != "repetition_penalty":
            continue
        if name in recorded:
            i = recorded[name]
            if i > 0 and same_distribution(chain[i - 1], chain[i]):
                notes.append(f"{stage_title(name, settings)}: {NO_CHANGE} for this token's top-N")
            continue
        if name in settings and settings[name] is not None:
            neutral, words = _NEUTRAL[name]
            if settings[name] == neutral:
                notes.append(f"{stage_title(name, settings)}: {words}")
    if greedy:
        notes.append(GREEDY_NOTE)
    return notes


def _shown_ids(stages: Sequence[StageTopN], chosen: int | None, max_tokens: int) -> list[int]:
    """The union order (high-probability tokens first), cut to `max_tokens`, always keeping the chosen one."""
    ids = union_ids(stages, chosen)
    limit = max(1, int(max_tokens))
    if len(ids) <= limit:
        return ids
    shown = ids[:limit]
    if chosen is not None and chosen not in shown:
        shown = shown[:limit - 1] + [chosen]
    return shown


def _column_bars(stage: StageTopN, shown: Sequence[tuple[int, str, _Cell]], chosen: int | None
                 ) -> dict[str, tuple[list[str], list[float], list[str], list[str]]]:
    """One stage's bars by kind (kept, chosen, removed ghost): y labels, x values, bar texts and hovers."""
    kinds: dict[str, tuple[list[str], list[float], list[str], list[str]]] = {
        "kept": ([], [], [], []), "chosen": ([], [], [], []), "removed": ([], [], [], [])}
    for token_id, name, cell in shown:
        if cell.removed_by is not None:
            kind, x = "removed", cell.p_before
            text = ""  # the legend and the hover say "removed"; a ghost carries no number
            hover = f"{name}<br>removed by {stage_words(cell.removed_by)}<br>p before: {cell.p_before:.4f}"
        elif cell.p is None:
            continue
        else:
            kind, x = ("chosen" if token_id == chosen else "kept"), cell.p
            text = percent(cell.p, places=0)
            hover = f"{name}<br>p = {cell.p:.4f}" + ("<br>chosen" if kind == "chosen" else "")
        ys, xs, texts, hovers = kinds[kind]
        ys.append(name)
        xs.append(x)
        texts.append(text)
        hovers.append(f"{hover}<br>{stage_words(stage.name)} · id {token_id}")
    return kinds


def stage_figure(stages: Sequence[StageTopN], labels: Mapping[int, str], chosen: int | None = None,
                 title: str = "Next-token probabilities through the sampling chain", *,
                 settings: Mapping[str, object] | None = None, max_tokens: int = 12) -> go.Figure:
    """One column per stage in chain order, side by side, sharing one y axis of tokens (horizontal bars, so
    every label reads horizontally) and one x range [0, 1]. Each bar carries its probability ("48%"); the
    chosen token is orange in every column; removed tokens show as grey hatched ghosts at the height they had
    before the cut. A column whose top-N equals the previous column's says "no change" in its title."""
    if not stages:
        return empty_figure(title, "no stages recorded", "probability", "token")
    stages = ordered_stages(stages)
    all_ids = union_ids(stages, chosen)
    ids = _shown_ids(stages, chosen, max_tokens)
    names = [plot_text(name) for name in id_labels(ids, labels)]
    wrapped_title = wrap_title(title)
    titles = [column_title(stage.name, settings) + (f"<br><i>{NO_CHANGE}</i>" if i and same_distribution(
        stages[i - 1], stage) else "") for i, stage in enumerate(stages)]
    fig = make_subplots(rows=1, cols=len(stages), shared_yaxes=True, horizontal_spacing=0.025,
                        subplot_titles=titles)
    legend_shown: set[str] = set()
    # _cells over every id keeps the removal logic exact; only the shown ids are drawn.
    position = {token_id: k for k, token_id in enumerate(all_ids)}
    for c, (stage, cells) in enumerate(zip(stages, _cells(stages, all_ids, chosen)), start=1):
        shown = [(token_id, name, cells[position[token_id]]) for token_id, name in zip(ids, names)]
        for kind, (ys, xs, texts, hovers) in _column_bars(stage, shown, chosen).items():
            if ys:
                fig.add_trace(_bar(kind, stage.name, ys, xs, texts, hovers, show_legend=kind not in legend_shown),
                              row=1, col=c)
                legend_shown.add(kind)
    # One comparable scale: every column 0..1, gridlines at 0, ½ and 1, one tick label so neighbours never
    # collide in a narrow column.
    fig.update_xaxes(range=[0, 1], tickvals=[0, 0.5, 1], ticktext=["", "50%", ""], fixedrange=True)
    # Explicit categories: keeps the union order in every column, top to bottom, and stops labels like "1"
    # becoming numbers.
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=names, autorange="reversed",
                     automargin=True, fixedrange=True)
    fig.update_annotations(font_size=10.5)
    top, bottom = 64 + 14 * max(t.count("<br>") + 1 for t in titles) + 18 * wrapped_title.count("<br>"), 56
    height = TOKEN_ROW_PX * len(ids) + top + bottom
    return styled(fig, wrapped_title, barmode="overlay", height=height, bargap=0.25,
                  margin={"l": 8, "r": 12, "t": top, "b": bottom},
                  title_font_size=15, title_yref="container", title_y=1, title_yanchor="top", title_pad_t=10,
                  legend={"orientation": "h", "yanchor": "top", "x": 0, "xanchor": "left",
                          "y": -26 / (height - top - bottom)})


def _bar(kind: str, stage: str, ys: list[str], xs: list[float], texts: list[str], hovers: list[str],
         show_legend: bool) -> go.Bar:
    marker: dict[str, object] = {"color": {"kept": KEPT_COLOUR, "chosen": CHOSEN_COLOUR,
                                           "removed": REMOVED_COLOUR}[kind]}
    if kind == "removed":
        marker["pattern"] = {"shape": "/", "fgcolor": "#777777"}
        marker["opacity"] = 0.6
    return go.Bar(y=ys, x=xs, orientation="h", name=kind, legendgroup=kind, showlegend=show_legend,
                  marker=marker, text=texts, textposition=["inside" if x >= 0.5 else "outside" for x in xs],
                  insidetextanchor="end", cliponaxis=False,
                  textfont={"size": 11}, hovertext=hovers, hoverinfo="text", meta={"stage": stage, "kind": kind})


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
