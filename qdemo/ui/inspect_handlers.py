"""The Inspect tab's components and handlers: module-level functions over qdemo.services.probing, bound to the
parts with functools.partial. Each reads its keyed inputs and returns a dict naming what it changes.

Every view reads the chat as the page shows it (`_conversation`): the last answer's view while the page has it,
the restored conversation after a reload. Every view that runs a model is armed first by an instant step (`arm`: a
fresh stop event for this session), so the tab's Stop reaches a view still waiting in the queue, and never another
session's or a later view."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from qdemo.services import probing as service
from qdemo.services.admission import Refused
from qdemo.ui.context import UIContext, download, event_index, progress_callback
from qdemo.views import probes as views
from qdemo.views.bundle import read_bundle
from qdemo.views.export import csv_text
from qdemo.views.labels import token_label
from qdemo.views.tokens import token_view_html


class InspectState:
    """The session's last result of each view (their cells and downloads read it), and the stop event of the view
    armed last (the tab's Stop sets it). A plain class, not a dataclass: Gradio turns a dataclass State's value
    into a dict for the page's config, and an Event cannot be copied."""

    def __init__(self) -> None:
        self.lens: Any = None  # service.LensResult
        self.attribution: Any = None
        self.score: Any = None
        self.divergence: Any = None
        self.stop = threading.Event()
        self.active = False  # a view is armed or running

    def __deepcopy__(self, memo: dict) -> "InspectState":
        return type(self)()  # Gradio copies the initial value per session: each gets its own stop event

    def arm(self) -> None:
        """A view is about to run: a fresh stop event, so a Stop pressed before never ends it."""
        self.stop = threading.Event()
        self.active = True

    @contextlib.contextmanager
    def running(self) -> Iterator[threading.Event]:
        """The armed view's stop event while it runs."""
        try:
            yield self.stop
        finally:
            self.active = False


@dataclass(frozen=True)
class InspectParts:
    state: gr.State  # InspectState
    chat_state: gr.State  # the Chat tab's ChatSession: its last answer is what the lens and attribution read
    chatbot: gr.Chatbot  # the chat as shown (restored after a reload) …
    chat_model: gr.Dropdown  # … its model …
    chat_system: gr.Textbox  # … and system prompt
    runs: gr.State  # the session's runs (after a reload, the browser's compact copies)
    stop: gr.Button
    stop_md: gr.Markdown
    sublayers: gr.Checkbox
    lens_run: gr.Button
    lens_md: gr.Markdown
    lens_grid: gr.HTML
    lens_cell: gr.Dataframe
    lens_csv: gr.DownloadButton
    lens_json: gr.DownloadButton
    attr_pick: gr.HTML
    attr_token: gr.Number
    method: gr.Radio
    unit: gr.Radio
    attr_run: gr.Button
    attr_md: gr.Markdown
    attr_html: gr.HTML
    attr_plot: gr.Plot
    attr_csv: gr.DownloadButton
    attr_json: gr.DownloadButton
    model_a: gr.Dropdown
    model_b: gr.Dropdown
    text: gr.Textbox
    question: gr.Textbox
    template: gr.Checkbox
    reuse: gr.Button
    score_run: gr.Button
    div_run: gr.Button
    score_md: gr.Markdown
    score_html: gr.HTML
    score_plot: gr.Plot
    div_table: gr.Dataframe
    score_csv: gr.DownloadButton
    score_json: gr.DownloadButton
    bundle_make: gr.Button
    bundle_file: gr.DownloadButton
    bundle_open: gr.UploadButton
    bundle_md: gr.Markdown
    bundle_view: gr.HTML


def _conversation(p: InspectParts, ui: UIContext, data: dict) -> service.Conversation:
    return service.Conversation(view=data[p.chat_state].view, history=data[p.chatbot] or [],
                                model=data[p.chat_model] or ui.services.default_model, system=data[p.chat_system],
                                runs=data[p.runs] or [])


def _pick_html(conversation: service.Conversation) -> str | None:
    """The last answer's tokens to click (None: after a reload without its saved run, there are none to show)."""
    view = conversation.view
    if view is not None:
        return token_view_html(view.run.tokens, view.texts, view.labels)
    run = conversation.saved_run()
    return token_view_html(run.tokens, [t.text for t in run.tokens], {}) if run is not None else None


# --- Stop -----------------------------------------------------------------------------------------------------------

def arm(p: InspectParts, data: dict) -> None:
    data[p.state].arm()


def stop(p: InspectParts, data: dict) -> dict:
    state: InspectState = data[p.state]
    if not state.active:
        return {p.stop_md: "Nothing is running in this tab."}
    state.stop.set()
    return {p.stop_md: "Stopping: the view ends at its next chunk and shows what it finished."}


# --- logit lens -----------------------------------------------------------------------------------------------------

def run_lens(p: InspectParts, ui: UIContext, data: dict, request: gr.Request,
             progress: gr.Progress = gr.Progress()) -> dict:
    conversation = _conversation(p, ui, data)
    with data[p.state].running() as halt:
        result = service.lens_view(ui.services, ui.client(request), service.conversation_subject(conversation),
                                   sublayers=bool(data[p.sublayers]), progress=progress_callback(progress),
                                   stop=halt)
    data[p.state].lens = result
    grid = result.grid
    committed = sum(1 for c in result.commitment if c)
    lines = [f"**{grid.model}** ({result.forward}) · {len(grid.rows)} rows × {len(grid.positions)} tokens in "
             f"{result.seconds:.2f} s · the token that followed became top-1 by the last layer at {committed} of "
             f"{len(grid.positions)} tokens (red underline: its first layer)."]
    if result.notice:
        lines.append(f"_{result.notice}_")
    pick = _pick_html(conversation)
    return {p.lens_md: " ".join(lines), p.state: data[p.state], p.attr_pick: gr.skip() if pick is None else pick,
            p.lens_grid: views.lens_grid_html(grid.rows, result.columns, grid.top1, grid.top_probs[:, :, 0],
                                              grid.target_probs, result.texts, result.commitment),
            p.lens_csv: download("qdemo-logit-lens.csv", csv_text(grid.to_frame(result.texts))),
            p.lens_json: download("qdemo-logit-lens.json", grid.to_json())}


def show_cell(p: InspectParts, data: dict, evt: gr.EventData) -> dict:
    result = data[p.state].lens
    row, col = event_index(evt, "row"), event_index(evt, "col")
    if result is None or row is None:
        return {p.lens_cell: gr.skip()}
    r, c = int(row), int(col)
    grid = result.grid
    if not (0 <= r < len(grid.rows) and 0 <= c < len(grid.positions)):
        return {p.lens_cell: gr.skip()}
    rows = [[x["rank"], token_label(x["token"]), round(x["prob"], 4)] for x in grid.cell(r, c, result.texts)]
    return {p.lens_cell: gr.Dataframe(value=rows, label=f"{grid.rows[r]} → token {c} "
                                                        f"({token_label(result.columns[c])}): top-10")}


# --- attribution ----------------------------------------------------------------------------------------------------

def show_pick(p: InspectParts, ui: UIContext, data: dict) -> dict:
    conversation = _conversation(p, ui, data)
    try:
        pick = _pick_html(conversation)
    except Refused:
        return {p.attr_pick: "", p.attr_md: "Send a message in the Chat tab first."}
    if pick is None:
        return {p.attr_pick: "", p.attr_md: "The restored answer's tokens are not kept in this browser: type the "
                                             "number of the answer token to explain (0 is the first)."}
    return {p.attr_pick: pick, p.attr_md: ""}


def pick_token(p: InspectParts, evt: gr.EventData) -> dict:
    index = event_index(evt)
    return {p.attr_token: int(index) if index is not None else gr.skip()}


def attribute(p: InspectParts, ui: UIContext, data: dict, request: gr.Request,
              progress: gr.Progress = gr.Progress()) -> dict:
    token = data[p.attr_token]
    token = int(token) if isinstance(token, (int, float)) and float(token).is_integer() else token
    subject = service.conversation_subject(_conversation(p, ui, data))
    with data[p.state].running() as halt:
        result = service.attribution_view(ui.services, ui.client(request), subject, token, data[p.method],
                                          per_token=data[p.unit] == "per token", progress=progress_callback(progress),
                                          stop=halt)
    data[p.state].attribution = result
    att = result.attribution
    line = (f"**{token_label(result.target_text)}** (answer token {token}) had log p {att.logprob:.3f}; "
            f"{att.method} over {len(att.context)} tokens in {result.seconds:.2f} s.")
    if result.notice:
        line += f" _{result.notice}_"
    labels = [u.label for u, _ in result.per_turn]
    return {p.attr_md: line, p.state: data[p.state],
            p.attr_html: views.attribution_html(result.pieces, result.token_scores, result.target_text, att.method),
            p.attr_plot: views.per_turn_figure(labels, [s for _, s in result.per_turn], att.method),
            p.attr_csv: download("qdemo-attribution.csv", csv_text(att.to_frame(dict(enumerate(result.pieces))))),
            p.attr_json: download("qdemo-attribution.json", att.to_json())}


# --- scoring and divergence -----------------------------------------------------------------------------------------
# Page handlers' names are Gradio's private api names: none may be /score's or /divergence's.

def score_pasted(p: InspectParts, ui: UIContext, data: dict, request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> dict:
    return _score(p, ui, data, request, progress, subject=None)


def score_answer(p: InspectParts, ui: UIContext, data: dict, request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> dict:
    # The answer's own token ids, not its text re-tokenized (which can split differently).
    return _score(p, ui, data, request, progress, subject=service.conversation_subject(_conversation(p, ui, data)))


def _score(p: InspectParts, ui: UIContext, data: dict, request: gr.Request, progress: gr.Progress,
           subject: service.Subject | None) -> dict:
    with data[p.state].running() as halt:
        result = service.score_view(ui.services, ui.client(request), data[p.model_a], data[p.text],
                                    data[p.question] or "", bool(data[p.template]), progress_callback(progress),
                                    subject=subject, stop=halt)
    data[p.state].score = result
    s = result.score
    pieces = result.pieces
    line = (f"**{s.model}** ({s.forward}): {s.count} tokens scored in {result.seconds:.2f} s · perplexity "
            f"**{s.perplexity:.2f}** · mean surprisal {s.mean_surprisal_bits:.2f} bits · the model's top choice at "
            f"{s.top1_share:.0%} of tokens.")
    if result.notice:
        line += f" _{result.notice}_"
    return {p.score_md: line, p.state: data[p.state], p.div_table: gr.Dataframe(visible=False),
            p.score_html: views.score_html(pieces, s.probs, s.ranks, s.surprisal_bits),
            p.score_plot: views.surprisal_figure(pieces, s.surprisal_bits),
            p.score_csv: download("qdemo-score.csv", csv_text(s.to_frame(result.texts))),
            p.score_json: download("qdemo-score.json", s.to_json())}


def diverge(p: InspectParts, ui: UIContext, data: dict, request: gr.Request,
            progress: gr.Progress = gr.Progress()) -> dict:
    with data[p.state].running() as halt:
        result = service.divergence_view(ui.services, ui.client(request), data[p.model_a], data[p.model_b],
                                         data[p.text], data[p.question] or "", bool(data[p.template]),
                                         progress_callback(progress), stop=halt)
    data[p.state].divergence = result
    d = result.divergence
    pieces = result.pieces
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
    return {p.score_md: line, p.state: data[p.state], p.div_table: gr.Dataframe(value=worst, visible=True),
            p.score_html: views.divergence_html(pieces, d.kl_ab, d.agree),
            p.score_plot: views.divergence_figure(pieces, d.kl_ab, d.kl_ba, d.agree, "A", "B"),
            p.score_csv: download("qdemo-divergence.csv", csv_text(d.to_frame(result.texts))),
            p.score_json: download("qdemo-divergence.json", d.to_json())}


# --- evidence bundle ------------------------------------------------------------------------------------------------

def make_bundle(p: InspectParts, ui: UIContext, data: dict, request: gr.Request) -> dict:
    made = service.answer_bundle(ui.services, ui.client(request), _conversation(p, ui, data))
    run = made.run
    line = f"Bundle of run {run.run_id} ({run.model}, weights {made.fingerprint}) is ready."
    if made.restored:
        line += (" It was made from the run this browser kept across the reload, which holds no per-stage "
                 "probabilities: its tokens have no stage numbers.")
    return {p.bundle_file: download(f"qdemo-run-{run.run_id}.html", made.page), p.bundle_md: line}


def open_bundle(p: InspectParts, data: dict) -> dict:
    path = data[p.bundle_open]
    try:
        with open(path if isinstance(path, str) else path.name, "rb") as file:
            raw = file.read()
        run = read_bundle(raw)
    except ValueError as exc:
        raise Refused(f"Could not open that file: {exc}") from None
    meta = service.bundle_meta_or_empty(raw)
    labels = {int(k): v for k, v in (meta.get("texts") or {}).items()} if meta else {}
    return {p.bundle_md: f"Opened run {run.run_id} of **{run.model}** ({len(run.tokens)} tokens). "
                         f"{service.run_summary(run)}",
            p.bundle_view: token_view_html(run.tokens, [t.text for t in run.tokens], labels)}
