"""Figures and HTML for the Inspect views (pure: arrays and lists in, plotly / HTML out; no torch)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from qdemo.views._figure import empty_figure, styled
from qdemo.views.labels import html_text as _e
from qdemo.views.labels import plot_text, token_label

# --- logit lens -------------------------------------------------------------------------------------------

LENS_CSS = """
.lensgrid {overflow-x: auto; max-width: 100%}
.lensgrid table {border-collapse: collapse; font-size: 11px; font-family: ui-monospace, monospace}
.lensgrid td, .lensgrid th {border: 1px solid #e5e7eb; padding: 1px 3px; white-space: nowrap; max-width: 7em;
  overflow: hidden; text-overflow: ellipsis}
.lensgrid td.cell {cursor: pointer}
.lensgrid td.cell:hover {outline: 2px solid #d62728}
.lensgrid td.commit {box-shadow: inset 0 -3px 0 #d62728}
.lensgrid th.row {text-align: right; position: sticky; left: 0; background: #fff}
"""


def _blue(p: float) -> tuple[str, str]:
    p = 0.0 if not math.isfinite(p) else max(0.0, min(1.0, p))
    return f"rgba(31,119,180,{0.08 + 0.82 * p:.3f})", ("#fff" if p > 0.55 else "#111")


def lens_grid_html(rows: Sequence[str], columns: Sequence[str], top1: np.ndarray, top1_prob: np.ndarray,
                   target_prob: np.ndarray, texts: Mapping[int, str], commitment: Sequence[str]) -> str:
    """The lens as a table: the model's output at the top, the embeddings at the bottom, one column per answer
    token. Each cell shows its top-1 token, coloured by that token's probability; the cell where the token that
    followed first becomes top-1 is underlined in red. Cells carry data-r / data-c for a click to read."""
    if not len(rows) or not len(columns):
        return '<div class="lensgrid"><p>Nothing to show.</p></div>'
    head = "".join(f'<th title="{_e(c)}">{_e(token_label(c))}</th>' for c in columns)
    body = []
    for r in range(len(rows) - 1, -1, -1):
        cells = []
        for c in range(len(columns)):
            top, p, tp = int(top1[r, c]), float(top1_prob[r, c]), float(target_prob[r, c])
            bg, fg = _blue(p)
            label = token_label(texts.get(top, str(top)))
            cls = "cell commit" if commitment[c] == rows[r] else "cell"
            tip = f"{rows[r]} → {token_label(columns[c])}: top-1 {label} {p:.3f}"
            if math.isfinite(tp):
                tip += f"; the token that followed {tp:.3f}"
            cells.append(f'<td class="{cls}" data-r="{r}" data-c="{c}" title="{_e(tip)}" '
                         f'style="background:{bg};color:{fg}">{_e(label)}</td>')
        body.append(f'<tr><th class="row">{_e(rows[r])}</th>{"".join(cells)}</tr>')
    return (f'<div class="lensgrid"><table><thead><tr><th class="row">layer \\ next token</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# --- attribution ------------------------------------------------------------------------------------------

def _diverging(value: float | None, scale: float) -> str:
    if value is None or not math.isfinite(value) or scale <= 0:
        return "transparent"
    a = min(1.0, abs(value) / scale)
    return f"rgba(214,39,40,{a * 0.85:.3f})" if value > 0 else f"rgba(31,119,180,{a * 0.85:.3f})"


def attribution_html(pieces: Sequence[str], scores: Sequence[float | None], target: str, method: str) -> str:
    """The context as text, each token shaded by its score: red pushed the chosen token up, blue down."""
    finite = [abs(s) for s in scores if s is not None and math.isfinite(s)]
    scale = max(finite) if finite else 0.0
    spans = []
    for i, (piece, score) in enumerate(zip(pieces, scores)):
        tip = "n/a" if score is None else f"{score:+.4f}"
        spans.append(f'<span class="attr" data-i="{i}" title="{i}: {_e(token_label(piece))} · {tip}" '
                     f'style="background:{_diverging(score, scale)}">{_e(piece) or "∅"}</span>')
    head = (f'<p class="attr-head">What drove <b>{_e(token_label(target))}</b> ({_e(method)}): '
            '<span style="background:rgba(214,39,40,.6)">red</span> made it likelier, '
            '<span style="background:rgba(31,119,180,.6)">blue</span> less likely.</p>')
    return f'<div class="attrview">{head}<div class="attr-text">{"".join(spans)}</div></div>'


def per_turn_figure(labels: Sequence[str], scores: Sequence[float | None], method: str) -> go.Figure:
    title = f"Per turn ({method})"
    if not labels:
        return empty_figure(title, "no turns", "score", "turn")
    values = [0.0 if s is None else s for s in scores]
    colours = ["#d62728" if v > 0 else "#1f77b4" for v in values]
    fig = go.Figure(go.Bar(x=values, y=list(labels), orientation="h", marker_color=colours,
                           hovertemplate="%{y}: %{x:+.4f}<extra></extra>"))
    x_title = "Δ log p when left out" if method == "occlusion" else "Σ gradient × input"
    return styled(fig, title, x_title, None, height=max(240, 34 * len(labels) + 120),
                  yaxis={"autorange": "reversed"})


# --- scoring and divergence -------------------------------------------------------------------------------

def _prob_colour(p: float) -> str:
    return f"rgba(44,160,44,{0.1 + 0.75 * max(0.0, min(1.0, p)):.3f})"


PART_OF_NEXT = "first bytes of a character the next token completes"


def _piece_label(piece: str) -> str:
    """A token's share of the text, for a tooltip: a token holding only the first bytes of a character has none."""
    return token_label(piece) if piece else PART_OF_NEXT


def score_html(pieces: Sequence[str], probs: Sequence[float], ranks: Sequence[int],
               surprisal: Sequence[float]) -> str:
    """The scored text, one span per token coloured by its probability (no stages: a teacher-forced text).
    `pieces` are each token's share of the text (qdemo.probes.attribution.token_pieces): a character split across
    tokens shows once, at the token that completes it, as in the attribution view."""
    spans = []
    for i, (piece, p, r, s) in enumerate(zip(pieces, probs, ranks, surprisal)):
        spans.append(f'<span class="sc" data-i="{i}" title="{_e(_piece_label(piece))} · p {p:.3f} · rank {r} · '
                     f'{s:.2f} bits" style="background:{_prob_colour(p)}">{_e(piece) or "∅"}</span>')
    return f'<div class="scoreview">{"".join(spans)}</div>'


def divergence_html(pieces: Sequence[str], kl: Sequence[float], agree: Sequence[bool]) -> str:
    """The compared text, each token shaded by KL(A‖B) there (darker: the models differ more); a red outline
    where their top-1 differs."""
    top = max((k for k in kl if math.isfinite(k)), default=0.0) or 1.0
    spans = []
    for i, (piece, k, same) in enumerate(zip(pieces, kl, agree)):
        a = 0.05 + 0.8 * max(0.0, min(1.0, k / top)) if math.isfinite(k) else 0.0
        outline = "" if same else ";outline:2px solid #d62728"
        spans.append(f'<span class="sc" data-i="{i}" title="{_e(_piece_label(piece))} · KL(A‖B) {k:.4f} · '
                     f'{"same top-1" if same else "top-1 differs"}" style="background:rgba(148,103,189,{a:.3f})'
                     f'{outline}">{_e(piece) or "∅"}</span>')
    return f'<div class="scoreview">{"".join(spans)}</div>'


def surprisal_figure(labels: Sequence[str], surprisal: Sequence[float], title: str = "Surprisal per token"
                     ) -> go.Figure:
    if not labels:
        return empty_figure(title, "nothing scored", "token", "bits")
    x = [f"{i}: {plot_text(token_label(t))}" for i, t in enumerate(labels)]
    fig = go.Figure(go.Bar(x=x, y=list(surprisal), marker_color="#2ca02c",
                           hovertemplate="%{x}: %{y:.2f} bits<extra></extra>"))
    return styled(fig, title, "token", "surprisal (bits)")


def divergence_figure(labels: Sequence[str], kl_ab: Sequence[float], kl_ba: Sequence[float],
                      agree: Sequence[bool], name_a: str, name_b: str) -> go.Figure:
    title = f"KL per token: {name_a} vs {name_b}"
    if not labels:
        return empty_figure(title, "nothing compared", "token", "KL (nats)")
    x = [f"{i}: {plot_text(token_label(t))}" for i, t in enumerate(labels)]
    fig = go.Figure([
        go.Bar(x=x, y=list(kl_ab), name="KL(A‖B)", marker_color=["#1f77b4" if a else "#d62728" for a in agree],
               hovertemplate="%{x}: KL(A‖B) %{y:.4f}<extra></extra>"),
        go.Scatter(x=x, y=list(kl_ba), name="KL(B‖A)", mode="markers", marker={"color": "#ff7f0e", "size": 6}),
    ])
    return styled(fig, title + " (red bars: top-1 differs)", "token", "KL (nats)",
                  legend={"orientation": "h", "y": 1.02, "x": 0})
