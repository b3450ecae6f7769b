"""Sampling lab: compute one context's next-token logits once, then re-apply the sampling chain as the sliders
move (no model call), draw N samples, or append a token by hand. No Gradio here.

The model runs only in `compute` and `append` (one gated forward each). Compute and Append announce themselves
the moment they are clicked (`LabSession.expect_change`, before they wait in the queue), and Sample N waits for
them to settle, so Sample N pressed while Compute runs draws from the new logits instead of racing it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch

from qdemo.core.events import StageTopN
from qdemo.forwards.choice import ref
from qdemo.models.sources import ProgressFn
from qdemo.probes.stages import MAX_SAMPLES, sample_counts, stage_distributions
from qdemo.sampling import SamplingParams
from qdemo.services.admission import ModelRequest, Refused, Services
from qdemo.services.kept_states import client_state
from qdemo.services.settings import whole_number
from qdemo.serving.limits import clean_text, cut_text
from qdemo.serving.protocol import Backend
from qdemo.views.lab import histogram_figure
from qdemo.views.labels import token_label
from qdemo.views.stages import stage_figure, stage_table

CONTEXT_MODES = ("chat", "raw text")
DECODING = ("sample", "greedy")
TOP_TEXTS = 400  # raw top tokens decoded at Compute, so slider moves label tokens without the tokenizer
MAX_TOP_N = 200  # candidates per stage the named API lists


@dataclass(frozen=True)
class LabContext:
    """One context and its next-token logits: what the sliders re-process without calling the model."""

    model: str
    ids: tuple[int, ...]
    logits: torch.Tensor  # fp32 [vocab], on the CPU
    text: str  # the whole context as the model sees it, special tokens included
    decode: Callable[[Sequence[int]], dict[int, str]]  # labels tokens (holds the tokenizer, not the weights)


@dataclass(frozen=True)
class LabView:
    stages: tuple[StageTopN, ...]
    figure: go.Figure
    table: pd.DataFrame
    choices: list[tuple[str, int]]  # the final stage's tokens with p > 0, for the Append dropdown


class LabSession:
    """A browser session's lab: its current context, and whether a Compute or Append is on its way."""

    SETTLE_TIMEOUT_S = 120.0  # Sample N waits this long at most for a Compute that never ran (e.g. queue full)

    def __init__(self) -> None:
        self.context: LabContext | None = None
        self._settled = threading.Event()
        self._settled.set()

    def __deepcopy__(self, memo: dict) -> "LabSession":
        return type(self)()

    def expect_change(self) -> None:
        """A Compute or Append was clicked: samples wait for its context."""
        self._settled.clear()

    def settle(self) -> None:
        self._settled.set()

    def settled_context(self, timeout: float | None = None) -> "LabContext | None":
        self._settled.wait(self.SETTLE_TIMEOUT_S if timeout is None else timeout)
        return self.context


def lab_params(decoding: str, temperature: Any, top_k: Any, top_p: Any, min_p: Any,
               repetition_penalty: Any) -> SamplingParams:
    """Slider values → SamplingParams; ValueError with a readable sentence. Temperature 0 with "sample" is greedy,
    as SamplingParams defines it."""
    if decoding not in DECODING:
        raise ValueError(f"decoding must be one of {', '.join(DECODING)}, got {decoding!r}")
    try:
        return SamplingParams(do_sample=decoding == "sample", temperature=float(temperature),
                              top_k=whole_number(top_k, "top-k"), top_p=float(top_p), min_p=float(min_p),
                              repetition_penalty=float(repetition_penalty), max_new_tokens=1)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def context_ids(backend: Backend, text: str, mode: str, system: str | None = None) -> list[int]:
    """'chat': the text is a user message in the model's chat format (the answer is about to start);
    'raw text': the text itself as plain text (typed `<|im_end|>` stays text, as everywhere)."""
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context mode must be one of {', '.join(CONTEXT_MODES)}, got {mode!r}")
    if not text or not text.strip():
        raise ValueError("the context is empty: type some text first")
    if mode == "chat":
        return backend.chat_prompt([{"role": "user", "content": text}], 1, system).ids
    ids = backend.raw_text_ids(text)
    if len(ids) >= backend.max_context:
        raise ValueError(f"{backend.name}: the context has {len(ids)} tokens; the model takes {backend.max_context}")
    return ids


def _context(backend: Backend, ids: list[int]) -> LabContext:
    logits = backend.next_token_logits(ids)
    return LabContext(model=ref(backend.name, backend.forward), ids=tuple(ids), logits=logits, text=backend.decode(ids),
                      decode=backend.text_decoder())


def compute(services: Services, session: LabSession, client: str | None, model: str, text: Any, mode: str,
            progress: ProgressFn | None = None) -> tuple[LabContext, str]:
    """Tokenize the context and run the one forward; returns the context and a notice ("" or a cut message)."""
    text, notice = cut_text(clean_text(text) if isinstance(text, str) else "", services.limits.max_input_chars,
                            "context")
    try:
        with services.admit(client, ModelRequest(model, sampling=False), progress=progress) as admitted:
            services.need_logits(admitted.backend, "the sampling lab")
            try:
                ids = context_ids(admitted.backend, text, mode)
                context = _context(admitted.backend, ids)
            except ValueError as exc:
                raise Refused(str(exc)) from None
        session.context = context
    finally:
        session.settle()
    return context, notice


def append(services: Services, session: LabSession, client: str | None, token_id: Any,
           progress: ProgressFn | None = None) -> LabContext:
    """The context grown by one token, with the logits of the longer context (one forward)."""
    try:
        context = session.context
        if context is None:
            raise Refused("Compute the next-token logits first.")
        if token_id is None or token_id == "":
            raise Refused("Pick a token to append first.")
        try:
            token = int(token_id)
        except (TypeError, ValueError):
            raise Refused(f"token to append must be a token id, got {token_id!r}") from None
        with services.admit(client, ModelRequest(context.model, sampling=False), progress=progress) as admitted:
            backend = admitted.backend
            services.need_logits(backend, "the sampling lab")
            ids = list(context.ids) + [token]
            if not 0 <= token < context.logits.shape[-1]:
                raise Refused(f"token {token} is outside the vocabulary of {backend.name}")
            if len(ids) >= backend.max_context:
                raise Refused(f"{backend.name}: the context would have {len(ids)} tokens; the model takes "
                              f"{backend.max_context}. Start again from a shorter context.")
            longer = _context(backend, ids)
        session.context = longer
    finally:
        session.settle()
    return longer


def labels(context: LabContext, ids: Sequence[int]) -> dict[int, str]:
    return context.decode(ids)


def view(context: LabContext, params: SamplingParams, top_n: int = 20) -> LabView:
    """Re-apply the chain to the stored logits: stages, their figure and table, and the Append choices."""
    stages = stage_distributions(context.logits, context.ids, params, top_n=int(top_n))
    ids = {i for stage in stages for i in stage.token_ids}
    texts = context.decode(ids)
    final = stages[-1]
    chosen = final.token_ids[0] if params.greedy else None  # greedy: the argmax is what generate would pick
    title = f"{context.model} · next token after {len(context.ids)} context tokens"
    choices = [(f"{token_label(texts[i])}  · id {i} · p={p:.3f}", int(i))
               for i, p in zip(final.token_ids, final.probs) if p > 0]
    table = stage_table(stages, texts).round(4).reset_index()
    figure = stage_figure(stages, texts, chosen=chosen, title=title, settings=params.to_dict())
    return LabView(stages=stages, figure=figure, table=table, choices=choices)


def sample(session: LabSession, params: SamplingParams, n: Any, seed: Any = 0,
           top_n: int = 20) -> tuple[Counter, go.Figure]:
    """Draw n next tokens from the final distribution (no model call) and chart them as probabilities over the
    top-N plus "other", with the expected probability overlaid. Waits for a Compute that is running."""
    count = whole_number(n, "number of samples")
    if not 1 <= count <= MAX_SAMPLES:
        raise ValueError(f"number of samples must be from 1 to {MAX_SAMPLES:,}, got {count}")
    context = session.settled_context()
    if context is None:
        raise Refused("Compute the next-token logits first.")
    counts = sample_counts(context.logits, context.ids, params, count, seed=whole_number(seed or 0, "seed"))
    shown = min(int(top_n), context.logits.shape[-1])
    final = stage_distributions(context.logits, context.ids, params, top_n=shown)[-1]
    expected = {i: p for i, p in zip(final.token_ids, final.probs) if p > 0}
    title = f"{count:,} samples ({'greedy: always the argmax' if params.greedy else 'from the final stage'})"
    texts = context.decode(set(counts) | set(expected))
    return counts, histogram_figure(counts, texts, title=title, expected=expected, top_n=int(top_n))


def status_line(context: LabContext) -> str:
    return f"**{context.model}** · context {len(context.ids)} tokens · logits ready (the sliders reuse them)"


def local_context_ids(services: Services, backend: Backend, text: str, mode: str, what: str) -> list[int]:
    """The context's ids for `what`, which reads full logits: a remote entry, an empty context or a bad mode is
    refused with a message."""
    services.need_logits(backend, what)
    try:
        return context_ids(backend, text, mode)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def next_token_report(services: Services, client: str | None, text: str, model: str, settings: Any, mode: str,
                      top_n: int) -> dict[str, Any]:
    """The named API's answer: each stage's top-N (1..MAX_TOP_N) for the token after `text` (read by the endpoint:
    qdemo.services.arguments), with decoded texts."""
    with services.admit(client, ModelRequest(model, settings)) as admitted:
        backend, params = admitted.backend, admitted.params[0]
        ids = local_context_ids(services, backend, text, mode, "the next-token distribution stage by stage")
        with client_state(services.states, client, backend) as state:
            reused = state.keep_prefix(ids, len(ids) - 1) if state is not None else 0  # what the forward skips
            logits = backend.next_token_logits(ids, state=state)
        stages = stage_distributions(logits, ids, params.replace(num_beams=1), top_n=top_n)
        texts = backend.token_texts([i for s in stages for i in s.token_ids])
    return {"context_tokens": len(ids), "reused_tokens": reused, "stages": [
        {"stage": s.name, "tokens": [{"id": i, "text": texts[i], "p": p} for i, p in zip(s.token_ids, s.probs)]}
        for s in stages]}
