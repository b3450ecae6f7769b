"""Internals: attention maps over the current conversation, the model's position encoding (RoPE or ALiBi) and
its model card. No Gradio here.

Attention is computed once per conversation for every layer (one gated forward over at most the last 128
tokens) and kept in the session, so changing the layer, the head, the grid or the colour scale redraws from that
cache without touching the model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qdemo.errors import Interrupted
from qdemo.models.prompting import with_system
from qdemo.models.sources import ProgressFn
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.services.chat import history_messages
from qdemo.services.probing import view_clock
from qdemo.serving.protocol import Backend
from qdemo.views.attention import attention_grid, attention_heatmap, sink_figure
from qdemo.views.card import card_frame
from qdemo.views.rope import alibi_figure, angle_heatmap, decay_figure, frequency_figure

MAX_ATTENTION_TOKENS = 128
ROPE_POSITIONS = 128
ROPE_DISTANCE = 512
ALIBI_POSITIONS = 32
MEAN = "mean"
ALL = "all"
SCALES = ("linear", "log")
DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog; the dog does not mind. "
                "敏捷的棕色狐狸跳过了懒狗，懒狗并不在意。")


@dataclass(frozen=True)
class AttentionCache:
    """Every layer's attention over one token sequence: what layer/head/scale changes redraw from."""

    model: str
    ids: list[int]  # the tokens the maps were computed over (at most the last 128)
    labels: list[str]  # each decoded
    maps: np.ndarray  # float16 [layers, heads, q, k]
    total_tokens: int  # before the cap
    source: str  # "the current conversation" or "an example text (the chat is empty)"
    special: tuple[bool, ...] = ()  # per token: a template/control token (<|im_start|>, <|im_end|>, …)


class InternalsSession:
    """A browser session's attention cache (fresh per session)."""

    def __init__(self) -> None:
        self.attention: AttentionCache | None = None

    def __deepcopy__(self, memo: dict) -> "InternalsSession":
        return type(self)()


@dataclass(frozen=True)
class AttentionView:
    figure: go.Figure
    caption: str
    weights: np.ndarray  # as drawn: [q, k] for one head or the mean, [heads, q, k] for the grid


@dataclass(frozen=True)
class PositionView:
    summary: str
    frequencies: go.Figure | None
    angles: go.Figure | None
    decay: go.Figure | None


def head_choices(num_heads: int) -> list[tuple[str, str]]:
    return [("mean of all heads", MEAN), ("all heads (grid)", ALL)] + [(f"head {h}", str(h)) for h in range(num_heads)]


def conversation_ids(backend: Backend, history: Sequence[Any] | None, system: str | None = None
                     ) -> tuple[list[int], str]:
    """The whole conversation (its last answer included) as the model saw it, without a generation prompt; with
    no conversation yet, a short bilingual example text."""
    messages, _ = history_messages(history, system)
    if not any(m["role"] in ("user", "assistant") for m in messages):
        return backend.raw_text_ids(DEFAULT_TEXT), "an example text (the chat is empty)"
    return backend.conversation_ids(with_system(messages, backend.spec.system_prompt)), "the current conversation"


def compute_attention(services: Services, session: InternalsSession, client: str | None, model: str,
                      history: Sequence[Any] | None, system: str | None,
                      progress: ProgressFn | None = None, *, stop: threading.Event | None = None) -> AttentionCache:
    """One gated forward for every layer's attention over the conversation's last 128 tokens, kept in the
    session. It runs under a chat answer's rule (`probing.view_clock`: the time limit and `stop`), read before
    each layer; a cut forward has nothing to show and is refused saying so."""
    with services.admit(client, ModelRequest(model, sampling=False, weights=True), progress=progress) as admitted:
        clock = view_clock(services, stop)
        backend = admitted.backend
        all_ids, source = conversation_ids(backend, history, system)
        ids = all_ids[-MAX_ATTENTION_TOKENS:]
        try:
            maps = backend.attention(ids, should_stop=clock.reason)
        except Interrupted as exc:
            raise Refused(exc.words(clock.limit_s)) from None
        except ValueError as exc:
            raise Refused(str(exc)) from None
        texts = backend.token_texts(ids)
        special_ids = backend.special_ids()
    cache = AttentionCache(model=backend.name, ids=ids, labels=[texts[i] for i in ids], maps=maps,
                           total_tokens=len(all_ids), source=source, special=tuple(i in special_ids for i in ids))
    session.attention = cache
    return cache


def conversation_sinks(services: Services, client: str | None, model: str, history: Sequence[Any] | None,
                       system: str | None, *, stop: threading.Event | None = None) -> tuple[AttentionCache, SinkView]:
    """A caller's attention sinks: the conversation's attention (as `compute_attention`, kept in no session) and
    its sinks."""
    cache = compute_attention(services, InternalsSession(), client, model or services.default_model, history, system,
                              stop=stop)
    return cache, attention_sinks(cache)


def without_special(weights: np.ndarray, special: Sequence[bool]) -> np.ndarray:
    """[..., q, k] attention with the special tokens' columns removed and each row renormalised over what is
    left (a row that attended only to special tokens stays zero): where the rest of the attention goes."""
    keep = ~np.asarray(special, dtype=bool)
    shown = weights * keep
    total = shown.sum(axis=-1, keepdims=True)
    return np.divide(shown, total, out=np.zeros_like(shown), where=total > 0)


def attention_view(cache: AttentionCache, layer: Any, head: Any = MEAN, scale: str = "linear",
                   hide_special: bool = False) -> AttentionView:
    """Redraw from the cache: one head, the head mean, or every head of the layer as a grid (no forward); with
    `hide_special`, template/control tokens are left out and each row renormalised over the rest."""
    num_layers, num_heads = cache.maps.shape[:2]
    layer_index = _index(cache, "layer", layer, num_layers)
    if scale not in SCALES:
        raise ValueError(f"colour scale must be one of {', '.join(SCALES)}, got {scale!r}")
    weights = cache.maps[layer_index].astype(np.float32)
    title = f"{cache.model} · layer {layer_index} of {num_layers}"
    if hide_special and any(cache.special):
        weights = without_special(weights, cache.special)
        title += " · special tokens hidden, rows renormalised"
    if head in (None, "", MEAN):
        shown = weights.mean(axis=0, dtype=np.float64).astype(np.float32)
        figure = attention_heatmap(shown, cache.labels, f"{title} · mean of heads", scale=scale)
    elif head == ALL:
        shown = weights
        figure = attention_grid(weights, cache.labels, f"{title} · all {num_heads} heads", scale=scale)
    else:
        h = _index(cache, "head", head, num_heads, f"a head number, '{MEAN}' or '{ALL}'")
        shown = weights[h]
        figure = attention_heatmap(shown, cache.labels, f"{title} · head {h}", scale=scale)
    caption = f"Attention over {cache.source}: {cache.total_tokens} tokens"
    if cache.total_tokens > len(cache.ids):
        caption += (f"; only the **last {MAX_ATTENTION_TOKENS}** are shown, and the map is computed over those "
                    f"{MAX_ATTENTION_TOKENS} alone (earlier tokens are left out)")
    caption += (f". Rows: the attending token; columns: the token attended to ({num_heads} heads in this layer). "
                "Changing the layer, head or scale redraws from this computation.")
    return AttentionView(figure=figure, caption=caption, weights=shown)


@dataclass(frozen=True)
class SinkView:
    table: pd.DataFrame  # layer, head, first_token, special_tokens
    figure: go.Figure
    summary: str


def attention_sinks(cache: AttentionCache) -> SinkView:
    """Per head: the attention mass on the first token and on template/control tokens (other than the first),
    averaged over the attending positions after the first (the first can only attend to itself)."""
    maps = cache.maps.astype(np.float32)  # [layers, heads, q, k]
    layers, heads, q, _ = maps.shape
    if q < 2:
        raise ValueError(f"model {cache.model}: attention sinks need at least 2 tokens, got {q}")
    rows = maps[:, :, 1:, :]
    first = rows[..., 0].mean(axis=-1)
    special = np.asarray(cache.special or (False,) * q, dtype=bool).copy()
    special[0] = False  # counted as the first token
    on_special = (rows * special).sum(axis=-1).mean(axis=-1)
    table = pd.DataFrame([{"layer": layer, "head": head, "first_token": float(first[layer, head]),
                           "special_tokens": float(on_special[layer, head])}
                          for layer in range(layers) for head in range(heads)])
    sinks = int((first > 0.5).sum())
    summary = (f"**{sinks} of {layers * heads} heads** put more than half their attention on the first token "
               f"(`{cache.labels[0]!s}`); on average {first.mean():.0%} goes to it and {on_special.mean():.0%} to "
               f"the other {int(special.sum())} template/control tokens, over {q} tokens of {cache.source}.")
    return SinkView(table=table, figure=sink_figure(first, on_special, cache.model), summary=summary)


def _index(cache: AttentionCache, what: str, value: Any, count: int, expected: str = "a whole number") -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {expected}, got {value!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"model {cache.model}: {what} {index} is out of range (0..{count - 1})")
    return index


def position_view(backend: Backend) -> PositionView:
    """RoPE facts and figures, ALiBi's for ALiBi models, or only a sentence when the model uses neither."""
    if backend.position_encoding == "alibi":
        info = backend.alibi_info(ALIBI_POSITIONS)
        summary = (f"**ALiBi** (no RoPE) · {info.slopes.size} heads · slopes {info.slopes.min():.3g} – "
                   f"{info.slopes.max():.3g} · each head adds slope × (key − query) to its scores, so attention "
                   "fades linearly with distance, steeply for the first heads and slowly for the last.")
        return PositionView(summary=summary, frequencies=alibi_figure(info.slopes, info.bias[0]), angles=None,
                            decay=None)
    try:
        info = backend.rope_info()
    except ValueError as exc:
        return PositionView(summary=f"ℹ️ {exc}", frequencies=None, angles=None, decay=None)
    scaling = ", ".join(f"{k}={v}" for k, v in info.scaling.items()) if info.scaling else "none"
    theta = f"{info.theta:g}" if info.theta is not None else "—"
    summary = (f"**RoPE** · theta (base) **{theta}** · head_dim **{info.head_dim}** · "
               f"{info.inv_freq.size} frequency pairs · rope_type **{info.rope_type}** · scaling: {scaling}"
               + (f" · attention scaling {info.attention_scaling:g}" if info.attention_scaling != 1.0 else "")
               + f" · wavelengths {info.wavelengths.min():.1f} – {info.wavelengths.max():,.0f} positions")
    if backend.position_note:
        summary += f"\n\nℹ️ {backend.position_note}"
    if backend.context_note:
        summary += f"\n\nℹ️ {backend.context_note}"
    distances, scores = backend.rope_decay(ROPE_DISTANCE)
    return PositionView(summary=summary, frequencies=frequency_figure(info.inv_freq),
                        angles=angle_heatmap(backend.rope_angles(ROPE_POSITIONS)),
                        decay=decay_figure(distances, scores))


@dataclass(frozen=True)
class ModelFacts:
    position: PositionView
    card: pd.DataFrame
    layers: int
    heads: int
    forward: str = ""  # the copy these panels read: "torch fp32", "torch bf16"


def model_facts(services: Services, client: str | None, model: str, progress: ProgressFn | None = None
                ) -> ModelFacts:
    """Load the model (through admission: a load is work) and read its position encoding and model card."""
    with services.admit(client, ModelRequest(model, sampling=False, weights=True), progress=progress) as admitted:
        backend = admitted.backend
        layers, heads = backend.shape()
        return ModelFacts(position=position_view(backend), card=card_frame(backend.model_card()), layers=layers,
                          heads=heads, forward=backend.forward_label)
