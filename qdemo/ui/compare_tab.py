"""Compare tab: wiring only (logic in qdemo.services.compare). Panes A | B with their own model and decoding,
one prompt and one seed for both, streaming together."""

from __future__ import annotations

import gradio as gr

from qdemo.services import chat, compare, perf, settings
from qdemo.ui import forward_picker
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.controls import build_controls
from qdemo.ui.zerogpu import on_gpu
from qdemo.views import answer as answer_views
from qdemo.views.compare import (
    empty_side_by_side,
    side_by_side_frame,
    tps_overlay_figure,
)

EXAMPLES = ["Write a haiku about the sea.", "用三句话解释什么是注意力机制。"]
PANE_FIELDS = ("mode", "num_beams", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    services = ui.services
    spec = services.registry.get(services.default_model)
    state = gr.State(compare.CompareSession())
    with gr.Row():
        prompt = gr.Textbox(label="prompt (both sides)", lines=2, scale=4, min_width=240, elem_id="compare-prompt")
        seed = gr.Textbox(label="seed, both sides", placeholder="empty: a fresh seed each run", max_lines=1,
                          scale=1, min_width=140, elem_id="compare-seed")
    with gr.Row():
        run_btn = gr.Button("Run both", variant="primary", elem_id="compare-run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    gr.Examples(EXAMPLES, inputs=prompt, label="examples", api_visibility="private")
    panes = []
    forwards = []
    with gr.Row(equal_height=False):
        for side, mode in (("A", "greedy"), ("B", "sample")):
            with gr.Column(min_width=300):
                gr.Markdown(f"### {side}")
                model = gr.Dropdown(services.choices(), value=services.default_model, label=f"model {side}",
                                    elem_id=f"compare-model-{side.lower()}")
                forward = forward_picker.build(services, services.default_model, f"compare-forward-{side.lower()}")
                info = gr.Markdown(services.model_info(services.default_model))
                summary = gr.Markdown("", elem_id=f"compare-decoding-{side.lower()}")
                with gr.Accordion(f"sampling {side}", open=False):
                    controls = build_controls(spec, prefix=f"compare-{side.lower()}-", decoding=mode,
                                              fields=PANE_FIELDS)
                output = gr.Markdown("", elem_id=f"compare-out-{side.lower()}", height=320, line_breaks=True)
                metrics = gr.Markdown(answer_views.metrics_line(None), elem_id=f"compare-metrics-{side.lower()}")
                panes.append((model, info, summary, controls, output, metrics))
                forwards.append(forward)
                session.model_dropdowns.append(model)
    verdict = gr.Markdown("", elem_id="compare-verdict")
    with gr.Row(equal_height=False):
        table = gr.Dataframe(empty_side_by_side(), label="side by side", interactive=False, elem_id="compare-table")
        chart = gr.Plot(label="decode speed", show_label=False, elem_id="compare-chart")

    (model_a, info_a, summary_a, controls_a, out_a, metrics_a), \
        (model_b, info_b, summary_b, controls_b, out_b, metrics_b) = panes

    for (model, info, summary, controls, _, _), forward in zip(panes, forwards):
        def describe(data, controls=controls, summary=summary):
            try:
                return {summary: f"decoding: **{settings.summary(settings.to_params(controls.values(data)))}**"}
            except ValueError as exc:
                return {summary: f"⚠️ {exc}"}

        def on_model(data, model=model, info=info, controls=controls, forward=forward):
            values = settings.defaults(services.registry.get(data[model]))
            values.pop("mode")  # each pane keeps its decoding mode: the comparison is the point
            return {**controls.update(values), info: services.model_info(data[model]),
                    forward: forward_picker.reset(services, data[model])}

        def on_forward(data, model=model, info=info, forward=forward):
            return {info: services.model_info(data[model], data[forward])}

        for trigger in [c.change for c in controls.components()] + [tab.select]:
            ui.on(trigger, describe, controls.components(), summary, notice=verdict, queue=False,
                  show_progress="hidden")
        ui.on(model.input, on_model, {model}, [*controls.components(), info, forward], notice=verdict)
        ui.on(forward.input, on_forward, {model, forward}, [info], notice=verdict, queue=False)
        controls.wire_visibility(ui, verdict)

    forward_a, forward_b = forwards
    inputs = {prompt, seed, model_a, model_b, forward_a, forward_b, state, session.runs, *controls_a.components(), *controls_b.components()}
    outputs = [out_a, out_b, metrics_a, metrics_b, verdict, table, chart, session.runs, session.saved_runs]

    def run_both(data, request: gr.Request, progress=gr.Progress()):
        try:
            params_a = settings.to_params(controls_a.values(data))
            params_b = settings.to_params(controls_b.values(data))
            seed_value = None if not str(data[seed] or "").strip() else settings.whole_number(data[seed], "seed")
        except ValueError as exc:
            yield {verdict: f"⚠️ Sampling settings: {exc}"}
            return
        runs = list(data[session.runs] or [])
        yield {verdict: "Loading and queueing…", table: empty_side_by_side(), chart: None}
        for update in compare.compare(services, data[state], ui.client(request), data[prompt],
                                      forward_picker.model_ref(data[model_a], data[forward_a]),
                                      forward_picker.model_ref(data[model_b], data[forward_b]), params_a, params_b, seed_value, perf.next_run_id(runs),
                                      progress_callback(progress)):
            out = {out_a: _pane_text(update.a), out_b: _pane_text(update.b),
                   metrics_a: answer_views.metrics_line(update.a), metrics_b: answer_views.metrics_line(update.b),
                   verdict: update.status}
            if update.done:
                runs = runs + [update.a, update.b]
                out.update({table: side_by_side_frame(update.a, update.b),
                            chart: tps_overlay_figure([update.a, update.b]), session.runs: runs,
                            session.saved_runs: perf.saved(runs)})
            yield out

    run_both = on_gpu(run_both)
    for trigger in (run_btn.click, prompt.submit):
        ui.on(trigger, run_both, inputs, outputs, notice=verdict, runs_model=True)

    def stop(data):
        data[state].stop.set()

    ui.on(stop_btn.click, stop, {state}, None, notice=verdict, queue=False)


def _pane_text(run) -> str:
    text = chat.answer_text(run) + answer_views.end_note(run)
    if run.prefill is None and run.progress is not None:
        return f"*{answer_views.metrics_line(run)}*"
    return text
