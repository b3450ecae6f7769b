"""How an answer's state reads in the Chat and Compare tabs: the live metrics strip under the chat, and the note a
stopped, cut or failed answer carries. The note is plain words in glyphs every font has (no Markdown markup: an
answer cut inside a code fence would swallow it); the chat shows it as a bubble of its own after the answer, the
API and Compare after the answer's text. Either way it follows an invisible mark, so the services never send it
back to the model."""

from __future__ import annotations

from qdemo.core.runs import RunRecord
from qdemo.views.card import human_bytes
from qdemo.views.perf import reason_words

# An answer that did not end by itself gets a note in its bubble after this invisible separator.
END_MARK = "\u2063"
WAITING = "**waiting** for the model (queued or loading)…"
STOPPED_BEFORE_START = "**stopped** before the answer started"


def metrics_line(run: RunRecord | None) -> str:
    """The live metrics strip: what is happening, TTFT, tok/s, tokens, KV cache, memory, seed."""
    if run is None:
        return "TTFT – · tok/s – · tokens 0 · KV – · peak –"
    p = run.progress
    if p is not None and run.done is None and not run.tokens:
        return (f"**{p.phase}** · step {p.step} of ≤ {p.total} · {p.seconds:.1f} s · KV {human_bytes(p.kv_cache_bytes)}"
                " · showing the best beam so far")
    if run.prefill is None:
        return "prefill…"
    last = run.tokens[-1] if run.tokens else None
    kv = last.kv_cache_bytes if last else run.prefill.kv_cache_bytes
    allocated = last.kv_allocated_bytes if last else run.prefill.kv_allocated_bytes  # llama.cpp: its whole context
    if run.done:
        s = run.done.stats
        head = f"**{reason_words(run.done.reason)}** · TTFT {s.ttft_seconds:.2f} s · {s.decode_tokens_per_s:.1f} tok/s"
        head += f" on {run.forward}" if run.forward else ""
        peak = s.peak_memory_bytes
    else:
        steps = [t.step_seconds for t in run.tokens[1:]][-8:]
        rate = len(steps) / sum(steps) if steps and sum(steps) > 0 else 0.0
        ttft = run.tokens[0].step_seconds if run.tokens else None
        head = f"generating · TTFT {ttft:.2f} s" if ttft is not None else "prefill done"
        head += f" · {rate:.1f} tok/s" if rate else ""
        peak = max([run.prefill.memory.used_bytes] + [t.memory.used_bytes for t in run.tokens])
    if run.prefill.memory.device == "remote":  # the cache and memory are the server's: not measured here
        line = f"{head} · tokens {len(run.tokens)} · KV and memory on the server"
    else:
        kv_text = f"{human_bytes(kv)} ({human_bytes(allocated)} allocated)" if allocated > kv else human_bytes(kv)
        line = f"{head} · tokens {len(run.tokens)} · KV {kv_text} · peak {human_bytes(peak)}"
    drafted = sum(t.drafted for t in run.tokens)
    if run.done and run.done.stats.draft_proposed:
        s = run.done.stats
        line += f" · draft accepted {s.draft_accepted} of {s.draft_proposed} ({s.draft_accepted / s.draft_proposed:.0%})"
    elif drafted:
        line += f" · {drafted} drafted tokens accepted"
    if run.prefill.reused_tokens:
        line += f" · reused {run.prefill.reused_tokens:,} of {len(run.prefill.prompt_ids):,} prompt tokens"
    if run.prefill.seed is not None:
        line += f" · seed {run.prefill.seed}"
    if run.prefill.dropped_turns:
        line += f" · dropped {len(run.prefill.dropped_turns)} old message(s) to fit the context"
    line += f" · run #{run.run_id}"
    if run.done and run.done.error:
        line += f"\n\n⚠️ {run.done.error}"
    return line


def end_words(run: RunRecord) -> str:
    """Why a stopped, cut or failed answer ended, in a sentence ("" when it ended by itself)."""
    if run.done is None or run.done.reason in ("eos", "stop_token"):
        return ""
    reason = run.done.reason
    count = len(run.tokens)
    return {"stopped": f"Stopped by you after {count} tokens.",
            "max_tokens": f"Cut at the length limit after {count} tokens (raise max new tokens for more).",
            "time_limit": f"Cut at this server's time limit per answer, after {count} tokens.",
            "error": "The answer broke off: see the message below the chat."}.get(reason, f"{reason_words(reason)}.")


def end_note(run: RunRecord) -> str:
    """The note after an answer's text (the API's answer, Compare's panes): "" when it ended by itself."""
    words = end_words(run)
    return f"\n\n{END_MARK}{words}" if words else ""


def note_message(run: RunRecord) -> dict[str, str] | None:
    """The chat's bubble after a stopped, cut or failed answer (None when it ended by itself): apart from the
    answer's own Markdown, so an open code fence cannot take it in."""
    words = end_words(run)
    return {"role": "assistant", "content": END_MARK + words} if words else None


def stopped_before_start() -> dict[str, str]:
    """The assistant bubble of an answer stopped before it began (Stop during the queue or the load)."""
    return {"role": "assistant", "content": f"{END_MARK}Stopped before the answer started."}


def prompt_cut_note(run: RunRecord) -> str:
    """What the notice line says when the conversation was cut to fit the prompt ("" when nothing was left out)."""
    dropped = run.prefill.dropped_turns if run.prefill is not None else ()
    if not dropped:
        return ""
    return (f"The conversation is too long for one prompt here: its {len(dropped)} oldest message(s) were left out, "
            f"and the prompt sent is {len(run.prefill.prompt_ids):,} tokens.")
