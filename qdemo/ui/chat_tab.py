"""Chat tab: streaming chatbot, Stop/Regenerate/Undo/Clear, sampling accordion, metrics strip, token view,
prompt inspector, export/import. Handlers fold engine events (via chatflow) into component updates."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from qdemo.errors import QdemoError
from qdemo.runs import RunRecord
from qdemo.ui import chatflow
from qdemo.ui.context import AppContext, SessionComponents, StopFlag, next_run_id
from qdemo.ui.controls import build_controls, defaults_for, to_params
from qdemo.ui.zerogpu import on_gpu
from qdemo.views.labels import token_label
from qdemo.views.stages import stage_figure
from qdemo.views.tokens import probability_legend, token_highlights

UI_INTERVAL_S = 0.05
EXAMPLES = ["Write a Python function that reverses a string.", "用 Python 写一个判断质数的函数，并解释思路。",
            "Explain what a KV cache is in two sentences."]


def progress_callback(progress: gr.Progress | None):
    if progress is None:
        return None
    return lambda phase, done, total: progress(done / total if total else 0, desc=phase)


def load_or_message(ctx: AppContext, name: str, progress: gr.Progress | None):
    """(LoadedModel, "") or (None, readable error): a failed load never takes the app down."""
    try:
        return ctx.models.get(name, progress_callback(progress)), ""
    except (QdemoError, ValueError, OSError, RuntimeError) as exc:
        return None, f"⚠️ Could not load **{name}**: {exc}"


def build(ctx: AppContext, session: SessionComponents) -> None:
    spec = ctx.registry.get(ctx.default_model)
    stop = gr.State(StopFlag())
    last_run = gr.State(None)
    with gr.Row():
        model = gr.Dropdown(ctx.choices(), value=ctx.default_model, label="model", elem_id="chat-model", scale=2)
        system = gr.Textbox(spec.system_prompt or "", label="system prompt (empty: none)", lines=1, scale=3,
                            elem_id="chat-system")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="chat", height=460, elem_id="chatbot", buttons=["copy"])
            with gr.Row():
                box = gr.Textbox(placeholder="Message (Enter to send) · 输入消息", show_label=False, scale=5,
                                 elem_id="chat-input", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                stop_btn = gr.Button("Stop", elem_id="stop", variant="stop")
                regen = gr.Button("Regenerate", elem_id="regenerate")
                undo = gr.Button("Undo last turn", elem_id="undo")
                clear = gr.Button("Clear", elem_id="clear")
            metrics = gr.Markdown(chatflow.metrics_line(None), elem_id="metrics")
            with gr.Accordion("Sampling", open=False):
                controls = build_controls(spec, prefix="chat-")
                settings_note = gr.Markdown("")
            with gr.Accordion("Save / load conversation (JSON)", open=False):
                with gr.Row():
                    export_btn = gr.DownloadButton("Export JSON", elem_id="export")
                    import_btn = gr.UploadButton("Import JSON", file_types=[".json"], elem_id="import")
            gr.Examples(EXAMPLES, inputs=box, label="examples")
        with gr.Column(scale=2):
            gr.Markdown("### Token view of the last answer")
            tokens_view = gr.HighlightedText(label="tokens (click one)", elem_id="token-view",
                                             show_legend=False, combine_adjacent=False, interactive=False)
            gr.Markdown(probability_legend())
            stage_plot = gr.Plot(label="stage by stage", elem_id="stage-plot")
            with gr.Accordion("Prompt inspector", open=False):
                prompt_view = gr.HighlightedText(label="prompt tokens", color_map={"special": "#f59e0b"},
                                                 elem_id="prompt-view", interactive=False)
                prompt_ids = gr.Code(label="prompt ids", language=None, elem_id="prompt-ids")
                dropped_md = gr.Markdown("")

    session.chat_model, session.chat_system, session.chatbot = model, system, chatbot
    control_values = controls.components()

    def respond(message, history, model_name, system_prompt, *rest, request: gr.Request = None,
                progress=gr.Progress()):
        *values, flag, runs = rest
        history = list(history or [])
        yield from _respond(ctx, message, history, model_name, system_prompt, values, flag, runs, progress, request)

    respond = on_gpu(respond)
    outputs = [chatbot, box, metrics, tokens_view, stage_plot, prompt_view, prompt_ids, dropped_md, session.runs,
               last_run, session.conversation, settings_note]  # in the order of OUTPUTS
    inputs = [box, chatbot, model, system, *control_values, stop, session.runs]
    submit_events = [
        box.submit(respond, inputs, outputs, api_visibility="private", **ctx.queue_kwargs()),
        send.click(respond, inputs, outputs, api_visibility="private", **ctx.queue_kwargs()),
    ]

    def regenerate(history, model_name, system_prompt, *rest, request: gr.Request = None, progress=gr.Progress()):
        *values, flag, runs = rest
        history, message = _pop_last_turn(history)
        if message is None:
            yield _updates(note="Nothing to regenerate yet.")
            return
        yield from _respond(ctx, message, history, model_name, system_prompt, values, flag, runs, progress, request)

    regenerate = on_gpu(regenerate)
    submit_events.append(regen.click(regenerate, [chatbot, model, system, *control_values, stop, session.runs],
                                     outputs, api_visibility="private", **ctx.queue_kwargs()))
    stop_btn.click(lambda flag: flag.set(), stop, None, queue=False, api_visibility="private")

    def undo_turn(history, model_name, system_prompt):
        history, text = _pop_last_turn(history)
        return history, text or "", _conversation(model_name, system_prompt, history)

    edits = [undo.click(undo_turn, [chatbot, model, system], [chatbot, box, session.conversation],
                        api_visibility="private")]
    edits.append(clear.click(lambda m, s: ([], "", _conversation(m, s, []), chatflow.metrics_line(None), [], None, None),
                [model, system], [chatbot, box, session.conversation, metrics, tokens_view, stage_plot, last_run],
                api_visibility="private"))

    def on_model_change(name, history, system_prompt):
        new_spec = ctx.registry.get(name)
        return [*defaults_for(new_spec), new_spec.system_prompt or "", _conversation(name, new_spec.system_prompt
                                                                                     or "", history or [])]

    model.input(on_model_change, [model, chatbot, system], [*control_values, system, session.conversation],
                 api_visibility="private")

    def show_stages(run: RunRecord | None, evt: gr.SelectData):
        if run is None or not run.tokens:
            return None
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not 0 <= index < len(run.tokens):
            return None
        event = run.tokens[index]
        tokenizer = ctx.models.get(run.model).tokenizer
        ids = {i for s in event.stages for i in s.token_ids} | {event.token_id}
        labels = {i: token_label(tokenizer.decode([i])) for i in ids}
        return stage_figure(event.stages, labels, chosen=event.token_id,
                            title=f"token {index}: {labels[event.token_id]} — each stage's top-N")

    tokens_view.select(show_stages, [last_run], stage_plot, api_visibility="private")

    def export(history, model_name, system_prompt, *values):
        try:
            settings = to_params(*values).to_dict()
        except ValueError:
            settings = {}
        folder = Path(tempfile.mkdtemp(prefix="qdemo-export-"))
        path = folder / "qdemo-conversation.json"
        path.write_text(chatflow.export_conversation(model_name, system_prompt, history or [], settings),
                        encoding="utf-8")
        return str(path)

    # The file is written whenever the conversation settles, so the button downloads it straight away.
    export_inputs = [chatbot, model, system, *control_values]

    def do_import(file, model_name, system_prompt, history):
        try:
            text = Path(file if isinstance(file, str) else file.name).read_text(encoding="utf-8")
            data = chatflow.import_conversation(text)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            gr.Warning(f"Could not import that file: {exc}")
            return history, model_name, system_prompt, gr.skip()
        name = data["model"] if data["model"] in ctx.registry.models else model_name
        return (data["messages"], name, data["system"],
                _conversation(name, data["system"], data["messages"]))

    edits.append(import_btn.upload(do_import, [import_btn, model, system, chatbot],
                                   [chatbot, model, system, session.conversation], api_visibility="private"))
    for event in submit_events + edits:
        event.then(export, export_inputs, export_btn, api_visibility="private")


OUTPUTS = ("chat", "box", "metrics", "tokens", "stages", "prompt", "prompt_ids", "dropped", "runs", "last_run",
           "conversation", "note")


def _updates(**values: Any) -> list[Any]:
    """The handler's outputs in OUTPUTS order; anything not named stays as it is."""
    unknown = set(values) - set(OUTPUTS)
    if unknown:
        raise TypeError(f"not a chat output: {', '.join(sorted(unknown))}")
    return [values.get(name, gr.skip()) for name in OUTPUTS]


def _pop_last_turn(history: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], str | None]:
    """The history without its last user message (and the answers after it), and that message's text."""
    history = list(history or [])
    while history and history[-1].get("role") == "assistant":
        history.pop()
    if not history:
        return history, None
    return history, chatflow.content_text(history.pop().get("content"))


def _conversation(model: str, system: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": model, "system": system, "messages": chatflow.history_messages(messages)}


def _respond(ctx: AppContext, message, history, model_name, system_prompt, values, flag: StopFlag,
             runs: list[RunRecord], progress, request: gr.Request | None = None) -> Iterator[list[Any]]:
    """One chat turn: validate, load, stream, then fill the token view and prompt inspector."""
    turn = chatflow.prepare_turn(message, history, system_prompt, ctx.limits.max_input_chars, ctx.limits.max_turns)
    if turn is None:
        yield _updates(note="Empty message ignored.")
        return
    refusal = ctx.admit(request)
    if refusal:
        yield _updates(note=f"⚠️ {refusal}")
        return
    try:
        params, capped = chatflow.cap_params(to_params(*values), ctx.limits.max_new_tokens)
    except ValueError as exc:
        yield _updates(note=f"⚠️ Sampling settings: {exc}")
        return
    lm, error = load_or_message(ctx, model_name, progress)
    if lm is None:
        yield _updates(note=error)
        return
    with ctx.generation(model_name) as (lm, step_lock):
        yield from _stream_turn(lm, step_lock, turn, history, model_name, system_prompt, params,
                                " ".join(n for n in (turn.notice, capped) if n), flag, runs)


def _stream_turn(lm, step_lock, turn: chatflow.Turn, history, model_name, system_prompt, params, note: str,
                 flag: StopFlag, runs: list[RunRecord]) -> Iterator[list[Any]]:
    shown = history + [{"role": "user", "content": turn.user_text}, {"role": "assistant", "content": ""}]
    run = RunRecord(run_id=next_run_id(runs), model=model_name, settings=params.to_dict(), label="chat")
    event = flag.arm()
    shown_at = 0.0
    try:
        for run in chatflow.stream_run(lm, turn.messages, params, run, event, step_lock=step_lock):
            # Each update re-sends the chat; more than ~20 a second would slow a fast model down to the UI's pace.
            if run.done is None and time.perf_counter() - shown_at >= UI_INTERVAL_S:
                shown[-1] = {"role": "assistant", "content": chatflow.answer_text(run)}
                yield _updates(chat=shown, box="", metrics=chatflow.metrics_line(run), note=note)
                shown_at = time.perf_counter()
    except (QdemoError, ValueError) as exc:  # prompt too long and friends: the user can act on these
        yield _updates(chat=history, box=turn.user_text, metrics=chatflow.metrics_line(None), note=f"⚠️ {exc}")
        return
    shown[-1] = {"role": "assistant", "content": chatflow.answer_text(run)}
    runs = runs + [run]
    texts = [lm.tokenizer.decode([t.token_id]) for t in run.tokens]
    prompt = list(run.prefill.prompt_ids)
    dropped = ""
    if run.prefill.dropped_turns:
        offset = 1 if turn.messages[0]["role"] == "system" else 0  # indices count the system message
        dropped = "**Dropped to fit the context:** " + ", ".join(
            f"{turn.messages[i]['role']} message {i + 1 - offset}" for i in run.prefill.dropped_turns)
    if params.beam_search:
        note = (note + " " if note else "") + "Beam search shows the answer when the search ends."
    yield _updates(chat=shown, box="", metrics=chatflow.metrics_line(run), tokens=token_highlights(run.tokens, texts),
                   stages=None, prompt=chatflow.prompt_tokens(lm.tokenizer, prompt), prompt_ids=str(prompt),
                   dropped=dropped, runs=runs, last_run=run, conversation=_conversation(model_name, system_prompt, shown),
                   note=note)
