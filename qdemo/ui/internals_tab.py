"""Internals tab: layout and wiring (logic in qdemo.services.internals). Attention over the Chat tab's conversation
(one forward for every layer, then layer/head/scale changes redraw from the cache), position encoding, model card.
The model follows the Chat tab's choice."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from qdemo.services import internals
from qdemo.services.files import scratch_file
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.views.export import csv_text

NOT_LOADED = "Press **Load / refresh** to read this model's position encoding and model card."


@dataclass(frozen=True)
class InternalsParts:
    session: SessionComponents
    state: gr.State  # internals.InternalsSession: the attention cache
    model: gr.Dropdown
    refresh: gr.Button
    status: gr.Markdown
    layer: gr.Slider
    head: gr.Dropdown
    scale: gr.Radio
    hide: gr.Checkbox  # hide special tokens
    attn_run: gr.Button
    attn_caption: gr.Markdown
    attn_plot: gr.Plot
    sink_md: gr.Markdown
    sink_plot: gr.Plot
    sink_csv: gr.DownloadButton
    rope_md: gr.Markdown
    freq_plot: gr.Plot
    decay_plot: gr.Plot
    angle_plot: gr.Plot
    card: gr.Dataframe

    def model_views(self) -> list:
        """What describes the loaded model (emptied when the Chat tab picks another)."""
        return [self.rope_md, self.freq_plot, self.angle_plot, self.decay_plot, self.card]


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    parts = _layout(ui, session)
    session.model_dropdowns.append(parts.model)
    ui.on([parts.refresh.click, parts.model.input, tab.select], partial(load, parts, ui), {parts.model},
          [parts.status, *parts.model_views(), parts.layer, parts.head], notice=parts.status, runs_model=True)
    ui.on(parts.attn_run.click, partial(compute_attention, parts, ui),
          {parts.model, session.chatbot, session.chat_system, parts.layer, parts.head, parts.scale, parts.hide,
           parts.state},
          [parts.attn_caption, parts.attn_plot, parts.layer, parts.head, parts.sink_md, parts.sink_plot,
           parts.sink_csv], notice=parts.attn_caption, runs_model=True)
    view_controls = [parts.layer, parts.head, parts.scale, parts.hide]
    ui.on([c.change for c in view_controls], partial(redraw, parts), {parts.state, parts.model, *view_controls},
          [parts.attn_plot], notice=parts.attn_caption, queue=False, trigger_mode="always_last",
          show_progress="hidden")
    ui.on(session.chat_model.change, partial(follow_chat, parts, ui), {session.chat_model, parts.model, parts.state},
          [parts.model, *parts.model_views(), parts.attn_plot], notice=parts.status)


def _layout(ui: UIContext, session: SessionComponents) -> InternalsParts:
    services = ui.services
    state = gr.State(internals.InternalsSession())
    with gr.Row():
        model = gr.Dropdown(services.choices(), value=services.default_model, elem_id="internals-model", scale=3,
                            min_width=240, label="model (follows the Chat tab)")
        refresh = gr.Button("Load / refresh", elem_id="internals-refresh", scale=1, min_width=120)
    status = gr.Markdown(NOT_LOADED, elem_id="internals-status")
    with gr.Accordion("Attention", open=True):
        attention = _attention()
    with gr.Accordion("Position encoding (RoPE or ALiBi)", open=True):
        rope_md = gr.Markdown("", elem_id="rope-info")
        with gr.Row(equal_height=False):
            freq_plot = gr.Plot(label="frequencies", show_label=False, elem_id="rope-freq")
            decay_plot = gr.Plot(label="long-range decay", show_label=False, elem_id="rope-decay")
        angle_plot = gr.Plot(label="angles", show_label=False, elem_id="rope-angles")
    with gr.Accordion("Model card", open=True):
        card = gr.Dataframe(label="model card", interactive=False, elem_id="model-card")
    return InternalsParts(session=session, state=state, model=model, refresh=refresh, status=status,
                          rope_md=rope_md, freq_plot=freq_plot, decay_plot=decay_plot, angle_plot=angle_plot,
                          card=card, **attention)


def _attention() -> dict:
    with gr.Row():
        layer = gr.Slider(0, 1, value=0, step=1, label="layer", elem_id="attn-layer", min_width=160)
        head = gr.Dropdown(internals.head_choices(0), value=internals.MEAN, label="head", elem_id="attn-head",
                           min_width=160)
        scale = gr.Radio(list(internals.SCALES), value="linear", label="colour scale", elem_id="attn-scale",
                         min_width=160)
        hide = gr.Checkbox(False, label="hide special tokens (renormalise rows)", elem_id="attn-hide-special",
                           min_width=160)
        attn_run = gr.Button("Compute attention", variant="primary", elem_id="attn-run", min_width=160)
    attn_caption = gr.Markdown("Computes every layer's attention over the Chat tab's conversation (the last "
                               f"{internals.MAX_ATTENTION_TOKENS} tokens) in one forward; then the layer, head "
                               "and scale apply as you choose them.", elem_id="attn-caption")
    attn_plot = gr.Plot(label="attention", show_label=False, elem_id="attn-plot")
    with gr.Accordion("Attention sinks", open=False, elem_id="sinks"):
        sink_md = gr.Markdown("Per head: how much attention goes to the first token and to template/control "
                              "tokens (computed from the attention above).", elem_id="sink-summary")
        sink_plot = gr.Plot(label="sinks", show_label=False, elem_id="sink-plot")
        sink_csv = gr.DownloadButton("Download CSV", elem_id="sink-csv", visible=False)
    return {"layer": layer, "head": head, "scale": scale, "hide": hide, "attn_run": attn_run,
            "attn_caption": attn_caption, "attn_plot": attn_plot, "sink_md": sink_md, "sink_plot": sink_plot,
            "sink_csv": sink_csv}


# --- handlers -------------------------------------------------------------------------------------------------------

def _shape(parts: InternalsParts, layers: int, heads: int) -> dict:
    """The layer slider and head list for a model of that many layers and heads."""
    return {parts.layer: gr.Slider(minimum=0, maximum=max(layers - 1, 1), step=1, interactive=layers > 1,
                                   label=f"layer (0–{layers - 1})"),
            parts.head: gr.Dropdown(choices=internals.head_choices(heads))}


def load(parts: InternalsParts, ui: UIContext, data: dict, request: gr.Request,
         progress: gr.Progress = gr.Progress()) -> dict:
    services, name = ui.services, data[parts.model]
    facts = internals.model_facts(services, ui.client(request), name, progress_callback(progress))
    apart = " (chats on llama.cpp keep their own copy)" if services.forward_choices(name) else ""
    return {parts.status: f"**{name}** loaded: these panels read its **{facts.forward}** modules{apart}.",
            parts.rope_md: facts.position.summary, parts.freq_plot: facts.position.frequencies,
            parts.angle_plot: facts.position.angles, parts.decay_plot: facts.position.decay, parts.card: facts.card,
            **_shape(parts, facts.layers, facts.heads)}


def _draw(parts: InternalsParts, cache: internals.AttentionCache, data: dict) -> dict:
    try:
        view = internals.attention_view(cache, data[parts.layer], data[parts.head], data[parts.scale],
                                        bool(data[parts.hide]))
    except ValueError as exc:
        return {parts.attn_caption: f"⚠️ {exc}"}
    return {parts.attn_caption: view.caption, parts.attn_plot: view.figure}


def _sinks(parts: InternalsParts, cache: internals.AttentionCache) -> dict:
    try:
        view = internals.attention_sinks(cache)
    except ValueError as exc:
        return {parts.sink_md: f"⚠️ {exc}"}
    path = scratch_file("qdemo-attention-sinks.csv")
    path.write_text(csv_text(view.table), encoding="utf-8")
    return {parts.sink_md: view.summary, parts.sink_plot: view.figure,
            parts.sink_csv: gr.DownloadButton(value=str(path), visible=True)}


def compute_attention(parts: InternalsParts, ui: UIContext, data: dict, request: gr.Request,
                      progress: gr.Progress = gr.Progress()) -> dict:
    session = parts.session
    cache = internals.compute_attention(ui.services, data[parts.state], ui.client(request), data[parts.model],
                                        data[session.chatbot], data[session.chat_system], progress_callback(progress))
    layers, heads = cache.maps.shape[:2]
    return {**_shape(parts, layers, heads), **_draw(parts, cache, data), **_sinks(parts, cache)}


def redraw(parts: InternalsParts, data: dict) -> dict:
    cache = data[parts.state].attention
    if cache is None or cache.model != data[parts.model]:
        return {parts.attn_caption: gr.skip()}
    return _draw(parts, cache, data)


def follow_chat(parts: InternalsParts, ui: UIContext, data: dict) -> dict:
    name = data[parts.session.chat_model]
    if name not in ui.services.registry.models or name == data[parts.model]:
        return {parts.status: gr.skip()}
    data[parts.state].attention = None
    return {parts.model: name, parts.status: f"Model is now **{name}** (from the Chat tab). " + NOT_LOADED,
            **{view: None for view in parts.model_views()}, parts.rope_md: "", parts.attn_plot: None}
