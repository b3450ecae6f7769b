"""The web app. For now one streaming chat page on the generation core; the full tabbed UI replaces it."""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from qdemo.engine import generate
from qdemo.errors import QdemoError
from qdemo.events import DoneEvent, PrefillEvent, TokenEvent
from qdemo.registry import Registry
from qdemo.ui.models import ModelCache

EXAMPLES = ["Write a Python function that reverses a string.", "用 Python 写一个判断质数的函数。"]


def _status(done: DoneEvent, dropped: tuple[int, ...]) -> str:
    s = done.stats
    parts = [f"{done.reason}", f"{s.new_tokens} tokens", f"TTFT {s.ttft_seconds:.2f} s",
             f"decode {s.decode_tokens_per_s:.1f} tok/s", f"peak {s.peak_memory_bytes / 2**20:.0f} MiB"]
    if dropped:
        parts.append(f"dropped {len(dropped)} old message(s) to fit the context")
    if done.error:
        parts.append(f"error: {done.error}")
    return " · ".join(parts)


def chat_stream(models: ModelCache, name: str, message: str, history: list[dict[str, Any]],
                progress: gr.Progress | None = None) -> Iterator[tuple[str, str]]:
    """Yields (answer so far, status line) for one user message."""
    if not message or not message.strip():
        yield "", "empty message ignored"
        return
    try:
        lm = models.get(name, (lambda phase, done, total: progress(done / total, desc=phase)) if progress else None)
    except (QdemoError, ValueError, OSError) as exc:
        yield "", f"could not load {name}: {exc}"
        return
    messages = [{"role": m["role"], "content": _text(m["content"])} for m in history] + [
        {"role": "user", "content": message}]
    answer, dropped = "", ()
    for event in generate(lm, messages=messages, params=lm.spec.sampling, top_n=0):
        if isinstance(event, PrefillEvent):
            dropped = event.dropped_turns
        elif isinstance(event, TokenEvent):
            answer += event.text
            yield answer, "generating…"
        elif isinstance(event, DoneEvent):
            yield answer, _status(event, dropped)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio 6 may hand back content as a list of typed parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def build_app(registry: Registry, device: str | None = None, default: str | None = None) -> gr.Blocks:
    models = ModelCache(registry, device)
    name = default or registry.default
    registry.get(name)

    def respond(message: str, history: list[dict[str, Any]], progress=gr.Progress()):
        for answer, status in chat_stream(models, name, message, history, progress):
            yield answer, status

    with gr.Blocks(title="qdemo") as demo:
        gr.Markdown(f"# qdemo\nStreaming chat with **{registry.get(name).display_name}** on the qdemo "
                    "generation core. Comparison, sampling lab and internals arrive with the full UI.")
        status = gr.Markdown("", elem_id="status")
        gr.ChatInterface(respond, additional_outputs=[status], examples=EXAMPLES, api_name="chat",
                         fill_height=False)
    return demo
