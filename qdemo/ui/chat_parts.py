"""The Chat tab's components, laid out: model and system prompt on top, the chat with its buttons and settings on
the left, the token view of the last answer with the branch panel and prompt inspector on the right (at phone
width the columns stack, the chat first). Layout only: the handlers are in chat_handlers, the wiring in chat_tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from qdemo.models.registry import ModelSpec
from qdemo.services import chat
from qdemo.services.admission import Services
from qdemo.ui import forward_picker
from qdemo.ui.answer_panel import DECIDED_CHOICES, MEASURE_CHOICES, TOKENS_HINT, assisted_label, decoding_line
from qdemo.ui.context import SessionComponents, UIContext
from qdemo.ui.controls import SamplingControls, build_controls
from qdemo.views import answer as answer_views
from qdemo.views.tokens import TOKEN_CLICK_JS, TOKEN_VIEW_CSS, token_legend_html

EXAMPLES = ["Write a Python function that reverses a string.", "用 Python 写一个判断质数的函数，并解释思路。",
            "Explain what a KV cache is in two sentences."]
# The page's top (title, tabs, model row) and what follows the chat to the metrics line take about 530 px.
CHATBOT_HEIGHT = "clamp(240px, calc(100vh - 530px), 460px)"
# The page numbers its chat actions (Send, Regenerate, Stop, Clear, Undo, Import) in the order the user makes them:
# two requests can reach the server the other way round, and the numbers say which was first (chat.ChatSession).
# ACTION_JS runs in the page before each such event and writes the next number into the hidden `action` box's place
# among the event's inputs (the box itself keeps ACTION_MARK).
ACTION_MARK = "qdemo-action:"
ACTION_JS = f"""(...args) => {{
    window.qdemoActions = (window.qdemoActions || 0) + 1;
    return args.map((arg) => arg === "{ACTION_MARK}" ? "{ACTION_MARK}" + window.qdemoActions : arg);
}}"""
BRANCH_HINT = ("Click a token in the token view, pick another token for that position (one a sampling stage "
               "removed, too) and generate on from there. The shared start is not computed again.")


@dataclass(frozen=True)
class BranchParts:
    """The branch panel: branch from any token of the answer, switch between the branches."""

    hint: gr.Markdown
    alt: gr.Dropdown  # what to write at the clicked token instead
    run: gr.Button
    tree: gr.Dropdown  # the branches; the chat shows the one chosen
    compare: gr.Markdown
    selected: gr.State  # the token index last clicked


@dataclass(frozen=True)
class ChatParts:
    session: SessionComponents
    state: gr.State  # chat.ChatSession
    ticket: gr.State  # the turn a Send armed, handed from its instant step to its queued one
    action: gr.Textbox  # hidden: ACTION_MARK, numbered by ACTION_JS in each chat action's inputs
    model: gr.Dropdown
    forward: gr.Radio
    model_info: gr.Markdown
    preload_line: gr.Markdown
    timer: gr.Timer | None  # follows the default model's background load; None without one
    system: gr.Textbox
    chatbot: gr.Chatbot
    box: gr.Textbox
    send: gr.Button
    stop: gr.Button
    regen: gr.Button
    undo: gr.Button
    clear: gr.Button
    notice: gr.Markdown  # where page-level refusals show
    metrics: gr.Markdown
    pin: gr.Button
    decoding_line: gr.Markdown
    controls: SamplingControls
    assisted: gr.Checkbox
    export_btn: gr.DownloadButton
    import_btn: gr.UploadButton
    measure: gr.Radio
    legend: gr.HTML
    decided: gr.Dropdown  # the token view's "show" filter
    decided_md: gr.Markdown  # the answer's which-stage-decided line
    tokens_view: gr.HTML
    stage_plot: gr.Plot
    notes: gr.Markdown
    prompt_view: gr.HTML
    branch: BranchParts


def layout(ui: UIContext, session: SessionComponents) -> ChatParts:
    services = ui.services
    spec = services.registry.get(services.default_model)
    # A closed tab's kept decode state is released at once (the pool also drops idle ones).
    state = gr.State(chat.ChatSession(), delete_callback=lambda s: services.states.drop(key=s.key))
    ticket = gr.State(None)
    action = gr.Textbox(ACTION_MARK, visible=False, elem_id="chat-action")
    top = _model_and_system(services, spec)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            talk = _conversation(services, spec)
        with gr.Column(scale=2, min_width=320):
            tokens = _token_panel()
            branch = _branch_panel()
            with gr.Accordion("Prompt inspector", open=False, elem_id="prompt-inspector"):
                prompt_view = gr.HTML("", elem_id="prompt-view")
    preload = services.preload
    # The default's background load: its progress on the page until it is ready, then the timer stops.
    timer = gr.Timer(0.5, active=not preload.finished) if preload is not None else None
    return ChatParts(session=session, state=state, ticket=ticket, action=action, timer=timer, prompt_view=prompt_view,
                     branch=branch, **top, **talk, **tokens)


def _model_and_system(services: Services, spec: ModelSpec) -> dict[str, Any]:
    # Two short rows (model and forward; the model's line and the system prompt) instead of one tall column: the
    # chat starts high enough that the message box, Stop and the notice fit a laptop's first screen.
    with gr.Row(equal_height=False):
        model = gr.Dropdown(services.choices(), value=services.default_model, label="model", elem_id="chat-model",
                            scale=1, min_width=260)
        forward = forward_picker.build(services, services.default_model, "chat-forward", scale=1)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=260):
            model_info = gr.Markdown(services.model_info(services.default_model), elem_id="chat-model-info")
            preload = services.preload
            preload_line = gr.Markdown(preload.line() if preload else "", elem_id="chat-preload",
                                       visible=preload is not None and not preload.ready)
        with gr.Column(scale=2, min_width=260):
            with gr.Accordion("System prompt", open=False, elem_id="chat-system-box"):
                system = gr.Textbox(spec.system_prompt or "", label="system prompt (empty: none)", lines=2,
                                    show_label=False, elem_id="chat-system")
    return {"model": model, "forward": forward, "model_info": model_info, "preload_line": preload_line,
            "system": system}


def _conversation(services: Services, spec: ModelSpec) -> dict[str, Any]:
    # As tall as the screen leaves room for (CHATBOT_HEIGHT): the message box, Stop and the notice under it stay on
    # the first screen.
    chatbot = gr.Chatbot(label="chat", height=CHATBOT_HEIGHT, elem_id="chatbot", buttons=["copy"])
    with gr.Row():
        box = gr.Textbox(placeholder="Message · 输入消息 (Enter to send)", show_label=False, scale=5, min_width=160,
                         elem_id="chat-input", max_lines=8)
        send = gr.Button("Send", variant="primary", scale=1, min_width=64, elem_id="send")
        stop = gr.Button("Stop", elem_id="stop", variant="stop", scale=1, min_width=64)
    notice = gr.Markdown("", elem_id="chat-notice")
    with gr.Row():
        regen = gr.Button("Regenerate", elem_id="regenerate", size="sm", min_width=60)
        undo = gr.Button("Undo", elem_id="undo", size="sm", min_width=60)
        clear = gr.Button("Clear", elem_id="clear", size="sm", min_width=60)
    with gr.Row():
        metrics = gr.Markdown(answer_views.metrics_line(None), elem_id="metrics")
        pin = gr.Button("Pin this seed", size="sm", scale=0, min_width=120, elem_id="pin-seed")
    decoding = gr.Markdown(decoding_line(spec.sampling), elem_id="chat-decoding")
    with gr.Accordion("Sampling", open=False, elem_id="chat-sampling"):
        controls = build_controls(spec, prefix="chat-")
        assisted = gr.Checkbox(services.drafting_by_default(), visible=spec.draft is not None,
                               label=assisted_label(spec), elem_id="chat-assisted",
                               info="the draft proposes a few tokens, the model checks them in one forward; "
                                    "the answer is the model's own (greedy: token for token)")
    with gr.Accordion("Save / load conversation (JSON)", open=False):
        with gr.Row():
            export_btn = gr.DownloadButton("Export JSON", elem_id="export")
            import_btn = gr.UploadButton("Import JSON", file_types=[".json"], elem_id="import")
    gr.Examples(EXAMPLES, inputs=box, label="examples", api_visibility="private")
    return {"chatbot": chatbot, "box": box, "send": send, "stop": stop, "regen": regen, "undo": undo,
            "clear": clear, "notice": notice, "metrics": metrics, "pin": pin, "decoding_line": decoding,
            "controls": controls, "assisted": assisted, "export_btn": export_btn, "import_btn": import_btn}


def _token_panel() -> dict[str, Any]:
    gr.Markdown("### Token view of the last answer")
    measure = gr.Radio(MEASURE_CHOICES, value="raw", label="colour by", elem_id="token-measure")
    legend = gr.HTML(token_legend_html("raw"), elem_id="token-legend")
    with gr.Row():
        decided = gr.Dropdown(DECIDED_CHOICES, value="all", label="show", elem_id="decided-filter", min_width=200,
                              info="which stage decided: dim the other tokens")
    decided_md = gr.Markdown("", elem_id="decided-summary")
    tokens_view = gr.HTML(TOKENS_HINT, elem_id="token-view", js_on_load=TOKEN_CLICK_JS,
                          head=f"<style>{TOKEN_VIEW_CSS}</style>")
    stage_plot = gr.Plot(label="stage by stage (click a token)", show_label=False, elem_id="stage-plot")
    notes = gr.Markdown("", elem_id="stage-notes")
    return {"measure": measure, "legend": legend, "decided": decided, "decided_md": decided_md,
            "tokens_view": tokens_view, "stage_plot": stage_plot, "notes": notes}


def _branch_panel() -> BranchParts:
    with gr.Accordion("Branch from a token", open=False, elem_id="branch-box"):
        hint = gr.Markdown(BRANCH_HINT, elem_id="branch-hint")
        with gr.Row(equal_height=True):
            alt = gr.Dropdown([], label="write this token instead", elem_id="branch-alt", scale=3, min_width=200)
            run = gr.Button("Generate from here", variant="primary", elem_id="branch-run", scale=1, min_width=120)
        tree = gr.Dropdown([], label="branches (the chat shows the one chosen)", elem_id="branch-tree")
        compare = gr.Markdown("", elem_id="branch-compare")
    selected = gr.State(None)
    return BranchParts(hint=hint, alt=alt, run=run, tree=tree, compare=compare, selected=selected)
