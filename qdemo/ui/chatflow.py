"""Chat turn logic shared by the Chat tab, Compare and the API endpoints. No Gradio components here:
messages in, engine events folded into a RunRecord, short strings out."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from qdemo.engine import StepLock, generate
from qdemo.limits import Limits, clean_text, cut_text
from qdemo.loader import LoadedModel
from qdemo.prompting import validate_messages
from qdemo.runs import RunRecord
from qdemo.sampling import SamplingParams
from qdemo.views.card import human_bytes

EXPORT_VERSION = 1


@dataclass(frozen=True)
class Turn:
    messages: list[dict[str, str]]  # what goes to the engine (system first when given)
    user_text: str  # what the chat shows as the user's message
    notice: str  # "" or a sentence for the user (truncation)


def prepare_turn(message: Any, history: list[dict[str, Any]], system: str | None,
                 max_chars: int = Limits.max_input_chars, max_turns: int | None = None) -> Turn | None:
    """None for empty input. The text is cleaned (control characters, invalid UTF-8); over-long input is cut to
    `max_chars` and history beyond `max_turns` turns loses its oldest ones, each with a notice."""
    text = clean_text(message) if isinstance(message, str) else ""
    if not text.strip():
        return None
    text, cut = cut_text(text, max_chars)
    notices = [cut] if cut else []
    past = history_messages(history, system)
    past, trimmed = keep_last_turns(past, max_turns)
    if trimmed:
        notices.append(f"Only the last {max_turns} turns of the conversation were sent ({trimmed} older "
                       "message(s) left out).")
    messages = past + [{"role": "user", "content": text}]
    return Turn(messages=messages, user_text=text, notice=" ".join(notices))


def keep_last_turns(messages: list[dict[str, str]], max_turns: int | None) -> tuple[list[dict[str, str]], int]:
    """At most `max_turns` turns (a user message and the answers after it) after the system message; returns the
    kept messages and how many were left out."""
    if max_turns is None:
        return messages, 0
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if len(starts) <= max_turns:
        return messages, 0
    cut = starts[-max_turns] if max_turns else len(rest)
    return system + rest[cut:], cut


def history_messages(history: list[dict[str, Any]] | None, system: str | None = None) -> list[dict[str, str]]:
    """The chatbot's messages as plain {role, content} text, with the system prompt first when given."""
    system = clean_text(system) if isinstance(system, str) else None
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": m["role"], "content": clean_text(content_text(m.get("content")))} for m in history or []
                 if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    return messages


def cap_params(params: SamplingParams, max_new_tokens: int) -> tuple[SamplingParams, str]:
    """Lower max_new_tokens to the server's limit, saying so."""
    if params.max_new_tokens <= max_new_tokens:
        return params, ""
    return (params.replace(max_new_tokens=max_new_tokens),
            f"max new tokens lowered from {params.max_new_tokens} to this server's limit of {max_new_tokens}.")


def content_text(content: Any) -> str:
    """Gradio 6 may hand a message's content back as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def stream_run(lm: LoadedModel, messages: list[dict[str, str]], params: SamplingParams, run: RunRecord,
               stop_event: threading.Event | None = None, top_n: int = 20,
               step_lock: StepLock | None = None) -> Iterator[RunRecord]:
    """Fold the engine's events into `run`, yielding it after every event. Closing this generator (a client
    that went away) closes the engine's, which drops its KV cache at once."""
    events = generate(lm, messages=messages, params=params, stop_event=stop_event, top_n=top_n,
                      step_lock=step_lock)
    try:
        for event in events:
            run.add(event)
            yield run
    finally:
        events.close()


def answer_text(run: RunRecord) -> str:
    return run.done.text if run.done else "".join(t.text for t in run.tokens)


def metrics_line(run: RunRecord | None) -> str:
    """The live metrics strip: TTFT, tok/s, tokens, KV cache, memory."""
    if run is None or run.prefill is None:
        return "TTFT – · tok/s – · tokens 0 · KV – · peak –"
    last = run.tokens[-1] if run.tokens else None
    kv = (last.kv_cache_bytes if last else run.prefill.kv_cache_bytes)
    if run.done:
        s = run.done.stats
        head = f"**{run.done.reason}** · TTFT {s.ttft_seconds:.2f} s · {s.decode_tokens_per_s:.1f} tok/s"
        peak = s.peak_memory_bytes
    else:
        steps = [t.step_seconds for t in run.tokens[1:]][-8:]
        rate = len(steps) / sum(steps) if steps and sum(steps) > 0 else 0.0
        ttft = run.tokens[0].step_seconds if run.tokens else None
        head = f"generating · TTFT {ttft:.2f} s" if ttft is not None else "prefill done"
        head += f" · {rate:.1f} tok/s" if rate else ""
        peak = max([run.prefill.memory.used_bytes] + [t.memory.used_bytes for t in run.tokens])
    line = f"{head} · tokens {len(run.tokens)} · KV {human_bytes(kv)} · peak {human_bytes(peak)}"
    if run.prefill.dropped_turns:
        line += f" · dropped {len(run.prefill.dropped_turns)} old message(s) to fit the context"
    if run.done and run.done.error:
        line += f"\n\n⚠️ {run.done.error}"
    return line


def prompt_tokens(tokenizer, ids: list[int]) -> list[tuple[str, str | None]]:
    """(token text, "special" or None) for the prompt inspector."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    return [(tokenizer.decode([i]), "special" if i in special else None) for i in ids]


def export_conversation(model: str, system: str, messages: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    return json.dumps({"qdemo_conversation": EXPORT_VERSION, "model": model, "system": system,
                       "settings": settings, "messages": history_messages(messages)}, ensure_ascii=False, indent=2)


def import_conversation(text: str) -> dict[str, Any]:
    """Parse an exported conversation; ValueError says what is wrong with the file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON file: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or "messages" not in data:
        raise ValueError("not a qdemo conversation: expected an object with a 'messages' list")
    messages = data["messages"]
    if messages:
        # A saved chat may end with the assistant's answer; check it as if a user turn followed.
        validate_messages(list(messages) + ([{"role": "user", "content": ""}]
                                            if messages[-1].get("role") == "assistant" else []))
    if any(m["role"] == "system" for m in messages):
        raise ValueError("put the system prompt in the 'system' field, not in 'messages'")
    return {"model": data.get("model"), "system": data.get("system") or "", "messages": list(messages),
            "settings": data.get("settings") or {}}
