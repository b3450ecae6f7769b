"""Sampling lab tab: wiring only (logic in qdemo.services.lab). Compute the next-token logits once; every slider
re-applies the sampling chain to them without the model; Sample N and Append work on the same logits."""

from __future__ import annotations

import gradio as gr

from qdemo.probes.stages import MAX_SAMPLES
from qdemo.services import lab
from qdemo.services.admission import Refused
from qdemo.services.settings import whole_number
from qdemo.ui import forward_picker
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.controls import build_controls
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.labels import token_label

EXAMPLES = [["The capital of France is", "raw text"],
            ["Once upon a time, there was a", "raw text"],
            ["床前明月光，", "raw text"],
            ["Give me one word that rhymes with 'cat'.", "chat"],
            ["用一个词形容今天的天气。", "chat"]]
HINT = "Type a context, press **Compute next-token logits**, then move the sliders."
LAB_FIELDS = ("mode", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    services = ui.services
    spec = services.registry.get(services.default_model)
    state = gr.State(lab.LabSession())
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            gr.Markdown("Compute the next-token logits **once**; the sliders then re-apply the sampling chain "
                        "(repetition penalty → temperature → top-k → top-p → min-p) to those same logits "
                        "instantly. **Append** a token to step through a generation by hand.")
            model = gr.Dropdown(services.choices(), value=services.default_model, label="model",
                                elem_id="lab-model")
            forward = forward_picker.build(services, services.default_model, "lab-forward")
            session.model_dropdowns.append(model)
            context_box = gr.Textbox(label="context · 上下文", lines=2, elem_id="lab-context",
                                     placeholder="e.g. The capital of France is · 床前明月光，")
            mode = gr.Radio(list(lab.CONTEXT_MODES), value="raw text", label="context is", elem_id="lab-mode")
            gr.Examples(EXAMPLES, inputs=[context_box, mode], label="examples", api_visibility="private")
            compute_btn = gr.Button("Compute next-token logits", variant="primary", elem_id="lab-compute")
            message = gr.Markdown(HINT, elem_id="lab-message")
            controls = build_controls(spec, prefix="lab-", modes=lab.DECODING, fields=LAB_FIELDS,
                                      temperature_label="temperature (0 = greedy)")
            top_n = gr.Slider(5, 50, value=20, step=1, label="tokens shown per stage", elem_id="lab-top-n")
        with gr.Column(scale=3, min_width=320):
            stages_plot = gr.Plot(label="stage by stage", show_label=False, elem_id="lab-stages")
            with gr.Accordion("probability per stage (table)", open=False):
                table = gr.Dataframe(label="blank: not in that stage's top-N", interactive=False,
                                     elem_id="lab-table")
            with gr.Row(equal_height=False):
                with gr.Column(min_width=260):
                    with gr.Row():
                        n = gr.Number(value=1000, minimum=1, maximum=MAX_SAMPLES, precision=0,
                                      label=f"N (1–{MAX_SAMPLES})", elem_id="lab-n", min_width=100)
                        seed = gr.Number(value=0, minimum=0, precision=0, label="seed", elem_id="lab-seed",
                                         min_width=100)
                    sample_btn = gr.Button("Sample N", elem_id="lab-sample")
                    histogram = gr.Plot(label="sampled vs expected", show_label=False, elem_id="lab-histogram")
                with gr.Column(min_width=260):
                    token = gr.Dropdown([], label="token to append (final stage)", elem_id="lab-token")
                    append_btn = gr.Button("Append", elem_id="lab-append")
                    context_view = gr.Textbox(label="context so far (as the model sees it)", lines=5,
                                              interactive=False, elem_id="lab-context-view")

    chain = controls.components()
    view_inputs = {state, top_n, *chain}
    view_outputs = [stages_plot, table, token, message]

    def render(context: lab.LabContext, data, note: str = "") -> dict:
        try:
            params = lab.lab_params(*(data[controls.by_field[f]] for f in LAB_FIELDS))
            view = lab.view(context, params, top_n=whole_number(data[top_n], "tokens shown"))
        except ValueError as exc:
            return {message: f"⚠️ Sampling settings: {exc}"}
        first = view.choices[0][1] if view.choices else None
        return {stages_plot: view.figure, table: view.table, token: gr.Dropdown(choices=view.choices, value=first),
                message: note or lab.status_line(context)}

    def compute(data, request: gr.Request, progress=gr.Progress()):
        context, note = lab.compute(services, data[state], ui.client(request),
                                    forward_picker.model_ref(data[model], data[forward]), data[context_box],
                                    data[mode], progress_callback(progress))
        return {context_view: context.text,
                **render(context, data, f"{note} {lab.status_line(context)}" if note else "")}

    def announce(data):
        """At click time, before the queue: the old histogram goes, and Sample N waits for the new logits."""
        data[state].expect_change()
        return {histogram: None, message: "Computing…"}

    compute = on_gpu(compute)
    compute_inputs = {model, forward, context_box, mode, *view_inputs}
    compute_outputs = [context_view, *view_outputs]
    for trigger in (compute_btn.click, context_box.submit):
        step = ui.on(trigger, announce, {state}, [histogram], notice=message, queue=False)
        ui.on(step.then, compute, compute_inputs, compute_outputs, notice=message, runs_model=True)

    def apply(data):
        context = data[state].context
        return render(context, data) if context is not None else {message: gr.skip()}

    for slider in (*chain, top_n):
        ui.on(slider.change, apply, view_inputs, view_outputs, notice=message, trigger_mode="always_last",
              show_progress="hidden")

    def sample(data):
        try:
            params = lab.lab_params(*(data[controls.by_field[f]] for f in LAB_FIELDS))
            _, figure = lab.sample(data[state], params, data[n], data[seed], whole_number(data[top_n], "top-N"))
        except (Refused, ValueError) as exc:
            return {message: f"⚠️ {exc}"}
        return {histogram: figure, message: lab.status_line(data[state].context)}

    ui.on(sample_btn.click, sample, {state, n, seed, top_n, *chain}, [histogram], notice=message)

    def append(data, request: gr.Request, progress=gr.Progress()):
        longer = lab.append(services, data[state], ui.client(request), data[token], progress_callback(progress))
        label = token_label(longer.decode([longer.ids[-1]])[longer.ids[-1]])
        note = f"Appended {label} (id {longer.ids[-1]}). " + lab.status_line(longer)
        return {context_view: longer.text, **render(longer, data, note)}

    append = on_gpu(append)
    step = ui.on(append_btn.click, announce, {state}, [histogram], notice=message, queue=False)
    ui.on(step.then, append, {token, *view_inputs}, compute_outputs, notice=message, runs_model=True)

    def change_model(data):
        data[state].context = None
        values = lab_defaults(services.registry.get(data[model]))
        return {**controls.update(values), forward: forward_picker.reset(services, data[model]), context_view: "",
                histogram: None, stages_plot: None, table: None, token: gr.Dropdown(choices=[], value=None),
                message: f"Model changed to **{data[model]}**: press **Compute next-token logits**."}

    ui.on(model.input, change_model, {model, state}, [*chain, forward, context_view, histogram, *view_outputs],
          notice=message)

    def change_forward(data):
        data[state].context = None
        return {context_view: "", histogram: None, stages_plot: None, table: None,
                token: gr.Dropdown(choices=[], value=None),
                message: f"{services.model_info(data[model], data[forward])} — press **Compute next-token logits**."}

    ui.on(forward.input, change_forward, {model, forward, state}, [context_view, histogram, *view_outputs],
          notice=message, queue=False)
    controls.wire_visibility(ui, message)


def lab_defaults(spec) -> dict:
    s = spec.sampling
    return {"mode": "sample" if s.do_sample else "greedy", "temperature": s.temperature, "top_k": s.top_k,
            "top_p": s.top_p, "min_p": s.min_p, "repetition_penalty": s.repetition_penalty}
