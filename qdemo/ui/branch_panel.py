"""Chat tab: branch from any token of the answer (logic in qdemo.services.branches). Click a token in the token
view, pick another token for that position — one a stage removed, too — and generate on from there. The chat then
shows the branch; the branch list switches between all of them and says where each parts from its parent.

Handlers are module-level functions over the services, bound to the Chat tab's parts (the panel's own are
`parts.branch`). A new answer, Clear, Undo and Import forget the branches: their handlers merge `forgotten`."""

from __future__ import annotations

import functools
import threading
from typing import Iterator

import gradio as gr

from qdemo.services import branches, chat, perf, settings
from qdemo.ui.answer_panel import decided_summary, view_html
from qdemo.ui.chat_parts import BRANCH_HINT, ChatParts
from qdemo.ui.context import UIContext, event_index, progress_callback
from qdemo.views import answer as answer_views
from qdemo.views.labels import token_label


def wire(ui: UIContext, parts: ChatParts) -> None:
    branch, session = parts.branch, parts.session
    on = functools.partial(ui.on, notice=branch.hint)
    on(parts.tokens_view.select, functools.partial(pick, parts), {parts.state},
       [branch.selected, branch.alt, branch.hint], queue=False)
    shows = [parts.chatbot, parts.metrics, parts.tokens_view, parts.decided_md, branch.tree, branch.hint,
             branch.compare]
    on(branch.run.click, functools.partial(grow, parts, ui),
       {parts.state, branch.selected, branch.alt, parts.chatbot, parts.measure, parts.decided, session.runs,
        *parts.controls.components()},
       [*shows, session.runs, session.saved_runs], runs_model=True)
    on(branch.tree.input, functools.partial(switch, parts),
       {parts.state, branch.tree, parts.chatbot, parts.measure, parts.decided}, shows, queue=False)


def outputs(parts: ChatParts) -> list:
    """What `forgotten` updates: the chat's events that forget the branches name them as outputs."""
    branch = parts.branch
    return [branch.tree, branch.alt, branch.compare, branch.hint, branch.selected]


def forgotten(parts: ChatParts, state: chat.ChatSession) -> dict:
    """The panel emptied for a new answer or an edited chat (unless the chat shows one of this answer's
    branches)."""
    branch = parts.branch
    if state.branches is not None:
        return {}
    return {branch.tree: gr.Dropdown(choices=[], value=None), branch.alt: gr.Dropdown(choices=[], value=None),
            branch.compare: "", branch.hint: BRANCH_HINT, branch.selected: None}


def pick(parts: ChatParts, data: dict, evt: gr.EventData) -> dict:
    branch = parts.branch
    view, index = data[parts.state].view, event_index(evt)
    if view is None or index is None:
        return {branch.hint: gr.skip()}
    try:
        options = branches.alternatives(view, index)
    except ValueError as exc:
        return {branch.hint: f"⚠️ {exc}", branch.alt: gr.Dropdown(choices=[], value=None)}
    was = token_label(view.texts[int(index)])
    return {branch.selected: int(index),
            branch.alt: gr.Dropdown(choices=[(o.label, o.token_id) for o in options],
                                    value=options[0].token_id if options else None),
            branch.hint: f"Token **{int(index)}** ({was}): pick what to write there instead."}


def grow(parts: ChatParts, ui: UIContext, data: dict, request: gr.Request,
         progress: gr.Progress = gr.Progress()) -> Iterator[dict]:
    branch, session = parts.branch, parts.session
    state: chat.ChatSession = data[parts.state]
    view, index, token = state.view, data[branch.selected], data[branch.alt]
    if view is None or index is None or token is None:
        yield {branch.hint: "Click a token in the token view first, then pick the token to write there."}
        return
    if state.busy():
        yield {branch.hint: f"⚠️ {state.busy()}"}
        return
    try:
        params = settings.to_params(parts.controls.values(data))
    except ValueError as exc:
        yield {branch.hint: f"⚠️ Sampling settings: {exc}"}
        return
    tree = state.branches = state.branches or branches.BranchTree.of(view, chat.answer_text(view.run))
    state.stop = threading.Event()  # the chat's Stop button stops the branch too
    runs, history = list(data[session.runs] or []), list(data[parts.chatbot] or [])
    epoch = state.epoch  # Clear, Undo and Import end a branch as they end an answer: nothing of it shows after them
    deliver = functools.partial(state.deliver, epoch, None)
    for update in branches.grow(ui.services, state, tree, ui.client(request), tree.current, index, int(token),
                                params, perf.next_run_id(runs), stop=state.stop, progress=progress_callback(progress)):
        if not update.done:
            yield from deliver({parts.chatbot: chat.without_answer(history) + [{"role": "assistant",
                                                                                "content": update.text}]})
            continue
        if not state.adopt(epoch, None, update.branch.view, branches=tree):
            break
        runs = runs + [update.branch.view.run]
        yield from deliver({**_shown(parts, data, history, tree), branch.hint: update.notice,
                            branch.compare: branches.compare(tree, update.branch.parent, update.branch.id),
                            session.runs: runs, session.saved_runs: perf.saved(runs)})
    yield {branch.hint: gr.skip()}  # Gradio's "done" message repeats the last update: after Clear, let it be this


def switch(parts: ChatParts, data: dict) -> dict:
    branch = parts.branch
    state: chat.ChatSession = data[parts.state]
    tree = state.branches
    if tree is None or data[branch.tree] not in tree.branches:
        return {branch.hint: gr.skip()}
    if state.busy():
        return {branch.hint: f"⚠️ {state.busy()}"}
    tree.current = int(data[branch.tree])
    chosen = tree.branches[tree.current]
    state.view = chosen.view
    return {**_shown(parts, data, data[parts.chatbot], tree),
            branch.compare: branches.compare(tree, chosen.parent, chosen.id) if chosen.parent is not None else "",
            branch.hint: f"The chat now shows {tree.label(chosen).strip()}."}


def _shown(parts: ChatParts, data: dict, history: list, tree: branches.BranchTree) -> dict:
    """The chat, token view and branch list showing the tree's current branch."""
    view = tree.branches[tree.current].view
    text = tree.branches[tree.current].text
    return {parts.chatbot: chat.without_answer(history) + [{"role": "assistant", "content": text}],
            parts.metrics: answer_views.metrics_line(view.run),
            parts.tokens_view: view_html(view, data[parts.measure], data[parts.decided]),
            parts.decided_md: decided_summary(view),
            parts.branch.tree: gr.Dropdown(choices=tree.choices(), value=tree.current)}
