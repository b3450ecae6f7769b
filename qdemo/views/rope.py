"""Position encodings read from a loaded model: RoPE frequencies and angles, ALiBi slopes and biases."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qdemo.views._figure import styled


def _array(values: np.ndarray, ndim: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {array.shape}")
    return array


def frequency_figure(inv_freq: np.ndarray) -> go.Figure:
    """Each dimension pair rotates at its own speed: fast pairs see local order, slow pairs long range."""
    inv_freq = _array(inv_freq, 1, "inv_freq")
    if (inv_freq <= 0).any():
        raise ValueError(f"inv_freq must be positive to draw on a log axis, got min {inv_freq.min()}")
    pairs = np.arange(inv_freq.size)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("inverse frequency (radians per position)", "wavelength (positions)"))
    fig.add_trace(go.Scatter(x=pairs, y=inv_freq, mode="lines+markers", name="inv_freq"), row=1, col=1)
    fig.add_trace(go.Scatter(x=pairs, y=2 * np.pi / inv_freq, mode="lines+markers", name="wavelength"), row=2, col=1)
    fig.update_yaxes(type="log", title_text="rad / position", row=1, col=1)
    fig.update_yaxes(type="log", title_text="positions", row=2, col=1)
    fig.update_xaxes(title_text="dimension pair", row=2, col=1)
    return styled(fig, "RoPE frequencies per dimension pair", height=560)


def angle_heatmap(angles: np.ndarray) -> go.Figure:
    """angles [positions, pairs]; wrapped to [0, 2π) since only the angle on the circle matters."""
    angles = _array(angles, 2, "angles")
    wrapped = np.mod(angles, 2 * np.pi)
    fig = go.Figure(go.Heatmap(z=wrapped, x=np.arange(wrapped.shape[1]), y=np.arange(wrapped.shape[0]),
                               colorscale="Twilight", zmin=0.0, zmax=2 * np.pi,  # cyclic: 0 and 2π look alike
                               colorbar={"title": {"text": "angle (rad)"}},
                               hovertemplate="position %{y}, pair %{x}: %{z:.3f} rad<extra></extra>"))
    fig.update_yaxes(autorange="reversed")  # position 0 at the top, like reading a sequence
    return styled(fig, "RoPE rotation angle (mod 2π)", "dimension pair", "position", height=520)


def decay_figure(distances: np.ndarray, scores: np.ndarray) -> go.Figure:
    distances = _array(distances, 1, "distances")
    scores = _array(scores, 1, "scores")
    if distances.shape != scores.shape:
        raise ValueError(f"distances {distances.shape} and scores {scores.shape} must have the same shape")
    fig = go.Figure(go.Scatter(x=distances, y=scores, mode="lines", name="score"))
    return styled(fig, "RoPE long-range decay of q·k with relative distance", "relative distance (positions)",
                  "dot product")


def alibi_figure(slopes: np.ndarray, bias: np.ndarray) -> go.Figure:
    """Per-head slopes, and one head's bias [q, k]: the penalty ALiBi adds to scores, linear in distance."""
    slopes = _array(slopes, 1, "slopes")
    bias = _array(bias, 2, "bias")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], horizontal_spacing=0.12,
                        subplot_titles=("slope per head", "bias of one head"))
    fig.add_trace(go.Bar(x=np.arange(slopes.size), y=slopes, name="slope"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=bias, x=np.arange(bias.shape[1]), y=np.arange(bias.shape[0]), colorscale="Reds_r",
                             colorbar={"title": {"text": "bias"}},
                             hovertemplate="query %{y} → key %{x}: %{z:.3f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="head", row=1, col=1)
    fig.update_yaxes(title_text="slope", row=1, col=1)
    fig.update_xaxes(title_text="key position", row=1, col=2)
    fig.update_yaxes(title_text="query position", autorange="reversed", row=1, col=2)
    return styled(fig, "ALiBi slopes and bias", height=460)
