"""Inspect tab: layout and wiring (handlers in inspect_handlers, logic in qdemo.services.probing). Logit lens and
prompt attribution on the Chat tab's last answer (restored after a reload), score any text, the divergence of two
models on one text, and evidence bundles (export / open); a Stop for the view that runs."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import gradio as gr

from qdemo.forwards.choice import ref
from qdemo.services import probing as service
from qdemo.services.admission import Services
from qdemo.ui import inspect_handlers as on_inspect
from qdemo.ui.context import SessionComponents, UIContext
from qdemo.ui.inspect_handlers import InspectParts, InspectState
from qdemo.views import probes as views
from qdemo.views.tokens import TOKEN_CLICK_JS, TOKEN_VIEW_CSS

CELL_CLICK_JS = ("element.addEventListener('click', (e) => { const t = e.target.closest('[data-r]'); "
                 "if (t) trigger('select', {row: Number(t.dataset.r), col: Number(t.dataset.c)}); });")
CSS = views.LENS_CSS + """
.attrview .attr-text, .scoreview {line-height: 1.9; white-space: pre-wrap; font-family: ui-monospace, monospace;
  font-size: 13px}
.attrview .attr {border-radius: 3px}
.scoreview .sc {border-radius: 3px; margin-right: 1px}
#attr-pick .tok {cursor: pointer}
"""


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    p = _layout(ui, session)
    on = partial(ui.on, queue=False)
    view = partial(_view, ui, p)
    conversation = {p.chat_state, p.chatbot, p.chat_model, p.chat_system, p.runs}
    view(p.lens_run.click, on_inspect.run_lens, {*conversation, p.sublayers, p.state},
         [p.lens_md, p.lens_grid, p.lens_csv, p.lens_json, p.state, p.attr_pick], p.lens_md)
    on(p.lens_grid.select, partial(on_inspect.show_cell, p), {p.state}, [p.lens_cell], notice=p.lens_md)
    on(tab.select, partial(on_inspect.show_pick, p, ui), conversation, [p.attr_pick, p.attr_md], notice=p.attr_md)
    on(p.attr_pick.select, partial(on_inspect.pick_token, p), None, [p.attr_token], notice=p.attr_md)
    view(p.attr_run.click, on_inspect.attribute, {*conversation, p.attr_token, p.method, p.unit, p.state},
         [p.attr_md, p.attr_html, p.attr_plot, p.attr_csv, p.attr_json, p.state], p.attr_md)
    scored = [p.score_md, p.score_html, p.score_plot, p.div_table, p.score_csv, p.score_json, p.state]
    scoring = {p.model_a, p.text, p.question, p.template, p.state, *conversation}
    view(p.score_run.click, on_inspect.score_pasted, scoring, scored, p.score_md)
    view(p.reuse.click, on_inspect.score_answer, scoring, scored, p.score_md)
    view(p.div_run.click, on_inspect.diverge, {p.model_a, p.model_b, p.text, p.question, p.template, p.state},
         scored, p.score_md)
    on(p.stop.click, partial(on_inspect.stop, p), {p.state}, [p.stop_md], notice=p.stop_md)
    # The bundle of a restored answer decodes its tokens with the model: it waits its turn like a view.
    ui.on(p.bundle_make.click, partial(on_inspect.make_bundle, p, ui), conversation, [p.bundle_file, p.bundle_md],
          notice=p.bundle_md, runs_model=True)
    on(p.bundle_open.upload, partial(on_inspect.open_bundle, p), {p.bundle_open}, [p.bundle_md, p.bundle_view],
       notice=p.bundle_md)


def _view(ui: UIContext, p: InspectParts, trigger: Any, handler: Callable, inputs: set, outputs: list,
          notice: Any) -> None:
    """A view that runs a model, in two steps as a chat answer: an instant one arms the session's stop event (so
    Stop reaches the view while it still waits in the queue), then the queued one runs it."""
    armed = ui.on(trigger, partial(on_inspect.arm, p), {p.state}, None, notice=notice, queue=False)
    ui.after(armed, partial(handler, p, ui), inputs, outputs, notice=notice, runs_model=True)


def _layout(ui: UIContext, session: SessionComponents) -> InspectParts:
    state = gr.State(InspectState())
    gr.HTML("", head=f"<style>{CSS}{TOKEN_VIEW_CSS}</style>", elem_id="inspect-css")
    gr.Markdown("Look inside the **Chat tab's last answer** (the lens and attribution use the torch weights of the "
                "model it ran on), or score any text. Every view has a CSV and JSON download; the same views are "
                "named API endpoints. A view runs under the same time limit as a chat answer; Stop ends it early, "
                "and it shows what it finished.", elem_id="inspect-intro")
    stop = _stop()
    with gr.Accordion("Logit lens", open=True, elem_id="lens"):
        lens = _lens()
    with gr.Accordion("Prompt attribution", open=False, elem_id="attribution"):
        attribution = _attribution()
    with gr.Accordion("Score any text · divergence of two models", open=False, elem_id="scoring"):
        scoring = _scoring(ui.services)
    with gr.Accordion("Evidence bundle", open=False, elem_id="bundle"):
        bundle = _bundle()
    return InspectParts(state=state, chat_state=session.chat_state, chatbot=session.chatbot,
                        chat_model=session.chat_model, chat_system=session.chat_system, runs=session.runs,
                        **stop, **lens, **attribution, **scoring, **bundle)


def _stop() -> dict:
    with gr.Row():
        stop = gr.Button("Stop", variant="stop", elem_id="inspect-stop", scale=0, min_width=100)
        stop_md = gr.Markdown("", elem_id="inspect-stop-status")
    return {"stop": stop, "stop_md": stop_md}


def _lens() -> dict:
    with gr.Row():
        sublayers = gr.Checkbox(False, label="also after each attention sublayer", elem_id="lens-sublayers")
        lens_run = gr.Button("Run the lens on the last answer", variant="primary", elem_id="lens-run")
    lens_md = gr.Markdown("Each layer's residual stream through the model's own final norm and lm_head: rows are "
                          "layers (output at the top), columns the answer's tokens; a cell shows its top-1 token "
                          "coloured by its probability. Click a cell for its top-10.", elem_id="lens-status")
    lens_grid = gr.HTML("", elem_id="lens-grid", js_on_load=CELL_CLICK_JS)
    lens_cell = gr.Dataframe(headers=["rank", "token", "prob"], interactive=False, elem_id="lens-cell",
                             label="top-10 of the clicked cell")
    with gr.Row():
        lens_csv = gr.DownloadButton("Download CSV", elem_id="lens-csv", visible=False)
        lens_json = gr.DownloadButton("Download JSON", elem_id="lens-json", visible=False)
    return {"sublayers": sublayers, "lens_run": lens_run, "lens_md": lens_md, "lens_grid": lens_grid,
            "lens_cell": lens_cell, "lens_csv": lens_csv, "lens_json": lens_json}


def _attribution() -> dict:
    gr.Markdown("Click a token of the last answer, then ask what in the prompt drove it.")
    attr_pick = gr.HTML("", elem_id="attr-pick", js_on_load=TOKEN_CLICK_JS)
    with gr.Row():
        attr_token = gr.Number(0, precision=0, minimum=0, label="answer token", elem_id="attr-token")
        method = gr.Radio(list(service.METHODS), value="gradient×input", label="method", elem_id="attr-method")
        unit = gr.Radio(["per turn", "per token"], value="per turn", label="occlusion leaves out",
                        elem_id="attr-unit")
        attr_run = gr.Button("Attribute", variant="primary", elem_id="attr-run")
    attr_md = gr.Markdown("", elem_id="attr-status")
    attr_html = gr.HTML("", elem_id="attr-text")
    attr_plot = gr.Plot(show_label=False, elem_id="attr-turns")
    with gr.Row():
        attr_csv = gr.DownloadButton("Download CSV", elem_id="attr-csv", visible=False)
        attr_json = gr.DownloadButton("Download JSON", elem_id="attr-json", visible=False)
    return {"attr_pick": attr_pick, "attr_token": attr_token, "method": method, "unit": unit, "attr_run": attr_run,
            "attr_md": attr_md, "attr_html": attr_html, "attr_plot": attr_plot, "attr_csv": attr_csv,
            "attr_json": attr_json}


def _scoring(services: Services) -> dict:
    with gr.Row():
        model_a = gr.Dropdown(_ref_choices(services), value=services.default_model, label="model (A)",
                              elem_id="score-model", min_width=240)
        model_b = gr.Dropdown(_ref_choices(services), value=None, label="compare with (B, same tokenizer)",
                              elem_id="score-model-b", min_width=240)
    text = gr.Textbox(lines=4, label="text", elem_id="score-text", max_length=services.limits.max_input_chars)
    with gr.Row():
        question = gr.Textbox(label="question (chat template only)", elem_id="score-question", scale=3)
        template = gr.Checkbox(False, label="inside the chat template, as the answer", elem_id="score-template")
        reuse = gr.Button("Score the chat's last answer", elem_id="score-reuse", min_width=160)
    with gr.Row():
        score_run = gr.Button("Score with A", variant="primary", elem_id="score-run")
        div_run = gr.Button("Divergence A vs B", elem_id="div-run")
    score_md = gr.Markdown("", elem_id="score-status")
    score_html = gr.HTML("", elem_id="score-view")
    score_plot = gr.Plot(show_label=False, elem_id="score-plot")
    div_table = gr.Dataframe(interactive=False, elem_id="div-table", label="where they disagree most", visible=False)
    with gr.Row():
        score_csv = gr.DownloadButton("Download CSV", elem_id="score-csv", visible=False)
        score_json = gr.DownloadButton("Download JSON", elem_id="score-json", visible=False)
    return {"model_a": model_a, "model_b": model_b, "text": text, "question": question, "template": template,
            "reuse": reuse, "score_run": score_run, "div_run": div_run, "score_md": score_md,
            "score_html": score_html, "score_plot": score_plot, "div_table": div_table, "score_csv": score_csv,
            "score_json": score_json}


def _bundle() -> dict:
    gr.Markdown("One self-contained HTML file of the last answer that opens offline: token view with per-stage "
                "hover, settings, seed, model and weights fingerprint, versions. Open one (or a run's JSON) to see "
                "it here again.")
    with gr.Row():
        bundle_make = gr.Button("Make the bundle of the last answer", elem_id="bundle-make")
        bundle_file = gr.DownloadButton("Download bundle", elem_id="bundle-download", visible=False)
        bundle_open = gr.UploadButton("Open a bundle / run JSON", file_types=[".html", ".json"],
                                      elem_id="bundle-open")
    bundle_md = gr.Markdown("", elem_id="bundle-status")
    bundle_view = gr.HTML("", elem_id="bundle-view")
    return {"bundle_make": bundle_make, "bundle_file": bundle_file, "bundle_open": bundle_open,
            "bundle_md": bundle_md, "bundle_view": bundle_view}


def _ref_choices(services: Services) -> list[tuple[str, str]]:
    """Every model, and each of its forwards where it has a choice."""
    out = []
    for label, name in services.choices():
        out.append((label, name))
        for forward in services.forward_choices(name)[1:]:
            out.append((f"{label} [{forward}]", ref(name, forward)))
    return out
