"""What the Sweep view draws from a sweep's cells: one small heatmap per measure (an HTML grid whose cells are the
click targets that open a cell's samples), a scatter of diversity against likelihood with the cells' labels, a
progress line, and the CSV and JSON exports. No Gradio and no services here: cells arrive as SweepCell values."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import plotly.graph_objects as go

from qdemo.views._figure import styled, wrap_title
from qdemo.views.sweep_measures import CellMeasures

# measure field → (its heading, how a value prints)
MEASURES: dict[str, tuple[str, str]] = {
    "distinct_2": ("distinct-2 (variety across samples)", "{:.2f}"),
    "distinct_1": ("distinct-1", "{:.2f}"),
    "mean_logprob": ("mean log-prob per token (raw model)", "{:.2f}"),
    "mean_length": ("mean length (tokens)", "{:.1f}"),
    "ended_share": ("ended on their own", "{:.0%}"),
    "repeat_rate": ("repeated 3-grams", "{:.0%}"),
    "stage_changed_share": ("tokens a stage put on top", "{:.0%}"),
}
AXIS_LABELS = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
               "repetition_penalty": "rep. penalty"}
CELL_CLICK_JS = ("element.addEventListener('click', (e) => { const t = e.target.closest('[data-cell]'); "
                 "if (t) trigger('select', {cell: Number(t.dataset.cell)}); });")
CSS = """
.sweep-maps {display: flex; flex-wrap: wrap; gap: 10px}
.sweep-map {flex: 1 1 220px; max-width: min(100%, 380px)}
.sweep-map h4 {margin: 0 0 4px; font-size: 13px}
.sweep-map table {border-collapse: collapse; font-size: 12px; width: 100%}
.sweep-map th {font-weight: 600; padding: 2px 4px; text-align: center}
.sweep-map td {padding: 6px 4px; text-align: center; cursor: pointer; border: 1px solid rgba(128,128,128,.3);
  min-width: 38px}
.sweep-map td.picked {outline: 2px solid #e4572e; outline-offset: -2px}
.sweep-map td.empty {cursor: default; color: #888}
.sweep-samples {display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px}
.sweep-sample {border: 1px solid rgba(128,128,128,.35); border-radius: 6px; padding: 6px; min-width: 0}
.sweep-sample h5 {margin: 0 0 4px; font-size: 12px; font-weight: 600}
"""


@dataclass(frozen=True)
class SweepCell:
    """One cell as the view reads it: its settings, its samples' seeds and texts, and its measures (None until a
    sample has finished)."""

    settings: Mapping[str, float]
    seeds: Sequence[int]
    texts: Sequence[str | None]
    measures: CellMeasures | None


def cell_label(settings: Mapping[str, float]) -> str:
    return " · ".join(f"{AXIS_LABELS.get(k, k)} {_number(v)}" for k, v in settings.items())


def _number(value: float) -> str:
    return f"{value:g}"


def _check(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {str(measure)[:40]!r}")


def _value(cell: SweepCell, measure: str) -> float | None:
    if cell.measures is None:
        return None
    value = getattr(cell.measures, measure)
    return value if math.isfinite(value) else None


def _shade(value: float | None, low: float, high: float) -> str:
    """Blue, stronger for higher values within this measure's range over the grid."""
    if value is None:
        return "transparent"
    share = 0.5 if high <= low else (value - low) / (high - low)
    return f"rgba(31, 119, 180, {0.12 + 0.78 * share:.2f})"


def _grid_shape(cells: Sequence[SweepCell]) -> tuple[list[tuple[str, list[float]]], int, int]:
    """The axes as (field, values in order) and the grid's rows × columns (one axis: one row)."""
    names = list(cells[0].settings) if cells else []
    axes = [(name, list(dict.fromkeys(c.settings[name] for c in cells))) for name in names]
    if len(axes) == 1:
        return axes, 1, len(axes[0][1])
    return axes, len(axes[0][1]), len(axes[1][1]) if len(axes) > 1 else 0


def heatmap_html(cells: Sequence[SweepCell], measure: str, picked: int | None = None) -> str:
    """One measure over the grid: rows are the first axis, columns the second (one axis: one row); each cell
    carries its index (data-cell) for the click that opens its samples."""
    _check(measure)
    axes, rows, cols = _grid_shape(cells)
    values = [_value(c, measure) for c in cells]
    known = [v for v in values if v is not None]
    low, high = (min(known), max(known)) if known else (0.0, 0.0)
    title, fmt = MEASURES[measure]
    head = "".join(f"<th>{html.escape(_number(v))}</th>" for v in axes[-1][1]) if axes else ""
    corner = html.escape(" \\ ".join(AXIS_LABELS.get(n, n) for n, _ in axes)) if len(axes) > 1 else ""
    body = []
    for r in range(rows):
        row_head = f"<th>{html.escape(_number(axes[0][1][r]))}</th>" if len(axes) > 1 else "<th></th>"
        tds = []
        for c in range(cols):
            i = r * cols + c
            value = values[i]
            text = fmt.format(value) if value is not None else "…"
            classes = " ".join(k for k, on in (("picked", i == picked), ("empty", value is None)) if on)
            tip = html.escape(f"{cell_label(cells[i].settings)}: {text}")
            tds.append(f'<td class="{classes}" data-cell="{i}" title="{tip}" tabindex="0" '
                       f'style="background:{_shade(value, low, high)}">{html.escape(text)}</td>')
        body.append(f"<tr>{row_head}{''.join(tds)}</tr>")
    top = AXIS_LABELS.get(axes[-1][0], axes[-1][0]) if axes else ""
    return (f'<div class="sweep-map" data-measure="{measure}"><h4>{html.escape(title)}</h4><table>'
            f'<tr><th>{corner}</th><th colspan="{cols}">{html.escape(top)}</th></tr><tr><th></th>{head}</tr>'
            f"{''.join(body)}</table></div>")


def heatmaps_html(cells: Sequence[SweepCell], picked: int | None = None) -> str:
    """Every measure's heatmap, small multiples that wrap on a narrow screen."""
    if not cells:
        return ""
    return f'<div class="sweep-maps">{"".join(heatmap_html(cells, m, picked) for m in MEASURES)}</div>'


def scatter_figure(cells: Sequence[SweepCell]) -> go.Figure | None:
    """Diversity (distinct-2) against likelihood (mean raw log-prob per token), one labelled point per cell: the
    settings that buy variety at the least cost in likelihood sit top right."""
    done = [c for c in cells if c.measures is not None and math.isfinite(c.measures.mean_logprob)]
    if not done:
        return None
    xs, ys = [c.measures.mean_logprob for c in done], [c.measures.distinct_2 for c in done]
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers+text", text=[cell_label(c.settings) for c in done],
        textposition=_label_sides(xs), cliponaxis=False, marker={"size": 10},
        hovertemplate="%{text}<br>log-prob %{x:.2f}<br>distinct-2 %{y:.2f}<extra></extra>"))
    fig = styled(fig, wrap_title("Variety against likelihood, one point per cell"),
                 "mean log-prob per token (more likely →)", "distinct-2 (more varied ↑)", height=380)
    fig.update_xaxes(range=_padded(xs, 0.08))
    fig.update_yaxes(range=_padded(ys, 0.15))
    return fig


def _label_sides(xs: Sequence[float]) -> list[str]:
    """A label grows away from the nearer side of the plot, so the outermost cells' labels are not cut off."""
    low, high = min(xs), max(xs)
    middle = (low + high) / 2
    return ["top center" if high - low < 1e-9 else ("top right" if x < middle else "top left") for x in xs]


def _padded(values: Sequence[float], share: float) -> list[float]:
    low, high = min(values), max(values)
    pad = (high - low) * share or 0.1
    return [low - pad, high + pad]


def progress_line(cells_done: int, cells: int, rows_done: int, rows: int, finished: bool, stopped: bool = False
                  ) -> str:
    state = "stopped" if stopped else ("done" if finished else "running")
    return f"Sweep {state}: cells {cells_done}/{cells} · samples {rows_done}/{rows}"


def export_rows(cells: Sequence[SweepCell]) -> list[dict]:
    """One row per sample: its cell's settings, its seed and text, and its cell's measures."""
    rows = []
    for i, cell in enumerate(cells):
        measures = asdict(cell.measures) if cell.measures is not None else {}
        for seed, text in zip(cell.seeds, cell.texts):
            rows.append({"cell": i, **cell.settings, "seed": seed, "text": text, **measures})
    return rows


def export_csv(cells: Sequence[SweepCell]) -> str:
    rows = export_rows(cells)
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def export_body(cells: Sequence[SweepCell], meta: Mapping[str, object]) -> dict:
    """The whole sweep: what it ran (model, context, grid, seed) and per cell its settings, seeds, texts and
    measures."""
    return {**meta, "cells": [{"settings": dict(c.settings), "seeds": list(c.seeds), "texts": list(c.texts),
                               "measures": asdict(c.measures) if c.measures is not None else None} for c in cells]}


def export_json(cells: Sequence[SweepCell], meta: Mapping[str, object]) -> str:
    """export_body as JSON; Chinese text stays readable (ensure_ascii off)."""
    return json.dumps(export_body(cells, meta), ensure_ascii=False, indent=1)
