"""The Chat tab's handlers: module-level functions over qdemo.services.chat, bound to the tab's parts with
functools.partial. Each reads its keyed inputs (`data[component]`) and returns a dict naming only the components it
changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from qdemo.services import chat, history, perf, settings
from qdemo.services.files import scratch_file
from qdemo.ui import branch_panel, forward_picker
from qdemo.ui.answer_panel import TOKENS_HINT, assisted_label, decided_summary, decoding_line, view_html
from qdemo.ui.chat_parts import ACTION_MARK, ChatParts
from qdemo.ui.context import UIContext, event_index, progress_callback
from qdemo.views import answer as answer_views
from qdemo.views.labels import token_label
from qdemo.views.prompt import prompt_chips_html
from qdemo.views.stages import stage_figure, stage_notes
from qdemo.views.tokens import token_legend_html, token_value

# --- Send / Regenerate: step 1 (in the chat's ordered group) arms a ticket, step 2 (generation group) answers it ----

def begin(parts: ChatParts, ui: UIContext, data: dict) -> dict:
    begun = chat.begin_turn(data[parts.state], data[parts.box], data[parts.chatbot], ui.services.limits,
                            action(parts, data))
    return {**_begun(parts, data[parts.state], begun), parts.box: "" if begun.started else gr.skip()}


def begin_regenerate(parts: ChatParts, data: dict) -> dict:
    begun = chat.begin_regenerate(data[parts.state], data[parts.chatbot], action(parts, data))
    return _begun(parts, data[parts.state], begun)


def action(parts: ChatParts, data: dict) -> int | None:
    """The page's number for this chat action (chat_parts.ACTION_JS); None when the event carried none."""
    text = data.get(parts.action)
    number = text[len(ACTION_MARK):] if isinstance(text, str) and text.startswith(ACTION_MARK) else ""
    return int(number) if number.isdigit() else None


def _begun(parts: ChatParts, state: chat.ChatSession, begun: chat.Begun) -> dict:
    if begun.stale:  # a Clear, Undo or Import made after this Send already reset the chat
        return {parts.notice: gr.skip()}
    if begun.started:
        state.settle()  # a stopped answer's last update, if on its way, lands before the new message
    return {parts.chatbot: begun.chat, parts.notice: begun.notice, parts.ticket: begun.ticket,
            parts.metrics: answer_views.WAITING if begun.started else gr.skip()}


def answer(parts: ChatParts, ui: UIContext, data: dict, request: gr.Request,
           progress: gr.Progress = gr.Progress(track_tqdm=False)) -> Iterator[dict]:
    yield from _answer(parts, ui, data, request, progress)
    # Gradio's message that a generator is done repeats its last update: after Clear, Undo or Import (or while
    # they run) that would write the cleared answer back. The last update changes nothing instead.
    yield {parts.notice: gr.skip()}


def _answer(parts: ChatParts, ui: UIContext, data: dict, request: gr.Request, progress: gr.Progress
            ) -> Iterator[dict]:
    state: chat.ChatSession = data[parts.state]
    ticket = data[parts.ticket]
    if ticket is None or state.pending != ticket:
        return  # this Send armed nothing (empty, refused, or replaced)
    values = parts.controls.values(data)
    try:
        params = settings.to_params(values)
    except ValueError as exc:
        state.take(ticket)
        state.finish(ticket)
        yield {parts.notice: f"⚠️ Sampling settings: {exc}"}
        return
    runs = list(data[parts.session.runs] or [])
    model = forward_picker.model_ref(data[parts.model], data[parts.forward])
    for update in chat.answer(ui.services, state, ui.client(request), data[parts.chatbot], model, data[parts.system],
                              params, perf.next_run_id(runs), progress_callback(progress),
                              assisted=bool(data[parts.assisted]), ticket=ticket):
        out = {parts.chatbot: update.chat, parts.metrics: update.metrics, parts.notice: update.notice}
        if update.view is not None:
            runs = runs + [update.view.run]
            history.keep_run(ui.services.store, history.page_owner(data[parts.session.owner]), "chat",
                             update.view.run, update.view.messages)
            out.update(_answered(parts, data, update.view, runs))
        if update.done:
            out.update(_settled(parts, data[parts.model], data[parts.system], update.chat, values))
            out.update(branch_panel.forgotten(parts, state))
        yield out


def _answered(parts: ChatParts, data: dict, view: chat.AnswerView, runs: list) -> dict:
    """The panels beside the chat, showing a finished answer, and the session's runs with it."""
    session = parts.session
    return {parts.tokens_view: view_html(view, data[parts.measure], data[parts.decided]),
            parts.decided_md: decided_summary(view), parts.legend: token_legend_html(data[parts.measure]),
            parts.stage_plot: None, parts.notes: "", parts.prompt_view: prompt_chips_html(view.prompt, view.dropped),
            session.runs: runs, session.saved_runs: perf.saved(runs)}


def stop(parts: ChatParts, data: dict) -> None:
    """Wired twice (chat_tab): unqueued, it reaches a running answer at once; in the chat's ordered group, after
    every Send the page made before the click, it also stops a turn that was armed after the unqueued half ran."""
    data[parts.state].stop_turn(action(parts, data))


# --- Clear / the chatbot's trash icon / Undo / Import: stop what runs, and reset every panel -----------------------

def clear_chat(parts: ChatParts, ui: UIContext, data: dict) -> dict:
    state: chat.ChatSession = data[parts.state]
    state.interrupt(action(parts, data))
    state.settle()  # the answer's update on its way, if any, reaches the page before this reset
    ui.services.states.drop(key=state.key)
    return {parts.chatbot: [], parts.box: "", parts.notice: "", **views_reset(parts),
            **_settled(parts, data[parts.model], data[parts.system], [], parts.controls.values(data)),
            **branch_panel.forgotten(parts, state)}


def undo_turn(parts: ChatParts, data: dict) -> dict:
    state: chat.ChatSession = data[parts.state]
    state.interrupt(action(parts, data))
    state.settle()
    history, text = chat.pop_last_turn(data[parts.chatbot])
    return {parts.chatbot: history, parts.box: text or "", parts.notice: "" if text is not None else "Nothing to undo.",
            **views_reset(parts),
            **_settled(parts, data[parts.model], data[parts.system], history, parts.controls.values(data)),
            **branch_panel.forgotten(parts, state)}


def import_chat(parts: ChatParts, ui: UIContext, data: dict) -> dict:
    file = data[parts.import_btn]
    upload = Path(file if isinstance(file, str) else file.name)
    try:
        imported = chat.import_conversation(upload.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        return {parts.notice: f"⚠️ Could not import that file: {exc}"}
    finally:
        upload.unlink(missing_ok=True)  # an upload is read once and not kept
    state: chat.ChatSession = data[parts.state]
    state.interrupt(action(parts, data))
    state.settle()
    services = ui.services
    services.states.drop(key=state.key)
    name = imported.model if imported.model in services.registry.models else data[parts.model]
    notes = [] if imported.model in (None, name) else [f"The file's model {imported.model!r} is not served here; "
                                                       f"kept {name}."]
    values = settings.defaults(services.registry.get(name))
    try:
        values = settings.values_of(services.registry.get(name).sampling.replace(**imported.settings))
    except (TypeError, ValueError) as exc:
        notes.append(f"The file's sampling settings were not applied ({exc}).")
    return {parts.chatbot: imported.messages, parts.model: name, parts.system: imported.system, parts.box: "",
            **views_reset(parts), **parts.controls.update(values), parts.model_info: services.model_info(name),
            parts.forward: forward_picker.reset(services, name),
            parts.notice: " ".join(notes) or f"Imported {len(imported.messages)} message(s).",
            **_settled(parts, name, imported.system, imported.messages, values), **branch_panel.forgotten(parts, state)}


def views_reset(parts: ChatParts) -> dict:
    """The panels about the last answer, empty again."""
    return {parts.tokens_view: TOKENS_HINT, parts.decided_md: "", parts.stage_plot: None, parts.notes: "",
            parts.prompt_view: "", parts.metrics: answer_views.metrics_line(None)}


def _settled(parts: ChatParts, model: str, system: str, history: list[Any], values: dict[str, Any]) -> dict:
    """A conversation that changed for good: the browser keeps it for a reload, and the Export button's file is
    rewritten at once (so the download needs no round trip)."""
    return {parts.session.conversation: conversation(model, system, history, values),
            parts.export_btn: _export_file(model, system, history, values)}


def conversation(model: str, system: str, history: list[Any], values: dict[str, Any]) -> dict:
    """What the browser keeps of the chat (it survives a reload)."""
    messages, _ = chat.history_messages(history)
    return {"model": model, "system": system, "messages": messages, "settings": values}


def _export_file(model: str, system: str, history: list[Any], values: dict[str, Any]) -> str:
    try:
        exported = settings.to_params(values).to_dict()
    except ValueError:
        exported = {}  # settings the page cannot run are not saved either
    path = scratch_file("qdemo-conversation.json")
    path.write_text(chat.export_conversation(model, system, history or [], exported), encoding="utf-8")
    return str(path)


# --- model, preload, forward, settings, seed ------------------------------------------------------------------------

def change_model(parts: ChatParts, ui: UIContext, data: dict) -> dict:
    services = ui.services
    name = data[parts.model]
    spec = services.registry.get(name)
    values = settings.defaults(spec)
    return {**parts.controls.update(values), parts.system: spec.system_prompt or "",
            parts.model_info: services.model_info(name), parts.forward: forward_picker.reset(services, name),
            parts.decoding_line: decoding_line(spec.sampling),
            parts.assisted: gr.Checkbox(visible=spec.draft is not None, label=assisted_label(spec)),
            parts.session.conversation: conversation(name, spec.system_prompt or "", data[parts.chatbot], values)}


def follow_preload(parts: ChatParts, ui: UIContext, data: dict) -> dict:
    """Once ready the line goes (the model line says how it runs); a failure stays in view."""
    preload = ui.services.preload
    return {parts.preload_line: gr.Markdown(preload.line(), visible=not preload.ready),
            parts.timer: gr.Timer(active=not preload.finished)}


def change_forward(parts: ChatParts, ui: UIContext, data: dict) -> dict:
    return {parts.model_info: ui.services.model_info(data[parts.model], data[parts.forward])}


def describe_settings(parts: ChatParts, data: dict) -> dict:
    try:
        return {parts.decoding_line: decoding_line(settings.to_params(parts.controls.values(data)))}
    except ValueError as exc:
        return {parts.decoding_line: f"⚠️ {exc}"}


def pin_seed(parts: ChatParts, data: dict) -> dict:
    view = data[parts.state].view
    seed = view.run.prefill.seed if view is not None and view.run.prefill is not None else None
    if seed is None:
        return {parts.notice: "No seed to pin: the last answer was not sampled."}
    return {parts.controls.by_field["seed"]: str(seed),
            parts.notice: f"Seed {seed} pinned: the next answers repeat that draw."}


# --- the token view -------------------------------------------------------------------------------------------------

def show_stages(parts: ChatParts, data: dict, evt: gr.EventData) -> dict:
    view = data[parts.state].view
    index = event_index(evt)
    event = chat.token_at(view, index)
    if event is None:
        return {parts.notes: gr.skip()}
    measure = data[parts.measure]
    value = token_value(event, measure)
    title = f"token {int(index)}: {token_label(view.labels.get(event.token_id, ''))}" + (
        f" · {measure} {value:.3f}" if value is not None else "")
    return {parts.stage_plot: stage_figure(event.stages, view.labels, chosen=event.token_id, title=title,
                                           settings=view.run.settings),
            parts.notes: "\n".join(f"- {n}" for n in stage_notes(event.stages, view.run.settings))}


def recolour(parts: ChatParts, data: dict) -> dict:
    view = data[parts.state].view
    out = {parts.legend: token_legend_html(data[parts.measure])}
    if view is not None:
        out[parts.tokens_view] = view_html(view, data[parts.measure], data[parts.decided])
    return out
