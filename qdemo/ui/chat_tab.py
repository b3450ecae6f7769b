"""Chat tab: wiring only. The turn logic lives in qdemo.services.chat; views are pure functions.

Handlers take set inputs (`data[component]`) and return dicts naming the components they change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from qdemo.probes.decided import decided_indices
from qdemo.services import chat, perf, settings
from qdemo.services.files import scratch_file
from qdemo.serving.remote import distribution_note
from qdemo.ui import branch_panel, forward_picker
from qdemo.ui.context import SessionComponents, UIContext, progress_callback
from qdemo.ui.controls import build_controls
from qdemo.ui.zerogpu import on_gpu
from qdemo.views import answer as answer_views
from qdemo.views.decided import decision_marks
from qdemo.views.labels import token_label
from qdemo.views.prompt import prompt_chips_html
from qdemo.views.stages import stage_figure, stage_notes
from qdemo.views.tokens import (
    TOKEN_CLICK_JS,
    TOKEN_VIEW_CSS,
    token_legend_html,
    token_value,
    token_view_html,
)

EXAMPLES = ["Write a Python function that reverses a string.", "用 Python 写一个判断质数的函数，并解释思路。",
            "Explain what a KV cache is in two sentences."]
MEASURE_CHOICES = [("raw probability", "raw"), ("after the sampling stages", "final"),
                   ("margin over the runner-up", "margin")]  # the legend says what each means
TOKENS_HINT = "<p class='tok-empty'>The tokens of the last answer appear here: hover one for its numbers, click " \
              "it for the stage-by-stage view.</p>"
# The token view's own click: which token, read from its data-i attribute.
DECIDED_CHOICES = [("all tokens", "all"), ("a stage changed the top token", "changed"),
                   ("a stage removed the raw argmax", "removed_argmax"), ("not the raw argmax", "not_argmax"),
                   ("drawn below the final top", "below_final_top")]
DECIDED_LABELS = {value: label for label, value in DECIDED_CHOICES}


def build(ui: UIContext, session: SessionComponents) -> None:
    services = ui.services
    spec = services.registry.get(services.default_model)
    # A closed tab's kept decode state is released at once (the pool also drops idle ones).
    chat_state = gr.State(chat.ChatSession(), delete_callback=lambda s: services.states.drop(key=s.key))
    ticket = gr.State(None)  # the turn a Send armed, handed from step 1 to step 2
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            model = gr.Dropdown(services.choices(), value=services.default_model, label="model",
                                elem_id="chat-model")
            forward = forward_picker.build(services, services.default_model, "chat-forward")
            model_info = gr.Markdown(services.model_info(services.default_model), elem_id="chat-model-info")
            preload = services.preload
            preload_line = gr.Markdown(preload.line() if preload else "", elem_id="chat-preload",
                                       visible=preload is not None and not preload.ready)
        with gr.Column(scale=3, min_width=280):
            with gr.Accordion("System prompt", open=False, elem_id="chat-system-box"):
                system = gr.Textbox(spec.system_prompt or "", label="system prompt (empty: none)", lines=2,
                                    show_label=False, elem_id="chat-system")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            chatbot = gr.Chatbot(label="chat", height=460, elem_id="chatbot", buttons=["copy"])
            with gr.Row():
                box = gr.Textbox(placeholder="Message (Enter to send) · 输入消息", show_label=False, scale=5,
                                 min_width=160, elem_id="chat-input", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
            with gr.Row():
                stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", size="sm", min_width=60)
                regen = gr.Button("Regenerate", elem_id="regenerate", size="sm", min_width=60)
                undo = gr.Button("Undo", elem_id="undo", size="sm", min_width=60)
                clear = gr.Button("Clear", elem_id="clear", size="sm", min_width=60)
            notice = gr.Markdown("", elem_id="chat-notice")
            with gr.Row():
                metrics = gr.Markdown(answer_views.metrics_line(None), elem_id="metrics")
                pin = gr.Button("Pin this seed", size="sm", scale=0, min_width=120, elem_id="pin-seed")
            decoding_line = gr.Markdown(_decoding(spec.sampling), elem_id="chat-decoding")
            with gr.Accordion("Sampling", open=False, elem_id="chat-sampling"):
                controls = build_controls(spec, prefix="chat-")
                assisted = gr.Checkbox(services.drafting_by_default(), visible=spec.draft is not None,
                                       label=_assisted_label(spec), elem_id="chat-assisted",
                                       info="the draft proposes a few tokens, the model checks them in one forward; "
                                            "the answer is the model's own (greedy: token for token)")
            with gr.Accordion("Save / load conversation (JSON)", open=False):
                with gr.Row():
                    export_btn = gr.DownloadButton("Export JSON", elem_id="export")
                    import_btn = gr.UploadButton("Import JSON", file_types=[".json"], elem_id="import")
            gr.Examples(EXAMPLES, inputs=box, label="examples", api_visibility="private")
        with gr.Column(scale=2, min_width=320):
            gr.Markdown("### Token view of the last answer")
            measure = gr.Radio(MEASURE_CHOICES, value="raw", label="colour by",
                               elem_id="token-measure")
            legend = gr.HTML(token_legend_html("raw"), elem_id="token-legend")
            with gr.Row():
                decided = gr.Dropdown(DECIDED_CHOICES, value="all", label="show", elem_id="decided-filter",
                                      min_width=200, info="which stage decided: dim the other tokens")
            decided_md = gr.Markdown("", elem_id="decided-summary")
            tokens_view = gr.HTML(TOKENS_HINT, elem_id="token-view", js_on_load=TOKEN_CLICK_JS,
                                  head=f"<style>{TOKEN_VIEW_CSS}</style>")
            stage_plot = gr.Plot(label="stage by stage (click a token)", show_label=False, elem_id="stage-plot")
            notes = gr.Markdown("", elem_id="stage-notes")
            branches_reset = branch_panel.build(ui, session, branch_panel.ChatParts(
                state=chat_state, chatbot=chatbot, tokens_view=tokens_view, measure=measure, decided=decided,
                decided_md=decided_md, notice=notice, metrics=metrics, controls=controls, view_html=_view_html,
                summary=_decided_summary))
            with gr.Accordion("Prompt inspector", open=False, elem_id="prompt-inspector"):
                prompt_view = gr.HTML("", elem_id="prompt-view")

    session.chat_model, session.chat_system, session.chatbot = model, system, chatbot
    session.chat_state = chat_state
    session.chat_controls = controls
    session.chat_notice = notice
    controls.wire_visibility(ui, notice)
    session.model_dropdowns.append(model)
    control_inputs = controls.components()
    views_reset = {tokens_view: TOKENS_HINT, stage_plot: None, notes: "", prompt_view: "",
                   metrics: answer_views.metrics_line(None)}

    def conversation(model_name: str, system_text: str, history: list[Any], values: dict[str, Any]) -> dict:
        messages, _ = chat.history_messages(history)
        return {"model": model_name, "system": system_text, "messages": messages, "settings": values}

    # --- Send / Regenerate: step 1 (instant) then step 2 (queued, runs the model) ---------------------------
    def begun_updates(begun: chat.Begun) -> dict:
        return {chatbot: begun.chat, notice: begun.notice, ticket: begun.ticket,
                metrics: answer_views.WAITING if begun.started else gr.skip()}

    def begin(data):
        begun = chat.begin_turn(data[chat_state], data[box], data[chatbot], services.limits)
        return {**begun_updates(begun), box: "" if begun.started else gr.skip()}

    def begin_regenerate(data):
        return begun_updates(chat.begin_regenerate(data[chat_state], data[chatbot]))

    answer_inputs = {chatbot, model, forward, system, chat_state, ticket, session.runs, measure, decided, assisted,
                     *control_inputs}
    answer_outputs = [chatbot, notice, metrics, tokens_view, legend, decided_md, stage_plot, notes, prompt_view,
                      session.runs,
                      session.saved_runs, session.conversation]

    def answer(data, request: gr.Request, progress=gr.Progress(track_tqdm=False)):
        state: chat.ChatSession = data[chat_state]
        if data[ticket] is None or state.pending != data[ticket]:
            yield {notice: gr.skip()}  # this Send armed nothing (empty, refused, or replaced)
            return
        values = controls.values(data)
        try:
            params = settings.to_params(values)
        except ValueError as exc:
            state.take(data[ticket])
            state.finish(data[ticket])
            yield {notice: f"⚠️ Sampling settings: {exc}"}
            return
        runs = list(data[session.runs] or [])
        for update in chat.answer(services, state, ui.client(request), data[chatbot],
                                  forward_picker.model_ref(data[model], data[forward]), data[system],
                                  params, perf.next_run_id(runs), progress_callback(progress),
                                  assisted=bool(data[assisted]), ticket=data[ticket]):
            out = {chatbot: update.chat, metrics: update.metrics, notice: update.notice}
            if update.view is not None:
                view = update.view
                runs = runs + [view.run]
                out.update({tokens_view: _view_html(view, data[measure], data[decided]),
                            decided_md: _decided_summary(view),
                            legend: token_legend_html(data[measure]), stage_plot: None, notes: "",
                            prompt_view: prompt_chips_html(view.prompt, view.dropped), session.runs: runs,
                            session.saved_runs: perf.saved(runs),
                            session.conversation: conversation(data[model], data[system], update.chat, values)})
            elif update.done:
                out[session.conversation] = conversation(data[model], data[system], update.chat, values)
            yield out

    answer = on_gpu(answer)
    answers = []
    for trigger in (box.submit, send.click):
        step = ui.on(trigger, begin, {box, chatbot, chat_state}, [chatbot, box, metrics, ticket], notice=notice,
                     queue=False)
        answers.append(ui.on(step.then, answer, answer_inputs, answer_outputs, notice=notice, runs_model=True,
                             show_progress_on=chatbot))
    step = ui.on(regen.click, begin_regenerate, {chatbot, chat_state}, [chatbot, metrics, ticket], notice=notice,
                 queue=False)
    answers.append(ui.on(step.then, answer, answer_inputs, answer_outputs, notice=notice, runs_model=True,
                         show_progress_on=chatbot))

    def stop(data):
        data[chat_state].stop.set()

    ui.on(stop_btn.click, stop, {chat_state}, None, notice=notice, queue=False)

    # --- Clear / trash icon / Undo / Import: stop what runs, and reset every panel ----------------------------
    def clear_chat(data):
        data[chat_state].interrupt()
        services.states.drop(key=data[chat_state].key)
        return {chatbot: [], box: "", notice: "", **views_reset,
                session.conversation: conversation(data[model], data[system], [], controls.values(data))}

    clear_inputs = {chat_state, model, system, *control_inputs}
    clear_outputs = [chatbot, box, notice, *views_reset, session.conversation]
    edits = [ui.on(trigger, clear_chat, clear_inputs, clear_outputs, notice=notice, queue=False, cancels=answers)
             for trigger in (clear.click, chatbot.clear)]

    def undo_turn(data):
        data[chat_state].interrupt()
        history, text = chat.pop_last_turn(data[chatbot])
        return {chatbot: history, box: text or "", notice: "" if text is not None else "Nothing to undo.",
                **views_reset,
                session.conversation: conversation(data[model], data[system], history, controls.values(data))}

    edits.append(ui.on(undo.click, undo_turn, {chat_state, chatbot, model, system, *control_inputs}, clear_outputs,
                       notice=notice, queue=False, cancels=answers))

    def do_import(data):
        file = data[import_btn]
        upload = Path(file if isinstance(file, str) else file.name)
        try:
            imported = chat.import_conversation(upload.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            return {notice: f"⚠️ Could not import that file: {exc}"}
        finally:
            upload.unlink(missing_ok=True)  # an upload is read once and not kept
        data[chat_state].interrupt()
        services.states.drop(key=data[chat_state].key)
        name = imported.model if imported.model in services.registry.models else data[model]
        notes_ = [] if imported.model in (None, name) else [f"The file's model {imported.model!r} is not served "
                                                            f"here; kept {name}."]
        values = settings.defaults(services.registry.get(name))
        try:
            params = services.registry.get(name).sampling.replace(**imported.settings)
            values = settings.values_of(params)
        except (TypeError, ValueError) as exc:
            notes_.append(f"The file's sampling settings were not applied ({exc}).")
        return {chatbot: imported.messages, model: name, system: imported.system, box: "", **views_reset,
                **controls.update(values), model_info: services.model_info(name),
                forward: forward_picker.reset(services, name),
                notice: " ".join(notes_) or f"Imported {len(imported.messages)} message(s).",
                session.conversation: conversation(name, imported.system, imported.messages, values)}

    edits.append(ui.on(import_btn.upload, do_import, {import_btn, chat_state, model},
                       [chatbot, model, system, box, *views_reset, *control_inputs, model_info, forward,
                        session.conversation], notice=notice))

    # --- model, seed, token view -------------------------------------------------------------------------------
    def on_model_change(data):
        name = data[model]
        new_spec = services.registry.get(name)
        values = settings.defaults(new_spec)
        return {**controls.update(values), system: new_spec.system_prompt or "", model_info: services.model_info(name),
                forward: forward_picker.reset(services, name),
                decoding_line: _decoding(new_spec.sampling),
                assisted: gr.Checkbox(visible=new_spec.draft is not None, label=_assisted_label(new_spec)),
                session.conversation: conversation(name, new_spec.system_prompt or "", data[chatbot], values)}

    ui.on(model.input, on_model_change, {model, chatbot},
          [*control_inputs, system, model_info, forward, decoding_line, assisted, session.conversation], notice=notice)

    if preload is not None:
        # The default's background load: its progress on the page until it is ready, then the timer stops.
        timer = gr.Timer(0.5, active=not preload.finished)

        def follow(data):
            # Once ready the line goes (the model line says how it runs); a failure stays in view.
            return {preload_line: gr.Markdown(preload.line(), visible=not preload.ready),
                    timer: gr.Timer(active=not preload.finished)}

        ui.on(timer.tick, follow, {preload_line}, [preload_line, timer], notice=notice, queue=False, show_progress="hidden")

    def on_forward_change(data):
        return {model_info: services.model_info(data[model], data[forward])}

    ui.on(forward.input, on_forward_change, {model, forward}, [model_info], notice=notice, queue=False)

    def describe_settings(data):
        try:
            return {decoding_line: _decoding(settings.to_params(controls.values(data)))}
        except ValueError as exc:
            return {decoding_line: f"⚠️ {exc}"}

    for component in control_inputs:
        ui.on(component.change, describe_settings, control_inputs, decoding_line, notice=notice, queue=False,
              show_progress="hidden")

    def pin_seed(data):
        view = data[chat_state].view
        seed = view.run.prefill.seed if view is not None and view.run.prefill is not None else None
        if seed is None:
            return {notice: "No seed to pin: the last answer was not sampled."}
        return {controls.by_field["seed"]: str(seed), notice: f"Seed {seed} pinned: the next answers repeat that draw."}

    ui.on(pin.click, pin_seed, {chat_state}, [controls.by_field["seed"]], notice=notice, queue=False)

    def show_stages(data, evt: gr.EventData):
        view = data[chat_state].view
        index = (evt._data or {}).get("index") if isinstance(evt._data, dict) else None
        event = chat.token_at(view, index)
        if event is None:
            return {notes: gr.skip()}
        label = token_label(view.labels.get(event.token_id, ""))
        value = token_value(event, data[measure])
        title = f"token {int(index)}: {label}" + (f" · {data[measure]} {value:.3f}" if value is not None else "")
        return {stage_plot: stage_figure(event.stages, view.labels, chosen=event.token_id, title=title,
                                         settings=view.run.settings),
                notes: "\n".join(f"- {n}" for n in stage_notes(event.stages, view.run.settings))}

    ui.on(tokens_view.select, show_stages, {chat_state, measure}, [stage_plot, notes], notice=notice, queue=False)

    def recolour(data):
        view = data[chat_state].view
        out = {legend: token_legend_html(data[measure])}
        if view is not None:
            out[tokens_view] = _view_html(view, data[measure], data[decided])
        return out

    ui.on(measure.change, recolour, {chat_state, measure, decided}, [legend, tokens_view], notice=notice,
          queue=False)
    ui.on(decided.change, recolour, {chat_state, measure, decided}, [legend, tokens_view], notice=notice,
          queue=False)

    # --- export: the file is rewritten whenever the conversation settles, so the button downloads at once ------
    def export(data):
        try:
            values = settings.to_params(controls.values(data)).to_dict()
        except ValueError:
            values = {}
        path = scratch_file("qdemo-conversation.json")
        path.write_text(chat.export_conversation(data[model], data[system], data[chatbot] or [], values),
                        encoding="utf-8")
        return {export_btn: str(path)}

    for event in answers + edits:
        ui.on(event.then, export, {chatbot, model, system, *control_inputs}, export_btn, notice=notice, queue=False)
    branches_reset(answers + edits)


def _assisted_label(spec) -> str:
    return f"speculative decoding, {spec.draft} drafting" if spec.draft else "speculative decoding"


def _marks(view, shown: Sequence[int] = ()) -> dict[int, str]:
    """Tokens the draft model proposed and the model accepted, and the `shown` ones with what decided there."""
    marks = {i: "drafted, accepted" for i, t in enumerate(view.run.tokens) if t.drafted}
    notes = decision_marks(view.decisions) if shown else {}
    for i in shown:
        marks[i] = "; ".join(m for m in (marks.get(i), notes.get(i)) if m)
    return marks


def _view_html(view, measure: str, kind: str) -> str:
    shown = decided_indices(view.decisions, kind) if kind != "all" else []
    html = token_view_html(view.run.tokens, view.texts, view.labels, measure, marks=_marks(view, shown))
    if kind == "all":
        return html
    return (f'<p class="decided-count">{len(shown)} of {len(view.run.tokens)} tokens: {DECIDED_LABELS[kind]}</p>'
            f'<div class="only-marked">{html}</div>')


def _decided_summary(view) -> str:
    if view.run.prefill is not None and view.run.prefill.memory.device == "remote":
        return (f"**Token probabilities as the server reports them** ({distribution_note()}): one distribution "
                "per token; its sampling stages ran on the server.")
    lines = view.decision_summary
    return "**Which stage decided:** " + "; ".join(lines) + "." if lines else ""


def _decoding(params) -> str:
    return f"decoding: **{settings.summary(params)}**"
