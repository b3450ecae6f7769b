"""Compare tab: layout and wiring (logic in qdemo.services.compare). Panes A | B with their own model and decoding,
one prompt and one seed for both, streaming together; and the blind arena beside them (qdemo.ui.arena_tab)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import gradio as gr

from qdemo.core.runs import RunRecord
from qdemo.services import chat, compare, history, perf, settings
from qdemo.ui import arena_tab, forward_picker
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.controls import SamplingControls, build_controls
from qdemo.views import answer as answer_views
from qdemo.views.compare import empty_side_by_side, side_by_side_frame, tps_pair_figure

EXAMPLES = ["Write a haiku about the sea.", "用三句话解释什么是注意力机制。"]
PANE_FIELDS = ("mode", "num_beams", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")


@dataclass(frozen=True)
class Pane:
    """One side: its model, decoding and answer."""

    model: gr.Dropdown
    forward: gr.Radio
    info: gr.Markdown
    summary: gr.Markdown  # its decoding in words
    controls: SamplingControls
    output: gr.Markdown
    metrics: gr.Markdown


@dataclass(frozen=True)
class CompareParts:
    session: SessionComponents
    state: gr.State  # compare.CompareSession
    prompt: gr.Textbox
    seed: gr.Textbox
    run: gr.Button
    stop: gr.Button
    a: Pane
    b: Pane
    verdict: gr.Markdown  # the status while they run, the divergence after; refusals show here too
    table: gr.Dataframe
    chart: gr.Plot


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    with gr.Tabs():
        with gr.Tab("Side by side", id="compare-side-by-side"):
            parts = _layout(ui, session)
        with gr.Tab("Arena", id="compare-arena") as arena:
            arena_tab.build(ui, arena)
    for pane in (parts.a, parts.b):
        _wire_pane(ui, parts, pane, tab)
    session.model_dropdowns.extend([parts.a.model, parts.b.model])
    inputs = {parts.prompt, parts.seed, parts.state, session.runs, session.owner,
              *(c for pane in (parts.a, parts.b) for c in (pane.model, pane.forward, *pane.controls.components()))}
    outputs = [parts.a.output, parts.b.output, parts.a.metrics, parts.b.metrics, parts.verdict, parts.table,
               parts.chart, session.runs, session.saved_runs]
    ui.on([parts.run.click, parts.prompt.submit], partial(run_both, parts, ui), inputs, outputs,
          notice=parts.verdict, runs_model=True)
    ui.on(parts.stop.click, partial(stop, parts), {parts.state}, None, notice=parts.verdict, queue=False)


def _wire_pane(ui: UIContext, parts: CompareParts, pane: Pane, tab: gr.Tab) -> None:
    on = partial(ui.on, notice=parts.verdict)
    controls = pane.controls.components()
    on([*(c.change for c in controls), tab.select], partial(describe, pane), controls, pane.summary, queue=False,
       show_progress="hidden")
    on(pane.model.input, partial(change_model, pane, ui), {pane.model}, [*controls, pane.info, pane.forward])
    on(pane.forward.input, partial(change_forward, pane, ui), {pane.model, pane.forward}, [pane.info], queue=False)
    pane.controls.wire_visibility(ui, parts.verdict)


def _layout(ui: UIContext, session: SessionComponents) -> CompareParts:
    state = gr.State(compare.CompareSession())
    with gr.Row():
        prompt = gr.Textbox(label="prompt (both sides)", lines=2, scale=4, min_width=240, elem_id="compare-prompt")
        seed = gr.Textbox(label="seed, both sides", placeholder="empty: a fresh seed each run", max_lines=1,
                          scale=1, min_width=140, elem_id="compare-seed")
    with gr.Row():
        run = gr.Button("Run both", variant="primary", elem_id="compare-run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    gr.Examples(EXAMPLES, inputs=prompt, label="examples", api_visibility="private")
    with gr.Row(equal_height=False):
        a, b = _pane(ui, "A", "greedy"), _pane(ui, "B", "sample")
    verdict = gr.Markdown("", elem_id="compare-verdict")
    with gr.Row(equal_height=False):  # side by side on a laptop, stacked on a phone
        table = gr.Dataframe(empty_side_by_side(), label="side by side", interactive=False, elem_id="compare-table",
                             min_width=340)
        chart = gr.Plot(label="decode speed", show_label=False, elem_id="compare-chart", min_width=340)
    return CompareParts(session=session, state=state, prompt=prompt, seed=seed, run=run, stop=stop_btn, a=a, b=b,
                        verdict=verdict, table=table, chart=chart)


def _pane(ui: UIContext, side: str, mode: str) -> Pane:
    services = ui.services
    key = side.lower()
    with gr.Column(min_width=300):
        gr.Markdown(f"### {side}")
        model = gr.Dropdown(services.choices(), value=services.default_model, label=f"model {side}",
                            elem_id=f"compare-model-{key}")
        forward = forward_picker.build(services, services.default_model, f"compare-forward-{key}")
        info = gr.Markdown(services.model_info(services.default_model))
        summary = gr.Markdown("", elem_id=f"compare-decoding-{key}")
        with gr.Accordion(f"sampling {side}", open=False):
            controls = build_controls(services.registry.get(services.default_model), prefix=f"compare-{key}-",
                                      decoding=mode, fields=PANE_FIELDS)
        output = gr.Markdown("", elem_id=f"compare-out-{key}", height=320, line_breaks=True)
        metrics = gr.Markdown(answer_views.metrics_line(None), elem_id=f"compare-metrics-{key}")
    return Pane(model=model, forward=forward, info=info, summary=summary, controls=controls, output=output,
                metrics=metrics)


# --- handlers -------------------------------------------------------------------------------------------------------

def describe(pane: Pane, data: dict) -> dict:
    try:
        return {pane.summary: f"decoding: **{settings.summary(settings.to_params(pane.controls.values(data)))}**"}
    except ValueError as exc:
        return {pane.summary: f"⚠️ {exc}"}


def change_model(pane: Pane, ui: UIContext, data: dict) -> dict:
    services = ui.services
    values = settings.defaults(services.registry.get(data[pane.model]))
    values.pop("mode")  # each pane keeps its decoding mode: the comparison is the point
    return {**pane.controls.update(values), pane.info: services.model_info(data[pane.model]),
            pane.forward: forward_picker.reset(services, data[pane.model])}


def change_forward(pane: Pane, ui: UIContext, data: dict) -> dict:
    return {pane.info: ui.services.model_info(data[pane.model], data[pane.forward])}


def run_both(parts: CompareParts, ui: UIContext, data: dict, request: gr.Request,
             progress: gr.Progress = gr.Progress()) -> Iterator[dict]:
    a, b, session = parts.a, parts.b, parts.session
    try:
        params_a = settings.to_params(a.controls.values(data))
        params_b = settings.to_params(b.controls.values(data))
        seed = settings.seed_value(data[parts.seed], "seed")
    except ValueError as exc:
        yield {parts.verdict: f"⚠️ Sampling settings: {exc}"}
        return
    runs = list(data[session.runs] or [])
    yield {parts.verdict: "Loading and queueing…", parts.table: empty_side_by_side(), parts.chart: None}
    for update in compare.compare(ui.services, data[parts.state], ui.client(request), data[parts.prompt],
                                  forward_picker.model_ref(data[a.model], data[a.forward]),
                                  forward_picker.model_ref(data[b.model], data[b.forward]), params_a, params_b, seed,
                                  perf.next_run_id(runs), progress_callback(progress),
                                  owner=history.page_owner(data[session.owner])):
        out = {a.output: _pane_text(update.a), b.output: _pane_text(update.b),
               a.metrics: answer_views.metrics_line(update.a), b.metrics: answer_views.metrics_line(update.b),
               parts.verdict: update.status}
        if update.done:
            runs = runs + [update.a, update.b]
            out.update({parts.table: side_by_side_frame(update.a, update.b),
                        parts.chart: tps_pair_figure([update.a, update.b]), session.runs: runs,
                        session.saved_runs: perf.saved(runs)})
        yield out


def stop(parts: CompareParts, data: dict) -> None:
    data[parts.state].stop.set()


def _pane_text(run: RunRecord) -> str:
    if run.prefill is None and run.progress is not None:
        return f"*{answer_views.metrics_line(run)}*"
    return chat.answer_text(run) + answer_views.end_note(run)
