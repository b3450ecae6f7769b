"""Internals: one layer's attention over the current conversation (computed on demand), the model's RoPE
frequencies / angles / long-range decay, and a model card. The model follows the Chat tab's choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qdemo.errors import QdemoError
from qdemo.introspect import (alibi_info, attention_map, mean_over_heads, model_card, rope_angles, rope_decay,
                              rope_info)
from qdemo.loader import LoadedModel
from qdemo.prompting import conversation_prompt_ids
from qdemo.ui.chat_tab import load_or_message
from qdemo.ui.chatflow import history_messages
from qdemo.ui.context import AppContext, SessionComponents
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.attention import attention_heatmap
from qdemo.views.card import card_frame
from qdemo.views.rope import alibi_figure, angle_heatmap, decay_figure, frequency_figure

MAX_ATTENTION_TOKENS = 128
ROPE_POSITIONS = 128
ROPE_DISTANCE = 512
ALIBI_POSITIONS = 32
MEAN = "mean"
DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog; the dog does not mind. "
                "敏捷的棕色狐狸跳过了懒狗，懒狗并不在意。")
NOT_LOADED = "Press **Load / refresh** to read this model's RoPE and model card."


@dataclass(frozen=True)
class AttentionView:
    figure: go.Figure
    caption: str
    ids: list[int]  # the tokens the map was computed over (at most the last 128)
    weights: np.ndarray  # [q, k] as drawn: the head mean or one head
    total_tokens: int  # before the cap


@dataclass(frozen=True)
class RopeView:
    summary: str
    frequencies: go.Figure | None
    angles: go.Figure | None
    decay: go.Figure | None


# --- logic (no Gradio) ----------------------------------------------------------------------------------------

def model_shape(lm: LoadedModel) -> tuple[int, int]:
    """(decoder layers, attention heads) for the layer slider and head dropdown."""
    config = lm.model.config
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def head_choices(num_heads: int) -> list[tuple[str, str]]:
    return [("mean of all heads", MEAN)] + [(f"head {h}", str(h)) for h in range(num_heads)]


def conversation_ids(lm: LoadedModel, history: Sequence[dict[str, Any]] | None,
                     system: str | None = None) -> list[int]:
    """The whole conversation (its last answer included) through the chat template, without a generation
    prompt; with no conversation yet, a short bilingual example text."""
    messages = history_messages(history, system)
    if not any(m["role"] in ("user", "assistant") for m in messages):
        return list(lm.tokenizer.encode(DEFAULT_TEXT, add_special_tokens=False))
    if messages[0]["role"] != "system" and lm.spec.system_prompt:
        messages = [{"role": "system", "content": lm.spec.system_prompt}] + messages  # as the engine does
    return conversation_prompt_ids(lm.tokenizer, messages, lm.family.build_prompt)


def attention_view(lm: LoadedModel, history: Sequence[dict[str, Any]] | None, layer: Any, head: Any = MEAN,
                   system: str | None = None) -> AttentionView:
    """One layer's attention over the last 128 tokens of the conversation, head-averaged or one head."""
    all_ids = conversation_ids(lm, history, system)
    ids = all_ids[-MAX_ATTENTION_TOKENS:]
    num_layers, num_heads = model_shape(lm)
    layer_index = int(layer)
    weights = attention_map(lm, ids, layer_index)  # validates the layer: ValueError names the range
    if head in (None, "", MEAN):
        shown, what = mean_over_heads(weights), "mean of heads"
    else:
        h = int(head)
        if not 0 <= h < weights.shape[0]:
            raise ValueError(f"model {lm.spec.name}: head {h} is out of range (0..{weights.shape[0] - 1})")
        shown, what = weights[h], f"head {h}"
    labels = [lm.tokenizer.decode([i]) for i in ids]
    title = f"{lm.spec.name} · layer {layer_index} of {num_layers} · {what}"
    source = "the current conversation" if history_messages(history) else "an example text (the chat is empty)"
    caption = f"Attention over {source}: {len(all_ids)} tokens"
    if len(all_ids) > len(ids):
        caption += (f"; only the **last {MAX_ATTENTION_TOKENS}** are shown, and the map is computed over those "
                    f"{MAX_ATTENTION_TOKENS} alone (earlier tokens are left out)")
    caption += f". Rows: the attending token; columns: the token attended to ({num_heads} heads in this layer)."
    return AttentionView(figure=attention_heatmap(shown, labels, title), caption=caption, ids=ids,
                         weights=shown, total_tokens=len(all_ids))


def alibi_view(lm: LoadedModel) -> RopeView:
    """ALiBi models (Baichuan-13B): per-head slopes and the distance penalty of the first (steepest) head."""
    info = alibi_info(lm, ALIBI_POSITIONS)
    summary = (f"**ALiBi** (no RoPE) · {info.slopes.size} heads · slopes {info.slopes.min():.3g} – "
               f"{info.slopes.max():.3g} · each head adds slope × (key − query) to its scores, so attention fades "
               "linearly with distance, steeply for the first heads and slowly for the last.")
    return RopeView(summary=summary, frequencies=alibi_figure(info.slopes, info.bias[0]), angles=None, decay=None)


def rope_view(lm: LoadedModel) -> RopeView:
    """RoPE facts and figures, ALiBi's for ALiBi models, or only a sentence when the model uses neither."""
    if lm.family.position_encoding == "alibi":
        return alibi_view(lm)
    try:
        info = rope_info(lm)
    except ValueError as exc:
        return RopeView(summary=f"ℹ️ {exc}", frequencies=None, angles=None, decay=None)
    scaling = ", ".join(f"{k}={v}" for k, v in info.scaling.items()) if info.scaling else "none"
    theta = f"{info.theta:g}" if info.theta is not None else "—"
    summary = (f"**RoPE** · theta (base) **{theta}** · head_dim **{info.head_dim}** · "
               f"{info.inv_freq.size} frequency pairs · rope_type **{info.rope_type}** · scaling: {scaling}"
               + (f" · attention scaling {info.attention_scaling:g}" if info.attention_scaling != 1.0 else "")
               + f" · wavelengths {info.wavelengths.min():.1f} – {info.wavelengths.max():,.0f} positions")
    if lm.family.position_note:
        summary += f"\n\nℹ️ {lm.family.position_note}"
    distances, scores = rope_decay(lm, ROPE_DISTANCE)
    return RopeView(summary=summary, frequencies=frequency_figure(info.inv_freq),
                    angles=angle_heatmap(rope_angles(lm, ROPE_POSITIONS)), decay=decay_figure(distances, scores))


def card_view(lm: LoadedModel) -> pd.DataFrame:
    return card_frame(model_card(lm))


# --- UI -------------------------------------------------------------------------------------------------------

def build(ctx: AppContext, session: SessionComponents, tab: gr.Tab) -> None:
    with gr.Row():
        model = gr.Dropdown(ctx.choices(), value=ctx.default_model, elem_id="internals-model", scale=3,
                            label="model (follows the Chat tab)")
        refresh = gr.Button("Load / refresh", elem_id="internals-refresh", scale=1)
    status = gr.Markdown(NOT_LOADED, elem_id="internals-status")
    with gr.Accordion("Attention", open=True):
        with gr.Row():
            layer = gr.Slider(0, 1, value=0, step=1, label="layer", elem_id="attn-layer")
            head = gr.Dropdown(head_choices(0), value=MEAN, label="head", elem_id="attn-head")
            attn_btn = gr.Button("Show attention", variant="primary", elem_id="attn-run")
        attn_caption = gr.Markdown("Shows one layer's attention over the Chat tab's conversation (the last "
                                   f"{MAX_ATTENTION_TOKENS} tokens), computed when you press the button.",
                                   elem_id="attn-caption")
        attn_plot = gr.Plot(label="attention", elem_id="attn-plot")
    with gr.Accordion("Position encoding (RoPE or ALiBi)", open=True):
        rope_md = gr.Markdown("", elem_id="rope-info")
        with gr.Row():
            freq_plot = gr.Plot(label="frequencies", elem_id="rope-freq")
            decay_plot = gr.Plot(label="long-range decay", elem_id="rope-decay")
        angle_plot = gr.Plot(label="angles", elem_id="rope-angles")
    with gr.Accordion("Model card", open=True):
        card = gr.Dataframe(label="model card", interactive=False, elem_id="model-card")

    def shape_updates(lm: LoadedModel) -> list[Any]:
        num_layers, num_heads = model_shape(lm)
        return [gr.Slider(minimum=0, maximum=max(num_layers - 1, 1), step=1,
                          interactive=num_layers > 1, label=f"layer (0–{num_layers - 1})"),
                gr.Dropdown(choices=head_choices(num_heads))]

    def load(name, progress=gr.Progress()):
        lm, error = load_or_message(ctx, name, progress)
        if lm is None:
            return [error] + [gr.skip()] * 7
        try:
            rope = rope_view(lm)
            frame = card_view(lm)
        except (QdemoError, ValueError, RuntimeError) as exc:
            return [f"⚠️ {exc}"] + [gr.skip()] * 7
        return [f"**{name}** loaded.", rope.summary, rope.frequencies, rope.angles, rope.decay, frame,
                *shape_updates(lm)]

    load_outputs = [status, rope_md, freq_plot, angle_plot, decay_plot, card, layer, head]
    refresh.click(load, model, load_outputs, api_visibility="private")
    model.input(load, model, load_outputs, api_visibility="private")
    tab.select(load, model, load_outputs, api_visibility="private")

    def show_attention(name, history, layer_value, head_value, system, progress=gr.Progress()):
        lm, error = load_or_message(ctx, name, progress)
        if lm is None:
            return [error, gr.skip(), gr.skip(), gr.skip()]
        try:
            view = attention_view(lm, history, layer_value, head_value, system)
        except (QdemoError, ValueError, RuntimeError) as exc:
            return [f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip()]
        return [view.caption, view.figure, *shape_updates(lm)]

    show_attention = on_gpu(show_attention)
    attn_btn.click(show_attention, [model, session.chatbot, layer, head, session.chat_system],
                   [attn_caption, attn_plot, layer, head], api_visibility="private")

    def follow(name, current):
        if name not in ctx.registry.models or name == current:
            return [gr.skip()] * 8
        return [name, f"Model is now **{name}** (from the Chat tab). " + NOT_LOADED, "", None, None, None, None, None]

    session.chat_model.change(follow, [session.chat_model, model],
                              [model, status, rope_md, freq_plot, angle_plot, decay_plot, card, attn_plot],
                              api_visibility="private")

