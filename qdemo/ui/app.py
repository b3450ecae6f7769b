"""The web app: one builder per tab, sharing the session's runs and conversation. Wiring only."""

from __future__ import annotations

import dataclasses
import uuid
from functools import partial

import gradio as gr

from qdemo.models.registry import Registry
from qdemo.services import arena as arena_service
from qdemo.services import history, perf, settings
from qdemo.services.admission import Refused, Services
from qdemo.serving.limits import Limits
from qdemo.serving.pool import ModelPool
from qdemo.store import Store
from qdemo.ui import (
    api,
    chat_tab,
    compare_tab,
    inspect_tab,
    internals_tab,
    lab_tab,
    perf_tab,
)
from qdemo.ui.context import SessionComponents, UIContext

# The Chat's message box, Stop and notice on the first screen of a laptop (1366×900) and a phone (390×844): the
# title and its sentence share a line, the style block takes no room. Gradio's timer ("0.1s") is hidden inside
# text blocks (notices, captions, metrics lines, Markdown answers) and the message box, where it read as part of
# the text: every event writes the notice, so every event would show it there. A dropdown's text stops before
# its arrow. Phone widths: the chat first, shorter; tabs scroll sideways instead of hiding behind a menu.
CSS = """
#qdemo-css {display: none}
#qdemo-intro h1 {display: inline; font-size: 1.5em; margin: 0 .5em 0 0}
#qdemo-intro p {display: inline; margin: 0}
#metrics {font-variant-numeric: tabular-nums}
#chat-notice:empty {display: none}
.only-marked .tok:not(.marked) {opacity: .22}
.decided-count {margin: 0 0 4px; font-size: 13px; color: #555}
.block:has(> [data-testid="markdown-wrapper"]) > [data-testid="status-tracker"] .progress-text,
#chat-input > [data-testid="status-tracker"] .progress-text {display: none}
input[role="combobox"] {padding-right: 32px; text-overflow: ellipsis}
#chat-input textarea::placeholder {white-space: nowrap; overflow: hidden; text-overflow: ellipsis}
@media (max-width: 640px) {
  .gradio-container .app.main {padding-left: 6px !important; padding-right: 6px !important}
  #qdemo-intro p {display: none}
  #qdemo-intro h1 {margin: 0 !important; font-size: 1.3em !important}
  #chatbot {height: clamp(180px, calc(100vh - 620px), 360px) !important}
  #chat-forward .info-text, #compare-forward-a .info-text, #compare-forward-b .info-text,
  #lab-forward .info-text {display: none}
  #chat-model-info p {font-size: 12px; margin: 0}
  .tab-container button {padding: 4px 6px !important; font-size: 13px !important}
}
"""

# The key Gradio encrypts the browser's saved values with. Without one it draws a new key each process, so after a
# restart (or on another replica) the page could read back nothing: the conversation, the runs and the id that owns
# the stored history were lost. A fixed key keeps them; it guards nothing secret (the owner id is itself the random
# value, and it never leaves this browser but to this app).
BROWSER_SECRET = "qdemo-browser-state-v1"


def build_app(registry: Registry, device: str | None = None, default: str | None = None,
              limits: Limits | None = None, pool: ModelPool | None = None, allow_downloads: bool = False,
              trusted_proxies: int = 0, preload=None, store: Store | None = None,
              arena: list[str] | None = None) -> gr.Blocks:
    """The app; serve it with `.queue(**queue_settings(limits)).launch(**launch_settings(limits), ...)`."""
    name = default or registry.default
    registry.get(name)  # an unknown --model fails before anything is served
    limits = limits or Limits()
    services = Services(registry=registry, pool=pool or ModelPool(registry, device), default_model=name,
                        limits=limits, allow_downloads=allow_downloads, preload=preload, store=store)
    ui = UIContext(services, trusted_proxies=trusted_proxies)
    if arena is not None:  # the operator's choice of contenders (--arena): checked before anything is served
        try:
            services.arena = arena_service.Arena(arena_service.arena_of(services).chosen(arena, "--arena"),
                                                 book=store)
        except Refused as exc:
            raise ValueError(str(exc)) from None
    tabs = _optional_tabs()
    # Gradio's own upload/output cache: files older than an hour go, checked every hour.
    with gr.Blocks(title="qdemo", delete_cache=(3600, 3600)) as demo:
        gr.HTML("", head=f"<style>{CSS}</style>", elem_id="qdemo-css")
        gr.Markdown("# qdemo\nSee how Qwen and Baichuan models think: every token with its probabilities after each "
                    "sampling stage, side-by-side comparisons, attention, RoPE and performance.",
                    elem_id="qdemo-intro")
        session = SessionComponents(
            runs=gr.State([]),
            saved_runs=gr.BrowserState([], storage_key="qdemo-runs", secret=BROWSER_SECRET),
            conversation=gr.BrowserState({"model": name, "system": None, "messages": [], "settings": {}},
                                         storage_key="qdemo-conversation", secret=BROWSER_SECRET),
            owner=gr.BrowserState("", storage_key="qdemo-owner", secret=BROWSER_SECRET),
        )
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab.build(ui, session)
            for title, module in tabs:
                with gr.Tab(title, id=title.lower().replace(" ", "-")) as tab:
                    module.build(ui, session, tab)
        api.register(ui)
        _wire_restore(demo, ui, session)
    return demo


def _wire_restore(demo: gr.Blocks, ui: UIContext, session: SessionComponents) -> None:
    """On page load: the saved conversation and runs come back, and the model lists say what is ready now."""
    outputs = [*session.model_dropdowns, session.runs, session.chat_model, session.chat_system, session.chatbot,
               *session.chat_controls.components(), session.owner, session.chat_box, session.chat_send,
               *session.chat_edits]
    ui.on(demo.load, partial(restore, session, ui), {session.saved_runs, session.conversation, session.owner},
          list(dict.fromkeys(outputs)), notice=session.chat_notice)


def restore(session: SessionComponents, ui: UIContext, data: dict, request: gr.Request) -> dict:
    """The page as it was: its saved conversation and runs; with `?run=ID`, that stored run of this browser's,
    read-only (Inspect and the bundle read it as the chat's last answer)."""
    services = ui.services
    choices = services.choices()
    out = {d: gr.Dropdown(choices=choices) for d in session.model_dropdowns}
    out[session.runs] = perf.restored(data[session.saved_runs])
    owner = data[session.owner]
    if history.page_owner(owner) is None:  # a first visit (or a value the page could not have minted): a new id
        owner = out[session.owner] = uuid.uuid4().hex
    link = dict(getattr(request, "query_params", None) or {}).get("run")
    if link is not None:
        return {**out, **_stored_run(session, ui, history.page_owner(owner), link, out[session.runs])}
    saved = data[session.conversation] if isinstance(data[session.conversation], dict) else {}
    messages = saved.get("messages") or []
    if messages or saved.get("system") is not None:
        model = saved.get("model") if saved.get("model") in services.registry.models else services.default_model
        out[session.chat_model] = gr.Dropdown(choices=choices, value=model)
        if isinstance(saved.get("system"), str):
            out[session.chat_system] = saved["system"]
        out[session.chatbot] = messages
        try:
            values = settings.values_of(settings.to_params(saved.get("settings") or {}))
        except ValueError:
            values = {}  # settings from an older page: the model's defaults stay
        out.update(session.chat_controls.update(values))
    return out


def _stored_run(session: SessionComponents, ui: UIContext, owner: str | None, link: str, runs: list) -> dict:
    """A `?run=ID` link: the stored run in the chat, read-only; the message box says how to leave it."""
    try:
        kept = history.open_run(ui.services.store, owner, link)
    except ValueError as exc:
        return {session.chat_notice: f"⚠️ {exc}"}
    messages = [m for m in kept.messages if m.get("role") in ("user", "assistant")]
    system = next((m.get("content") for m in kept.messages if m.get("role") == "system"), None)
    run = kept.run
    model = run.model if run.model in ui.services.registry.models else ui.services.default_model
    out = {session.chatbot: messages + [{"role": "assistant", "content": run.done.text if run.done else ""}],
           session.runs: [*runs, dataclasses.replace(run, label="chat")],
           session.chat_model: gr.Dropdown(choices=ui.services.choices(), value=model),
           session.chat_box: gr.Textbox(interactive=False, placeholder="A stored run, read-only: open the app "
                                                                       "without ?run= to chat"),
           **{button: gr.Button(interactive=False) for button in (session.chat_send, *session.chat_edits)},
           session.chat_notice: f"Stored run #{kept.run_id} ({kept.kind}, {run.model}, {run.forward}): "
                                "read-only. Inspect and the bundle read its answer."}
    if system is not None:
        out[session.chat_system] = system
    return out


def _optional_tabs():
    """Tabs other than Chat, in order; each module has build(ui, session, tab)."""
    return [("Compare", compare_tab), ("Sampling lab", lab_tab), ("Internals", internals_tab),
            ("Inspect", inspect_tab), ("Performance", perf_tab)]


def queue_settings(limits: Limits) -> dict:
    """Gradio queue settings; events that run a model share one group of `limits.concurrency` slots."""
    return {"max_size": limits.queue_size, "default_concurrency_limit": limits.concurrency}


def launch_settings(limits: Limits) -> dict:
    """Gradio launch settings the app's limits decide: uploads larger than a conversation are refused."""
    return {"max_file_size": limits.max_upload_kib * 1024}
