"""Internals tab: wiring only (logic in qdemo.services.internals). Attention over the Chat tab's conversation
(one forward for every layer, then layer/head/scale changes redraw from the cache), position encoding, model
card. The model follows the Chat tab's choice."""

from __future__ import annotations

import gradio as gr

from qdemo.services import internals
from qdemo.services.files import scratch_file
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.export import csv_text

NOT_LOADED = "Press **Load / refresh** to read this model's position encoding and model card."


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    services = ui.services
    state = gr.State(internals.InternalsSession())
    with gr.Row():
        model = gr.Dropdown(services.choices(), value=services.default_model, elem_id="internals-model", scale=3,
                            min_width=240, label="model (follows the Chat tab)")
        session.model_dropdowns.append(model)
        refresh = gr.Button("Load / refresh", elem_id="internals-refresh", scale=1, min_width=120)
    status = gr.Markdown(NOT_LOADED, elem_id="internals-status")
    with gr.Accordion("Attention", open=True):
        with gr.Row():
            layer = gr.Slider(0, 1, value=0, step=1, label="layer", elem_id="attn-layer", min_width=160)
            head = gr.Dropdown(internals.head_choices(0), value=internals.MEAN, label="head", elem_id="attn-head",
                               min_width=160)
            scale = gr.Radio(list(internals.SCALES), value="linear", label="colour scale", elem_id="attn-scale",
                             min_width=160)
            hide = gr.Checkbox(False, label="hide special tokens (renormalise rows)", elem_id="attn-hide-special",
                               min_width=160)
            attn_btn = gr.Button("Compute attention", variant="primary", elem_id="attn-run", min_width=160)
        attn_caption = gr.Markdown("Computes every layer's attention over the Chat tab's conversation (the last "
                                   f"{internals.MAX_ATTENTION_TOKENS} tokens) in one forward; then the layer, head "
                                   "and scale apply as you choose them.", elem_id="attn-caption")
        attn_plot = gr.Plot(label="attention", show_label=False, elem_id="attn-plot")
        with gr.Accordion("Attention sinks", open=False, elem_id="sinks"):
            sink_md = gr.Markdown("Per head: how much attention goes to the first token and to template/control "
                                  "tokens (computed from the attention above).", elem_id="sink-summary")
            sink_plot = gr.Plot(label="sinks", show_label=False, elem_id="sink-plot")
            sink_csv = gr.DownloadButton("Download CSV", elem_id="sink-csv", visible=False)
    with gr.Accordion("Position encoding (RoPE or ALiBi)", open=True):
        rope_md = gr.Markdown("", elem_id="rope-info")
        with gr.Row(equal_height=False):
            freq_plot = gr.Plot(label="frequencies", show_label=False, elem_id="rope-freq")
            decay_plot = gr.Plot(label="long-range decay", show_label=False, elem_id="rope-decay")
        angle_plot = gr.Plot(label="angles", show_label=False, elem_id="rope-angles")
    with gr.Accordion("Model card", open=True):
        card = gr.Dataframe(label="model card", interactive=False, elem_id="model-card")

    def shape(layers: int, heads: int) -> dict:
        return {layer: gr.Slider(minimum=0, maximum=max(layers - 1, 1), step=1, interactive=layers > 1,
                                 label=f"layer (0–{layers - 1})"),
                head: gr.Dropdown(choices=internals.head_choices(heads))}

    def load(data, request: gr.Request, progress=gr.Progress()):
        facts = internals.model_facts(services, ui.client(request), data[model], progress_callback(progress))
        apart = " (chats on llama.cpp keep their own copy)" if services.forward_choices(data[model]) else ""
        return {status: f"**{data[model]}** loaded: these panels read its **{facts.forward}** modules{apart}.",
                rope_md: facts.position.summary,
                freq_plot: facts.position.frequencies, angle_plot: facts.position.angles,
                decay_plot: facts.position.decay, card: facts.card, **shape(facts.layers, facts.heads)}

    load_outputs = [status, rope_md, freq_plot, angle_plot, decay_plot, card, layer, head]
    load = on_gpu(load)
    for trigger in (refresh.click, model.input, tab.select):
        ui.on(trigger, load, {model}, load_outputs, notice=status, runs_model=True)

    def draw(cache, data) -> dict:
        try:
            view = internals.attention_view(cache, data[layer], data[head], data[scale], bool(data[hide]))
        except ValueError as exc:
            return {attn_caption: f"⚠️ {exc}"}
        return {attn_caption: view.caption, attn_plot: view.figure}

    def sinks(cache) -> dict:
        try:
            view = internals.attention_sinks(cache)
        except ValueError as exc:
            return {sink_md: f"⚠️ {exc}"}
        path = scratch_file("qdemo-attention-sinks.csv")
        path.write_text(csv_text(view.table), encoding="utf-8")
        return {sink_md: view.summary, sink_plot: view.figure, sink_csv: gr.DownloadButton(value=str(path),
                                                                                          visible=True)}

    def compute_attention(data, request: gr.Request, progress=gr.Progress()):
        cache = internals.compute_attention(services, data[state], ui.client(request), data[model],
                                            data[session.chatbot], data[session.chat_system],
                                            progress_callback(progress))
        layers, heads = cache.maps.shape[:2]
        return {**shape(layers, heads), **draw(cache, data), **sinks(cache)}

    compute_attention = on_gpu(compute_attention)
    ui.on(attn_btn.click, compute_attention,
          {model, session.chatbot, session.chat_system, layer, head, scale, hide, state},
          [attn_caption, attn_plot, layer, head, sink_md, sink_plot, sink_csv], notice=attn_caption, runs_model=True)

    def redraw(data):
        cache = data[state].attention
        if cache is None or cache.model != data[model]:
            return {attn_caption: gr.skip()}
        return draw(cache, data)

    for control in (layer, head, scale, hide):
        ui.on(control.change, redraw, {state, model, layer, head, scale, hide}, [attn_plot], notice=attn_caption,
              queue=False, trigger_mode="always_last", show_progress="hidden")

    def follow(data):
        name = data[session.chat_model]
        if name not in services.registry.models or name == data[model]:
            return {status: gr.skip()}
        data[state].attention = None
        return {model: name, status: f"Model is now **{name}** (from the Chat tab). " + NOT_LOADED, rope_md: "",
                freq_plot: None, angle_plot: None, decay_plot: None, card: None, attn_plot: None}

    ui.on(session.chat_model.change, follow, {session.chat_model, model, state},
          [model, rope_md, freq_plot, angle_plot, decay_plot, card, attn_plot], notice=status)
