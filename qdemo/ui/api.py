"""Named API endpoints for gradio_client: /chat (streams the answer), /compare, /next_token, /batch, /sweep, the
blind arena's /arena_battle, /arena_vote and /arena_leaderboard (and the Inspect views' endpoints,
qdemo.ui.api_probes). Each reads its arguments at the boundary through one strict reader
(qdemo.services.arguments), calls the same services the page calls and converts their results into JSON; the flow
(admission, the turn, its run) is the services'. Refusals name the field and reach the caller as a gr.Error (the
one guard in qdemo.ui.context), never a crashed worker. A caller who cancels or goes away sets the request's
`stop`, which the engine reads between prefill chunks and steps (qdemo.ui.context.stoppable)."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Iterator

import gradio as gr

from qdemo.core.runs import RunRecord
from qdemo.services import arena as arena_service
from qdemo.services import batch as batch_service
from qdemo.services import chat, history, lab
from qdemo.services import compare as compare_service
from qdemo.services import sweep as sweep_service
from qdemo.services.arguments import Arguments
from qdemo.ui import api_probes
from qdemo.ui.context import UIContext
from qdemo.views.answer import END_MARK, end_note
from qdemo.views.sweep_view import export_body

MAX_SEED = 2 ** 63 - 1


def register(ui: UIContext) -> None:
    for fn, name in ((chat_endpoint, "chat"), (compare_endpoint, "compare"), (next_token_endpoint, "next_token"),
                     (batch_endpoint, "batch"), (sweep_endpoint, "sweep"), (arena_battle_endpoint, "arena_battle"),
                     (arena_vote_endpoint, "arena_vote"), (arena_leaderboard_endpoint, "arena_leaderboard")):
        ui.endpoint(partial(fn, ui), name)
    api_probes.register(ui)


def chat_endpoint(ui: UIContext, message: str, history: list[dict] | None = None, model: str = "",
                  settings: dict | None = None, system: str | None = None, request: gr.Request = None,
                  stop: threading.Event | None = None) -> Iterator[str]:
    """Stream the answer to `message` after `history` ([{role, content}]). Yields the text so far."""
    args = Arguments(ui.services.limits)
    text, past = args.text(message, "message", required=True), args.history(history)
    notices = list(args.notices)
    run = None
    for run in chat.api_turn(ui.services, ui.client(request), text, past, args.model(model), args.settings(settings),
                             args.optional_text(system, "system"), stop=stop, notices=notices):
        if run.done is None and run.tokens:
            yield chat.answer_text(run)
    yield final_text(run, notices)


def final_text(run: RunRecord, notices: list[str]) -> str:
    """The answer as the page's bubble ends it when the server ended it (cut at the time limit, stopped) — not at
    the length the caller asked for, which it knows — then what the page's notice line would say about the request
    (a cut message, turns left out, max new tokens lowered). Both sit behind the page's invisible end mark, so a
    caller who sends the answer back in a history never sends them to the model."""
    asked = run.done is not None and run.done.reason == "max_tokens"
    text = chat.answer_text(run) + ("" if asked else end_note(run))
    notice = " ".join(dict.fromkeys(n for n in notices if n))
    if notice:
        text += ("\n\n" if END_MARK in text else f"\n\n{END_MARK}") + notice
    return text


def compare_endpoint(ui: UIContext, prompt: str, model_a: str = "", model_b: str = "", settings_a: dict | None = None,
                     settings_b: dict | None = None, seed: int = 1234, request: gr.Request = None,
                     stop: threading.Event | None = None) -> dict[str, Any]:
    """Both answers to one prompt with one seed, and where they diverge."""
    args = Arguments(ui.services.limits)
    text = args.text(prompt, "prompt", required=True)
    session = compare_service.CompareSession(stop)  # the caller's own stop: set when it goes
    final = None
    for final in compare_service.compare(ui.services, session, ui.client(request), text,
                                         args.model(model_a, "model_a"), args.model(model_b, "model_b"),
                                         args.settings(settings_a, "settings_a"),
                                         args.settings(settings_b, "settings_b"),
                                         args.whole(seed, "seed", 0, MAX_SEED, default=1234), 1, top_n=0):
        pass
    return {"a": _summary(final.a), "b": _summary(final.b), "divergence": final.report, "notice": args.notice}


def next_token_endpoint(ui: UIContext, context: str, model: str = "", settings: dict | None = None,
                        mode: str = "chat", top_n: int = 20, request: gr.Request = None) -> dict[str, Any]:
    """The next-token distribution after `context`, stage by stage (no generation)."""
    args = Arguments(ui.services.limits)
    text = args.text(context, "context")
    report = lab.next_token_report(ui.services, ui.client(request), text, args.model(model), args.settings(settings),
                                   args.choice(mode, "mode", lab.CONTEXT_MODES, default="chat"),
                                   args.whole(top_n, "top_n", 1, lab.MAX_TOP_N, default=20))
    return {**report, "notice": args.notice}


def batch_endpoint(ui: UIContext, prompts: list[str], model: str = "", settings: dict | None = None,
                   mode: str = "chat", task: str = "generate", request: gr.Request = None,
                   stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Up to 8 prompts in one left-padded batch: "generate" answers each, "score" gives each text's tokens
    with their log-probability and its perplexity."""
    args = Arguments(ui.services.limits)
    texts = args.texts(prompts, "prompts", batch_service.MAX_PROMPTS)
    how = args.choice(task, "task", batch_service.TASKS, default="generate")
    rows = batch_service.batch(ui.services, ui.client(request), texts, args.model(model), args.settings(settings),
                               args.choice(mode, "mode", lab.CONTEXT_MODES, default="chat"), how, stop)
    return [{**row, "notice": args.cuts.get(f"prompts {i}", "")} for i, row in enumerate(rows)]


def sweep_endpoint(ui: UIContext, context: str, axes: dict, model: str = "", settings: dict | None = None,
                   mode: str = "chat", samples: int = 8, seed: int = 0, request: gr.Request = None,
                   stop: threading.Event | None = None) -> dict[str, Any]:
    """A sampling sweep: `axes` ({field: [values]}, one or two of temperature, top_k, top_p, min_p,
    repetition_penalty, up to 5 values each) × `samples` seeded samples per cell, after one shared prefill; per
    cell its settings, seeds, measures and texts."""
    args = Arguments(ui.services.limits)
    text = args.text(context, "context", required=True)
    final = None
    for final in sweep_service.sweep(ui.services, ui.client(request), text,
                                     args.choice(mode, "mode", lab.CONTEXT_MODES, default="chat"), args.model(model),
                                     args.settings(settings), axes, samples, seed, stop):
        pass
    cells = export_body(sweep_service.view_cells(final), {})["cells"]
    history.keep_sweep(ui.services.store, history.client_owner(ui.client(request)), model or ui.services.default_model,
                       final.forward, {"axes": axes, "samples": samples, "seed": seed, "context": text},
                       {"cells": cells})
    return {"cells": cells, "rows_done": final.rows_done, "rows_total": final.rows_total,
            "notice": " ".join(n for n in (args.notice, final.notice) if n)}


def arena_battle_endpoint(ui: UIContext, prompt: str, contenders: list[str] | None = None,
                          request: gr.Request = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """A blind battle: two contenders drawn at random (from `contenders`, names from /arena_leaderboard's
    `contenders`, when given) answer `prompt` as Model A and Model B. Answers the battle_id, both answers and
    whether the battle can be voted on (/arena_vote, from the same session)."""
    args = Arguments(ui.services.limits)
    text = args.text(prompt, "prompt", required=True)
    final = None
    for final in arena_service.battle(ui.services, arena_service.arena_of(ui.services), ui.client(request), text,
                                      stop=stop, among=contenders):
        pass
    return {**final.to_dict(), "notice": " ".join(n for n in (args.notice, final.status) if n)}


def arena_vote_endpoint(ui: UIContext, battle_id: str, outcome: str, request: gr.Request = None) -> dict[str, Any]:
    """One vote on a battle this session started: outcome a, b, tie or both_bad. Answers who A and B were, where
    their answers first diverged, and the votes so far."""
    arena = arena_service.arena_of(ui.services)
    return arena_service.vote(ui.services, arena, ui.client(request), battle_id, outcome).to_dict()


def arena_leaderboard_endpoint(ui: UIContext, request: gr.Request = None) -> dict[str, Any]:
    """The arena's Bradley–Terry ratings with 95 % bootstrap intervals and vote counts, best first, and the
    win-rate matrix (names, and rows of shares; null where two never met); `contenders`: every contender's name."""
    arena = arena_service.arena_of(ui.services)
    return {**arena_service.standings(ui.services, arena, ui.client(request)).to_dict(),
            "contenders": [c.name for c in arena.contenders]}


def _summary(run: RunRecord) -> dict[str, Any]:
    done = run.done
    return {"model": run.model, "text": done.text if done else "", "reason": done.reason if done else None,
            "tokens": list(done.token_ids) if done else [], "error": done.error if done else None,
            "ttft_s": done.stats.ttft_seconds if done else None,
            "decode_tok_s": done.stats.decode_tokens_per_s if done else None,
            "prompt_tokens": len(run.prefill.prompt_ids) if run.prefill else None,
            "reused_tokens": run.prefill.reused_tokens if run.prefill else 0}
