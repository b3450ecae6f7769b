"""Inspect tab: wiring only (logic in qdemo.services.probing). Logit lens and prompt attribution on the Chat tab's
last answer, score any text, the divergence of two models on one text, and evidence bundles (export / open)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from qdemo.forwards.choice import ref
from qdemo.services import probing as service
from qdemo.services.admission import Refused
from qdemo.services.files import scratch_file
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.zerogpu import on_gpu
from qdemo.views import probes as views
from qdemo.views.bundle import bundle_html, read_bundle
from qdemo.views.export import csv_text
from qdemo.views.labels import token_label
from qdemo.views.tokens import TOKEN_CLICK_JS, TOKEN_VIEW_CSS, token_view_html

CELL_CLICK_JS = ("element.addEventListener('click', (e) => { const t = e.target.closest('[data-r]'); "
                 "if (t) trigger('select', {row: Number(t.dataset.r), col: Number(t.dataset.c)}); });")
CSS = views.LENS_CSS + """
.attrview .attr-text, .scoreview {line-height: 1.9; white-space: pre-wrap; font-family: ui-monospace, monospace;
  font-size: 13px}
.attrview .attr {border-radius: 3px}
.scoreview .sc {border-radius: 3px; margin-right: 1px}
#attr-pick .tok {cursor: pointer}
"""


@dataclass
class InspectState:
    lens: Any = None  # service.LensResult
    attribution: Any = None
    score: Any = None
    divergence: Any = None

    def __deepcopy__(self, memo: dict) -> "InspectState":
        return type(self)()


def _download(name: str, text: str) -> gr.DownloadButton:
    path = scratch_file(name)
    path.write_text(text, encoding="utf-8")
    return gr.DownloadButton(value=str(path), visible=True)


def _ref_choices(services) -> list[tuple[str, str]]:
    out = []
    for label, name in services.choices():
        out.append((label, name))
        for forward in services.forward_choices(name)[1:]:
            out.append((f"{label} [{forward}]", ref(name, forward)))
    return out


def build(ui: UIContext, session: SessionComponents, tab: gr.Tab) -> None:
    services = ui.services
    state = gr.State(InspectState())
    chat_state = session.chat_state
    gr.HTML("", head=f"<style>{CSS}{TOKEN_VIEW_CSS}</style>", elem_id="inspect-css")
    gr.Markdown("Look inside the **Chat tab's last answer** (the lens and attribution use the torch weights of the "
                "model it ran on), or score any text. Every view has a CSV and JSON download; the same views are "
                "named API endpoints.", elem_id="inspect-intro")

    with gr.Accordion("Logit lens", open=True, elem_id="lens"):
        with gr.Row():
            sublayers = gr.Checkbox(False, label="also after each attention sublayer", elem_id="lens-sublayers")
            lens_btn = gr.Button("Run the lens on the last answer", variant="primary", elem_id="lens-run")
        lens_md = gr.Markdown("Each layer's residual stream through the model's own final norm and lm_head: "
                              "rows are layers (output at the top), columns the answer's tokens; a cell shows "
                              "its top-1 token coloured by its probability. Click a cell for its top-10.",
                              elem_id="lens-status")
        lens_grid = gr.HTML("", elem_id="lens-grid", js_on_load=CELL_CLICK_JS)
        lens_cell = gr.Dataframe(headers=["rank", "token", "prob"], interactive=False, elem_id="lens-cell",
                                 label="top-10 of the clicked cell")
        with gr.Row():
            lens_csv = gr.DownloadButton("Download CSV", elem_id="lens-csv", visible=False)
            lens_json = gr.DownloadButton("Download JSON", elem_id="lens-json", visible=False)

    with gr.Accordion("Prompt attribution", open=False, elem_id="attribution"):
        gr.Markdown("Click a token of the last answer, then ask what in the prompt drove it.")
        attr_pick = gr.HTML("", elem_id="attr-pick", js_on_load=TOKEN_CLICK_JS)
        with gr.Row():
            attr_token = gr.Number(0, precision=0, minimum=0, label="answer token", elem_id="attr-token")
            method = gr.Radio(list(service.METHODS), value="gradient×input", label="method", elem_id="attr-method")
            unit = gr.Radio(["per turn", "per token"], value="per turn", label="occlusion leaves out",
                            elem_id="attr-unit")
            attr_btn = gr.Button("Attribute", variant="primary", elem_id="attr-run")
        attr_md = gr.Markdown("", elem_id="attr-status")
        attr_html = gr.HTML("", elem_id="attr-text")
        attr_plot = gr.Plot(show_label=False, elem_id="attr-turns")
        with gr.Row():
            attr_csv = gr.DownloadButton("Download CSV", elem_id="attr-csv", visible=False)
            attr_json = gr.DownloadButton("Download JSON", elem_id="attr-json", visible=False)

    with gr.Accordion("Score any text · divergence of two models", open=False, elem_id="scoring"):
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
            score_btn = gr.Button("Score with A", variant="primary", elem_id="score-run")
            div_btn = gr.Button("Divergence A vs B", elem_id="div-run")
        score_md = gr.Markdown("", elem_id="score-status")
        score_html = gr.HTML("", elem_id="score-view")
        score_plot = gr.Plot(show_label=False, elem_id="score-plot")
        div_table = gr.Dataframe(interactive=False, elem_id="div-table", label="where they disagree most",
                                 visible=False)
        with gr.Row():
            score_csv = gr.DownloadButton("Download CSV", elem_id="score-csv", visible=False)
            score_json = gr.DownloadButton("Download JSON", elem_id="score-json", visible=False)

    with gr.Accordion("Evidence bundle", open=False, elem_id="bundle"):
        gr.Markdown("One self-contained HTML file of the last answer that opens offline: token view with per-stage "
                    "hover, settings, seed, model and weights fingerprint, versions. Open one (or a run's JSON) to "
                    "see it here again.")
        with gr.Row():
            bundle_btn = gr.Button("Make the bundle of the last answer", elem_id="bundle-make")
            bundle_file = gr.DownloadButton("Download bundle", elem_id="bundle-download", visible=False)
            bundle_open = gr.UploadButton("Open a bundle / run JSON", file_types=[".html", ".json"],
                                          elem_id="bundle-open")
        bundle_md = gr.Markdown("", elem_id="bundle-status")
        bundle_view = gr.HTML("", elem_id="bundle-view")

    # --- logit lens ---------------------------------------------------------------------------------------
    def run_lens(data, request: gr.Request, progress=gr.Progress()):
        subject = service.chat_subject(data[chat_state].view)
        result = service.lens_view(services, ui.client(request), subject, sublayers=bool(data[sublayers]),
                                   progress=progress_callback(progress))
        data[state].lens = result
        grid = result.grid
        committed = sum(1 for c in result.commitment if c)
        lines = [f"**{grid.model}** ({result.forward}) · {len(grid.rows)} rows × {len(grid.positions)} tokens in "
                 f"{result.seconds:.2f} s · the token that followed became top-1 by the last layer at "
                 f"{committed} of {len(grid.positions)} tokens (red underline: its first layer)."]
        if result.notice:
            lines.append(f"_{result.notice}_")
        pick = token_view_html(data[chat_state].view.run.tokens, data[chat_state].view.texts,
                               data[chat_state].view.labels)
        frame = grid.to_frame(result.texts)
        return {lens_md: " ".join(lines), state: data[state], attr_pick: pick,
                lens_grid: views.lens_grid_html(grid.rows, result.columns, grid.top1, grid.top_probs[:, :, 0],
                                                grid.target_probs, result.texts, result.commitment),
                lens_csv: _download("qdemo-logit-lens.csv", csv_text(frame)),
                lens_json: _download("qdemo-logit-lens.json", grid.to_json())}

    run_lens = on_gpu(run_lens)
    ui.on(lens_btn.click, run_lens, {chat_state, sublayers, state},
          [lens_md, lens_grid, lens_csv, lens_json, state, attr_pick], notice=lens_md, runs_model=True)

    def show_cell(data, evt: gr.EventData):
        result = data[state].lens
        picked = evt._data if isinstance(evt._data, dict) else {}
        if result is None or "row" not in picked:
            return {lens_cell: gr.skip()}
        r, c = int(picked["row"]), int(picked["col"])
        grid = result.grid
        if not (0 <= r < len(grid.rows) and 0 <= c < len(grid.positions)):
            return {lens_cell: gr.skip()}
        rows = [[x["rank"], token_label(x["token"]), round(x["prob"], 4)] for x in grid.cell(r, c, result.texts)]
        return {lens_cell: gr.Dataframe(value=rows, label=f"{grid.rows[r]} → token {c} "
                                                          f"({token_label(result.columns[c])}): top-10")}

    ui.on(lens_grid.select, show_cell, {state}, [lens_cell], notice=lens_md, queue=False)

    # --- attribution --------------------------------------------------------------------------------------
    def show_pick(data):
        view = data[chat_state].view
        if view is None:
            return {attr_pick: "", attr_md: "Send a message in the Chat tab first."}
        return {attr_pick: token_view_html(view.run.tokens, view.texts, view.labels), attr_md: ""}

    ui.on(tab.select, show_pick, {chat_state}, [attr_pick, attr_md], notice=attr_md, queue=False)

    def pick_token(evt: gr.EventData):
        picked = evt._data if isinstance(evt._data, dict) else {}
        return {attr_token: int(picked["index"])} if "index" in picked else {attr_token: gr.skip()}

    ui.on(attr_pick.select, pick_token, None, [attr_token], notice=attr_md, queue=False)

    def attribute(data, request: gr.Request, progress=gr.Progress()):
        subject = service.chat_subject(data[chat_state].view)
        token = data[attr_token]
        token = int(token) if isinstance(token, (int, float)) and float(token).is_integer() else token
        result = service.attribution_view(services, ui.client(request), subject, token, data[method],
                                          per_token=data[unit] == "per token",
                                          progress=progress_callback(progress))
        data[state].attribution = result
        att = result.attribution
        line = (f"**{token_label(result.target_text)}** (answer token {token}) had log p {att.logprob:.3f}; "
                f"{att.method} over {len(att.context)} tokens in {result.seconds:.2f} s.")
        if result.notice:
            line += f" _{result.notice}_"
        labels = [u.label for u, _ in result.per_turn]
        return {attr_md: line, state: data[state],
                attr_html: views.attribution_html(result.pieces, result.token_scores, result.target_text, att.method),
                attr_plot: views.per_turn_figure(labels, [s for _, s in result.per_turn], att.method),
                attr_csv: _download("qdemo-attribution.csv",
                                     csv_text(att.to_frame(dict(enumerate(result.pieces))))),
                attr_json: _download("qdemo-attribution.json", att.to_json())}

    attribute = on_gpu(attribute)
    ui.on(attr_btn.click, attribute, {chat_state, attr_token, method, unit, state},
          [attr_md, attr_html, attr_plot, attr_csv, attr_json, state], notice=attr_md, runs_model=True)

    # --- scoring and divergence ---------------------------------------------------------------------------
    def score_pasted(data, request: gr.Request, progress=gr.Progress(), answer: bool = False):
        subject = service.chat_subject(data[chat_state].view) if answer else None
        result = service.score_view(services, ui.client(request), data[model_a], data[text], data[question] or "",
                                    bool(data[template]), progress_callback(progress), subject=subject)
        data[state].score = result
        s = result.score
        pieces = [result.texts.get(t, "") for t in s.token_ids]
        line = (f"**{s.model}** ({s.forward}): {s.count} tokens scored in {result.seconds:.2f} s · perplexity "
                f"**{s.perplexity:.2f}** · mean surprisal {s.mean_surprisal_bits:.2f} bits · the model's top choice "
                f"at {s.top1_share:.0%} of tokens.")
        if result.notice:
            line += f" _{result.notice}_"
        return {score_md: line, state: data[state], div_table: gr.Dataframe(visible=False),
                score_html: views.score_html(pieces, s.probs, s.ranks, s.surprisal_bits),
                score_plot: views.surprisal_figure(pieces, s.surprisal_bits),
                score_csv: _download("qdemo-score.csv", csv_text(s.to_frame(result.texts))),
                score_json: _download("qdemo-score.json", s.to_json())}

    def score_answer(data, request: gr.Request, progress=gr.Progress()):
        # The answer's own token ids, not its text re-tokenized (which can split differently).
        return score_pasted(data, request, progress, answer=True)

    # Page handlers' names are Gradio's private api names: they must not take /score from the named endpoint.
    score_pasted, score_answer = on_gpu(score_pasted), on_gpu(score_answer)
    score_outputs = [score_md, score_html, score_plot, div_table, score_csv, score_json, state]
    score_inputs = {model_a, text, question, template, state, chat_state}
    ui.on(score_btn.click, score_pasted, score_inputs, score_outputs, notice=score_md, runs_model=True)
    ui.on(reuse.click, score_answer, score_inputs, score_outputs, notice=score_md, runs_model=True)

    def diverge(data, request: gr.Request, progress=gr.Progress()):
        result = service.divergence_view(services, ui.client(request), data[model_a], data[model_b], data[text],
                                         data[question] or "", bool(data[template]), progress_callback(progress))
        data[state].divergence = result
        d = result.divergence
        pieces = [result.texts.get(t, "") for t in d.token_ids]
        kl, at = d.max_kl_ab
        line = (f"**A** {d.model_a} ({d.forward_a}) vs **B** {d.model_b} ({d.forward_b}) on {d.count} tokens in "
                f"{result.seconds:.2f} s: mean KL(A‖B) **{d.mean_kl_ab:.4f}** nats (KL(B‖A) {d.mean_kl_ba:.4f}), "
                f"largest {kl:.4f} at token {at}; top-1 agreement **{d.agreement:.0%}**; perplexity A "
                f"{d.perplexity_a:.2f}, B {d.perplexity_b:.2f}.")
        notes = " ".join(n for n in (d.note, result.notice) if n)
        if notes:
            line += f" _{notes}_"
        worst = d.to_frame(result.texts)
        worst = worst.sort_values("kl_ab", ascending=False).head(10) if "kl_ab" in worst else worst.head(10)
        return {score_md: line, state: data[state], div_table: gr.Dataframe(value=worst, visible=True),
                score_html: views.divergence_html(pieces, d.kl_ab, d.agree),
                score_plot: views.divergence_figure(pieces, d.kl_ab, d.kl_ba, d.agree, "A", "B"),
                score_csv: _download("qdemo-divergence.csv", csv_text(d.to_frame(result.texts))),
                score_json: _download("qdemo-divergence.json", d.to_json())}

    diverge = on_gpu(diverge)
    ui.on(div_btn.click, diverge, {model_a, model_b, text, question, template, state}, score_outputs,
          notice=score_md, runs_model=True)

    # --- evidence bundle ----------------------------------------------------------------------------------
    def make_bundle(data):
        view = data[chat_state].view
        if view is None:
            raise Refused("No answer yet: send a message in the Chat tab first.")
        fingerprint = service.weights_fingerprint(services, view.run.model)
        prompt = "".join(p[1] for p in view.prompt)
        page = bundle_html(view.run, fingerprint, view.labels, prompt=prompt)
        return {bundle_file: _download(f"qdemo-run-{view.run.run_id}.html", page),
                bundle_md: f"Bundle of run {view.run.run_id} ({view.run.model}, weights {fingerprint}) is ready."}

    ui.on(bundle_btn.click, make_bundle, {chat_state}, [bundle_file, bundle_md], notice=bundle_md, queue=False)

    def open_bundle(data):
        path = data[bundle_open]
        try:
            raw = open(path if isinstance(path, str) else path.name, "rb").read()
            run = read_bundle(raw)
        except ValueError as exc:
            raise Refused(f"Could not open that file: {exc}") from None
        texts = [t.text for t in run.tokens]
        meta = service.bundle_meta_or_empty(raw)
        labels = {int(k): v for k, v in (meta.get("texts") or {}).items()} if meta else {}
        summary = service.run_summary(run)
        return {bundle_md: f"Opened run {run.run_id} of **{run.model}** ({len(run.tokens)} tokens). {summary}",
                bundle_view: token_view_html(run.tokens, texts, labels)}

    ui.on(bundle_open.upload, open_bundle, {bundle_open}, [bundle_md, bundle_view], notice=bundle_md, queue=False)

