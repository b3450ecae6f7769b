"""Chat tab: branch from any token of the answer (logic in qdemo.services.branches). Wiring only.

Click a token in the token view, pick another token for that position — one a stage removed, too — and generate
on from there. The chat then shows the branch; the branch list switches between all of them and says where each
parts from its parent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from qdemo.services import branches, chat, perf, settings
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.zerogpu import on_gpu
from qdemo.views import answer as answer_views
from qdemo.views.labels import token_label

HINT = ("Click a token in the token view, pick another token for that position (one a sampling stage removed, "
        "too) and generate on from there. The shared start is not computed again.")


@dataclass
class ChatParts:
    """The Chat tab's components this panel reads and writes."""

    state: gr.State  # chat.ChatSession
    chatbot: gr.Chatbot
    tokens_view: gr.HTML
    measure: gr.Radio
    decided: gr.Dropdown  # the token view's "show" filter
    decided_md: gr.Markdown  # the answer's which-stage-decided line
    notice: gr.Markdown
    metrics: gr.Markdown
    controls: Any  # SamplingControls
    view_html: Any  # (view, measure, filter) -> the token view's HTML, as the Chat tab draws it
    summary: Any  # view -> the which-stage-decided line


def build(ui: UIContext, session: SessionComponents, parts: ChatParts) -> Callable[[list], None]:
    """The panel; returns the function that wires its reset after the chat's own events (a new answer, Clear,
    Undo, Import forget the branches)."""
    services = ui.services
    with gr.Accordion("Branch from a token", open=False, elem_id="branch-box"):
        hint = gr.Markdown(HINT, elem_id="branch-hint")
        with gr.Row(equal_height=True):
            alt = gr.Dropdown([], label="write this token instead", elem_id="branch-alt", scale=3, min_width=200)
            run_btn = gr.Button("Generate from here", variant="primary", elem_id="branch-run", scale=1,
                                min_width=120)
        tree_dd = gr.Dropdown([], label="branches (the chat shows the one chosen)", elem_id="branch-tree")
        compare_md = gr.Markdown("", elem_id="branch-compare")
    selected = gr.State(None)  # the token index last clicked

    def pick(data, evt: gr.EventData):
        view = data[parts.state].view
        index = (evt._data or {}).get("index") if isinstance(evt._data, dict) else None
        if view is None or index is None:
            return {hint: gr.skip()}
        try:
            options = branches.alternatives(view, index)
        except ValueError as exc:
            return {hint: f"⚠️ {exc}", alt: gr.Dropdown(choices=[], value=None)}
        was = token_label(view.texts[int(index)])
        return {selected: int(index), alt: gr.Dropdown(choices=[(o.label, o.token_id) for o in options],
                                                        value=options[0].token_id if options else None),
                hint: f"Token **{int(index)}** ({was}): pick what to write there instead."}

    ui.on(parts.tokens_view.select, pick, {parts.state}, [selected, alt, hint], notice=hint, queue=False)

    def shown(view, data, chat_history, tree) -> dict:
        """The chat, token view and branch list showing `view`."""
        history = chat.without_answer(chat_history) + [{"role": "assistant", "content": _text(tree)}]
        return {parts.chatbot: history, parts.metrics: answer_views.metrics_line(view.run),
                parts.tokens_view: parts.view_html(view, data[parts.measure], data[parts.decided]),
                parts.decided_md: parts.summary(view),
                tree_dd: gr.Dropdown(choices=tree.choices(), value=tree.current)}

    def grow(data, request: gr.Request, progress=gr.Progress()):
        state: chat.ChatSession = data[parts.state]
        view, index, token = state.view, data[selected], data[alt]
        if view is None or index is None or token is None:
            yield {hint: "Click a token in the token view first, then pick the token to write there."}
            return
        busy = state.busy()
        if busy:
            yield {hint: f"⚠️ {busy}"}
            return
        try:
            params = settings.to_params(parts.controls.values(data))
        except ValueError as exc:
            yield {hint: f"⚠️ Sampling settings: {exc}"}
            return
        tree = state.branches or branches.BranchTree.of(view, chat.answer_text(view.run))
        state.branches = tree
        state.stop = threading.Event()  # the chat's Stop button stops the branch too
        runs = list(data[session.runs] or [])
        history = list(data[parts.chatbot] or [])
        for update in branches.grow(services, state, tree, ui.client(request), tree.current, index, int(token),
                                    params, perf.next_run_id(runs), stop=state.stop,
                                    progress=progress_callback(progress)):
            if not update.done:
                yield {parts.chatbot: chat.without_answer(history) + [{"role": "assistant",
                                                                        "content": update.text}]}
                continue
            state.view = update.branch.view
            runs = runs + [update.branch.view.run]
            yield {**shown(update.branch.view, data, history, tree), hint: update.notice,
                   compare_md: branches.compare(tree, update.branch.parent, update.branch.id),
                   session.runs: runs, session.saved_runs: perf.saved(runs)}

    grow = on_gpu(grow)
    ui.on(run_btn.click, grow, {parts.state, selected, alt, parts.chatbot, parts.measure, parts.decided, session.runs,
                                *parts.controls.components()},
          [parts.chatbot, parts.metrics, parts.tokens_view, parts.decided_md, tree_dd, hint, compare_md, session.runs,
           session.saved_runs], notice=hint, runs_model=True)

    def switch(data):
        state: chat.ChatSession = data[parts.state]
        tree = state.branches
        if tree is None or data[tree_dd] not in tree.branches:
            return {hint: gr.skip()}
        if state.busy():
            return {hint: f"⚠️ {state.busy()}"}
        tree.current = int(data[tree_dd])
        branch = tree.branches[tree.current]
        state.view = branch.view
        other = branch.parent if branch.parent is not None else None
        return {**shown(branch.view, data, data[parts.chatbot], tree),
                compare_md: branches.compare(tree, other, branch.id) if other is not None else "",
                hint: f"The chat now shows {tree.label(branch).strip()}."}

    ui.on(tree_dd.input, switch, {parts.state, tree_dd, parts.chatbot, parts.measure, parts.decided},
          [parts.chatbot, parts.metrics, parts.tokens_view, parts.decided_md, tree_dd, hint, compare_md], notice=hint,
          queue=False)

    def reset(data):
        if data[parts.state].branches is not None:
            return {hint: gr.skip()}  # the chat shows one of this answer's branches
        return {tree_dd: gr.Dropdown(choices=[], value=None), alt: gr.Dropdown(choices=[], value=None),
                compare_md: "", hint: HINT, selected: None}

    def wire_reset(events: list) -> None:
        # After the chat's own events, not on every change of the chatbot: a streaming answer changes it
        # ~20 times a second, and each would be a round trip counted against the page-event limit.
        for event in events:
            ui.on(event.then, reset, {parts.state}, [tree_dd, alt, compare_md, hint, selected], notice=hint,
                  queue=False, show_progress="hidden")

    return wire_reset


def _text(tree: branches.BranchTree) -> str:
    return tree.branches[tree.current].text
