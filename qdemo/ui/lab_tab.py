"""Sampling lab tab: layout and wiring (logic in qdemo.services.lab). Compute the next-token logits once; every
slider re-applies the sampling chain to them without the model; Sample N and Append work on the same logits."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from qdemo.models.registry import ModelSpec
from qdemo.probes.stages import MAX_SAMPLES
from qdemo.sampling import SamplingParams
from qdemo.services import lab
from qdemo.services.settings import whole_number
from qdemo.ui import forward_picker, sweep_panel
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.controls import SamplingControls, build_controls
from qdemo.views.labels import token_label

EXAMPLES = [["The capital of France is", "raw text"],
            ["Once upon a time, there was a", "raw text"],
            ["床前明月光，", "raw text"],
            ["Give me one word that rhymes with 'cat'.", "chat"],
            ["用一个词形容今天的天气。", "chat"]]
HINT = "Type a context, press **Compute next-token logits**, then move the sliders."
LAB_FIELDS = ("mode", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class LabParts:
    state: gr.State  # lab.LabSession: the computed logits
    model: gr.Dropdown
    forward: gr.Radio
    context_box: gr.Textbox
    mode: gr.Radio  # raw text or chat
    compute: gr.Button
    message: gr.Markdown  # the status line; refusals show here too
    controls: SamplingControls
    top_n: gr.Slider
    stages_plot: gr.Plot
    table: gr.Dataframe
    n: gr.Number
    seed: gr.Number
    sample: gr.Button
    histogram: gr.Plot
    token: gr.Dropdown  # the token Append adds
    append: gr.Button
    context_view: gr.Textbox
    sweep: sweep_panel.SweepParts

    def view_inputs(self) -> set:
        return {self.state, self.top_n, *self.controls.components()}

    def view_outputs(self) -> list:
        return [self.stages_plot, self.table, self.token, self.message]


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    parts = _layout(ui)
    session.model_dropdowns.append(parts.model)
    on = partial(ui.on, notice=parts.message)
    announce = partial(announce_compute, parts)
    computed = [parts.context_view, *parts.view_outputs()]
    step = on([parts.compute.click, parts.context_box.submit], announce, {parts.state}, [parts.histogram],
              queue=False)
    ui.after(step, partial(compute, parts, ui), {parts.model, parts.forward, parts.context_box, parts.mode,
                                                 *parts.view_inputs()}, computed, notice=parts.message,
             runs_model=True)
    on([c.change for c in (*parts.controls.components(), parts.top_n)], partial(apply, parts), parts.view_inputs(),
       parts.view_outputs(), trigger_mode="always_last", show_progress="hidden")
    on(parts.sample.click, partial(sample, parts), {parts.state, parts.n, parts.seed, *parts.view_inputs()},
       [parts.histogram])
    step = on(parts.append.click, announce, {parts.state}, [parts.histogram], queue=False)
    ui.after(step, partial(append, parts, ui), {parts.token, *parts.view_inputs()}, computed,
             notice=parts.message, runs_model=True)
    forgets = [parts.context_view, parts.histogram, *parts.view_outputs()]
    on(parts.model.input, partial(change_model, parts, ui), {parts.model, parts.state},
       [*parts.controls.components(), parts.forward, *forgets])
    on(parts.forward.input, partial(change_forward, parts, ui), {parts.model, parts.forward, parts.state}, forgets,
       queue=False)
    parts.controls.wire_visibility(ui, parts.message)
    sweep_panel.wire(ui, parts.sweep, sweep_panel.LabInputs(
        parts.model, parts.forward, parts.context_box, parts.mode, [parts.controls.by_field[f] for f in LAB_FIELDS],
        partial(_lab_params, parts), session.owner))


def _lab_params(parts: LabParts, data: dict) -> SamplingParams:
    return lab.lab_params(*(data[parts.controls.by_field[f]] for f in LAB_FIELDS))


def _layout(ui: UIContext) -> LabParts:
    services = ui.services
    state = gr.State(lab.LabSession())
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            gr.Markdown("Compute the next-token logits **once**; the sliders then re-apply the sampling chain "
                        "(repetition penalty → temperature → top-k → top-p → min-p) to those same logits "
                        "instantly. **Append** a token to step through a generation by hand.")
            model = gr.Dropdown(services.choices(), value=services.default_model, label="model", elem_id="lab-model")
            forward = forward_picker.build(services, services.default_model, "lab-forward")
            context_box = gr.Textbox(label="context · 上下文", lines=2, elem_id="lab-context",
                                     placeholder="e.g. The capital of France is · 床前明月光，")
            mode = gr.Radio(list(lab.CONTEXT_MODES), value="raw text", label="context is", elem_id="lab-mode")
            gr.Examples(EXAMPLES, inputs=[context_box, mode], label="examples", api_visibility="private")
            compute_btn = gr.Button("Compute next-token logits", variant="primary", elem_id="lab-compute")
            message = gr.Markdown(HINT, elem_id="lab-message")
            controls = build_controls(services.registry.get(services.default_model), prefix="lab-",
                                      modes=lab.DECODING, fields=LAB_FIELDS,
                                      temperature_label="temperature (0 = greedy)")
            top_n = gr.Slider(5, 50, value=20, step=1, label="tokens shown per stage", elem_id="lab-top-n")
        with gr.Column(scale=3, min_width=320):
            with gr.Tabs(elem_id="lab-views"):
                with gr.Tab("Next token", elem_id="lab-next-tab"):
                    views = _views()
                with gr.Tab("Sweep", elem_id="lab-sweep-tab"):
                    sweep = sweep_panel.layout()
    return LabParts(state=state, model=model, forward=forward, context_box=context_box, mode=mode,
                    compute=compute_btn, message=message, controls=controls, top_n=top_n, sweep=sweep, **views)


def _views() -> dict:
    stages_plot = gr.Plot(label="stage by stage", show_label=False, elem_id="lab-stages")
    with gr.Accordion("probability per stage (table)", open=False):
        table = gr.Dataframe(label="blank: not in that stage's top-N", interactive=False, elem_id="lab-table")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=260):
            with gr.Row():
                n = gr.Number(value=1000, minimum=1, maximum=MAX_SAMPLES, precision=0, label=f"N (1–{MAX_SAMPLES})",
                              elem_id="lab-n", min_width=100)
                seed = gr.Number(value=0, minimum=0, precision=0, label="seed", elem_id="lab-seed", min_width=100)
            sample_btn = gr.Button("Sample N", elem_id="lab-sample")
            histogram = gr.Plot(label="sampled vs expected", show_label=False, elem_id="lab-histogram")
        with gr.Column(min_width=260):
            token = gr.Dropdown([], label="token to append (final stage)", elem_id="lab-token")
            append_btn = gr.Button("Append", elem_id="lab-append")
            context_view = gr.Textbox(label="context so far (as the model sees it)", lines=5, interactive=False,
                                      elem_id="lab-context-view")
    return {"stages_plot": stages_plot, "table": table, "n": n, "seed": seed, "sample": sample_btn,
            "histogram": histogram, "token": token, "append": append_btn, "context_view": context_view}


# --- handlers -------------------------------------------------------------------------------------------------------

def _render(parts: LabParts, context: lab.LabContext, data: dict, note: str = "") -> dict:
    """The stages of `context`'s logits under the sliders' settings."""
    try:
        params = lab.lab_params(*(data[parts.controls.by_field[f]] for f in LAB_FIELDS))
        view = lab.view(context, params, top_n=whole_number(data[parts.top_n], "tokens shown"))
    except ValueError as exc:
        return {parts.message: f"⚠️ Sampling settings: {exc}"}
    first = view.choices[0][1] if view.choices else None
    return {parts.stages_plot: view.figure, parts.table: view.table,
            parts.token: gr.Dropdown(choices=view.choices, value=first),
            parts.message: note or lab.status_line(context)}


def announce_compute(parts: LabParts, data: dict) -> dict:
    """At click time, before the queue: the old histogram goes, and Sample N waits for the new logits."""
    data[parts.state].expect_change()
    return {parts.histogram: None, parts.message: "Computing…"}


def compute(parts: LabParts, ui: UIContext, data: dict, request: gr.Request,
            progress: gr.Progress = gr.Progress()) -> dict:
    context, note = lab.compute(ui.services, data[parts.state], ui.client(request),
                                forward_picker.model_ref(data[parts.model], data[parts.forward]),
                                data[parts.context_box], data[parts.mode], progress_callback(progress))
    return {parts.context_view: context.text,
            **_render(parts, context, data, f"{note} {lab.status_line(context)}" if note else "")}


def apply(parts: LabParts, data: dict) -> dict:
    context = data[parts.state].context
    return _render(parts, context, data) if context is not None else {parts.message: gr.skip()}


def sample(parts: LabParts, data: dict) -> dict:
    params = lab.lab_params(*(data[parts.controls.by_field[f]] for f in LAB_FIELDS))
    _, figure = lab.sample(data[parts.state], params, data[parts.n], data[parts.seed],
                           whole_number(data[parts.top_n], "top-N"))
    return {parts.histogram: figure, parts.message: lab.status_line(data[parts.state].context)}


def append(parts: LabParts, ui: UIContext, data: dict, request: gr.Request,
           progress: gr.Progress = gr.Progress()) -> dict:
    longer = lab.append(ui.services, data[parts.state], ui.client(request), data[parts.token],
                        progress_callback(progress))
    label = token_label(longer.decode([longer.ids[-1]])[longer.ids[-1]])
    note = f"Appended {label} (id {longer.ids[-1]}). " + lab.status_line(longer)
    return {parts.context_view: longer.text, **_render(parts, longer, data, note)}


def change_model(parts: LabParts, ui: UIContext, data: dict) -> dict:
    data[parts.state].context = None
    values = lab_defaults(ui.services.registry.get(data[parts.model]))
    return {**parts.controls.update(values), parts.forward: forward_picker.reset(ui.services, data[parts.model]),
            **_forgotten(parts), parts.message: f"Model changed to **{data[parts.model]}**: press **Compute "
                                                "next-token logits**."}


def change_forward(parts: LabParts, ui: UIContext, data: dict) -> dict:
    data[parts.state].context = None
    return {**_forgotten(parts), parts.message: f"{ui.services.model_info(data[parts.model], data[parts.forward])} "
                                                "— press **Compute next-token logits**."}


def _forgotten(parts: LabParts) -> dict:
    """The views of logits that no longer match the model."""
    return {parts.context_view: "", parts.histogram: None, parts.stages_plot: None, parts.table: None,
            parts.token: gr.Dropdown(choices=[], value=None)}


def lab_defaults(spec: ModelSpec) -> dict:
    s = spec.sampling
    return {"mode": "sample" if s.do_sample else "greedy", "temperature": s.temperature, "top_k": s.top_k,
            "top_p": s.top_p, "min_p": s.min_p, "repetition_penalty": s.repetition_penalty}
