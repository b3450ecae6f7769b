"""The web app: one builder per tab, sharing the session's runs and conversation."""

from __future__ import annotations

import gradio as gr

from qdemo.limits import Limits
from qdemo.pool import ModelPool
from qdemo.registry import Registry
from qdemo.ui import api, chat_tab
from qdemo.ui.context import AppContext, SessionComponents

CSS = """
#metrics {font-variant-numeric: tabular-nums}
"""


def build_app(registry: Registry, device: str | None = None, default: str | None = None,
              limits: Limits | None = None, pool: ModelPool | None = None) -> gr.Blocks:
    """The app; call `.queue(**queue_settings(limits))` (or `launch_app`) before launching it."""
    name = default or registry.default
    registry.get(name)  # an unknown --model fails before anything is served
    limits = limits or Limits()
    ctx = AppContext(registry=registry, models=pool or ModelPool(registry, device), default_model=name,
                     limits=limits)
    tabs = _optional_tabs()
    with gr.Blocks(title="qdemo") as demo:
        gr.Markdown("# qdemo\nSee how Qwen and Baichuan models think: every token with its probabilities after each sampling "
                    "stage, side-by-side comparisons, attention, RoPE and performance.")
        session = SessionComponents(
            runs=gr.State([]),
            conversation=gr.BrowserState({"model": name, "system": None, "messages": []},
                                         storage_key="qdemo-conversation"),
        )
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab.build(ctx, session)
            for title, module in tabs:
                with gr.Tab(title, id=title.lower().replace(" ", "-")) as tab:
                    module.build(ctx, session, tab)
        api.register(ctx)

        def restore(saved):
            if not saved or not saved.get("messages") and saved.get("system") is None:
                return gr.skip(), gr.skip(), gr.skip()
            chosen = saved.get("model") if saved.get("model") in registry.models else name
            system_text = saved.get("system")
            return chosen, (system_text if system_text is not None else gr.skip()), saved.get("messages") or []

        demo.load(restore, session.conversation, [session.chat_model, session.chat_system, session.chatbot],
                  api_visibility="private")
    return demo


def _optional_tabs():
    """Tabs other than Chat, in order; each module has build(ctx, session, tab)."""
    from qdemo.ui import compare_tab, internals_tab, lab_tab, perf_tab

    return [("Compare", compare_tab), ("Sampling lab", lab_tab), ("Internals", internals_tab),
            ("Performance", perf_tab)]


def queue_settings(limits: Limits) -> dict:
    """Gradio queue settings; events that run a model share one group of `limits.concurrency` slots."""
    return {"max_size": limits.queue_size, "default_concurrency_limit": limits.concurrency}
