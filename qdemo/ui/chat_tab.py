"""Chat tab: layout (chat_parts) and wiring only. The turn logic lives in qdemo.services.chat, the handlers in
chat_handlers and branch_panel; views are pure functions."""

from __future__ import annotations

from functools import partial

from qdemo.ui import branch_panel
from qdemo.ui import chat_handlers as on_chat
from qdemo.ui.chat_parts import ACTION_JS, ChatParts, layout
from qdemo.ui.context import SessionComponents, UIContext

# Everything that changes the chat (Send's and Regenerate's first step, Clear, Undo, Import, Stop's second half)
# runs in one queued group, one event at a time: each happens in the order the page sent it, and its update reaches
# the page through the session's one message stream after the answer's last update (an unqueued event's reply
# travels apart and could overtake it). Each takes milliseconds, so one at a time for the whole app keeps no one
# waiting. Each carries the page's number for it (ACTION_JS, with `parts.action` among its inputs): two requests
# can still reach the server the other way round.
ORDERED = {"queue": True, "concurrency_id": "chat-edits", "concurrency_limit": 1, "show_progress": "hidden",
           "js": ACTION_JS}


def build(ui: UIContext, session: SessionComponents) -> None:
    parts = layout(ui, session)
    session.chat_model, session.chat_system, session.chatbot = parts.model, parts.system, parts.chatbot
    session.chat_state, session.chat_controls, session.chat_notice = parts.state, parts.controls, parts.notice
    session.chat_box, session.chat_send, session.chat_edits = parts.box, parts.send, [parts.regen, parts.undo]
    session.model_dropdowns.append(parts.model)
    parts.controls.wire_visibility(ui, parts.notice)
    _wire_turns(ui, parts)
    _wire_edits(ui, parts)
    _wire_settings(ui, parts)
    _wire_token_view(ui, parts)
    branch_panel.wire(ui, parts)


def _wire_turns(ui: UIContext, parts: ChatParts) -> None:
    """Send and Regenerate in two steps: a quick one (ORDERED) shows the message and arms a ticket, then the one in
    the generation group answers it. Stop twice: unqueued, so it never waits, and ORDERED, after any Send made
    before it."""
    on = partial(ui.on, notice=parts.notice)
    send = on([parts.box.submit, parts.send.click], partial(on_chat.begin, parts, ui),
              {parts.box, parts.chatbot, parts.state, parts.action},
              [parts.chatbot, parts.box, parts.metrics, parts.ticket], **ORDERED)
    regenerate = on(parts.regen.click, partial(on_chat.begin_regenerate, parts),
                    {parts.chatbot, parts.state, parts.action}, [parts.chatbot, parts.metrics, parts.ticket],
                    **ORDERED)
    session = parts.session
    inputs = {parts.chatbot, parts.model, parts.forward, parts.system, parts.state, parts.ticket, session.runs,
              session.owner,
              parts.measure, parts.decided, parts.assisted, *parts.controls.components()}
    outputs = [parts.chatbot, parts.notice, parts.metrics, parts.tokens_view, parts.legend, parts.decided_md,
               parts.stage_plot, parts.notes, parts.prompt_view, session.runs, session.saved_runs,
               *_settled_outputs(parts)]
    answer = partial(on_chat.answer, parts, ui)
    for step in (send, regenerate):
        ui.after(step, answer, inputs, outputs, notice=parts.notice, runs_model=True, show_progress_on=parts.chatbot)
    stop = partial(on_chat.stop, parts)
    on(parts.stop.click, stop, {parts.state, parts.action}, None, queue=False, js=ACTION_JS)
    on(parts.stop.click, stop, {parts.state, parts.action}, None, **ORDERED)


def _wire_edits(ui: UIContext, parts: ChatParts) -> None:
    """Clear (the button or the chatbot's trash icon), Undo and Import stop what runs (the session's interrupt) and
    reset every panel, ORDERED: the reset lands after the answer's last update. They do not use Gradio's `cancels`:
    its cancel marks the answer complete on the page at the click, while the answer's thread can still send a
    progress report or an update, which then stayed on screen over the reset (a stuck "load weights" bar, a frozen
    "generating" line). An answer still queued takes its turn and ends at once, since its ticket is gone."""
    on = partial(ui.on, notice=parts.notice)
    controls = parts.controls.components()
    reset = [parts.chatbot, parts.box, parts.notice, *on_chat.views_reset(parts), *_settled_outputs(parts)]
    on([parts.clear.click, parts.chatbot.clear], partial(on_chat.clear_chat, parts, ui),
       {parts.state, parts.action, parts.model, parts.system, *controls}, reset, **ORDERED)
    on(parts.undo.click, partial(on_chat.undo_turn, parts),
       {parts.state, parts.action, parts.chatbot, parts.model, parts.system, *controls}, reset, **ORDERED)
    on(parts.import_btn.upload, partial(on_chat.import_chat, parts, ui),
       {parts.import_btn, parts.state, parts.action, parts.model},
       [*reset, parts.model, parts.system, *controls, parts.model_info, parts.forward], **ORDERED)


def _settled_outputs(parts: ChatParts) -> list:
    return [parts.session.conversation, parts.export_btn, *branch_panel.outputs(parts)]


def _wire_settings(ui: UIContext, parts: ChatParts) -> None:
    """The model, its forward and the sampling controls; the default model's background load."""
    on = partial(ui.on, notice=parts.notice)
    controls = parts.controls.components()
    on(parts.model.input, partial(on_chat.change_model, parts, ui), {parts.model, parts.chatbot},
       [*controls, parts.system, parts.model_info, parts.forward, parts.decoding_line, parts.assisted,
        parts.session.conversation])
    if parts.timer is not None:
        on(parts.timer.tick, partial(on_chat.follow_preload, parts, ui), {parts.preload_line},
           [parts.preload_line, parts.timer], queue=False, show_progress="hidden")
    on(parts.forward.input, partial(on_chat.change_forward, parts, ui), {parts.model, parts.forward},
       [parts.model_info], queue=False)
    on([c.change for c in controls], partial(on_chat.describe_settings, parts), controls, parts.decoding_line,
       queue=False, show_progress="hidden")
    seed = parts.controls.by_field["seed"]
    on(parts.pin.click, partial(on_chat.pin_seed, parts), {parts.state}, [seed], queue=False)


def _wire_token_view(ui: UIContext, parts: ChatParts) -> None:
    on = partial(ui.on, notice=parts.notice, queue=False)
    on(parts.tokens_view.select, partial(on_chat.show_stages, parts), {parts.state, parts.measure},
       [parts.stage_plot, parts.notes])
    on([parts.measure.change, parts.decided.change], partial(on_chat.recolour, parts),
       {parts.state, parts.measure, parts.decided}, [parts.legend, parts.tokens_view])
