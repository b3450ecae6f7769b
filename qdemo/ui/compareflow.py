"""Two generations from one prompt and seed, stepped in turn so both stream at once, and what tells
them apart: the first diverging token and each side's probability of the other's token there."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from qdemo.engine import StepLock, generate
from qdemo.lab import stage_distributions
from qdemo.introspect import next_token_logits
from qdemo.loader import LoadedModel
from qdemo.runs import RunRecord
from qdemo.sampling import SamplingParams
from qdemo.views.compare import Divergence, first_divergence


@dataclass(frozen=True)
class CrossProbability:
    """At the divergence step: the probability this side gave the OTHER side's token (raw and after its
    own sampling stages), or None when that cannot be said (different tokenizers, a side had ended)."""

    raw: float | None
    final: float | None


def run_pair(lm_a: LoadedModel, lm_b: LoadedModel, messages: list[dict[str, str]], params_a: SamplingParams,
             params_b: SamplingParams, run_a: RunRecord, run_b: RunRecord,
             stop_event: threading.Event | None = None, top_n: int = 20,
             step_locks: tuple[StepLock | None, StepLock | None] = (None, None)) -> Iterator[tuple[RunRecord, RunRecord]]:
    """Alternate one event from each side until both are done; yields both records after every step."""
    streams = [generate(lm_a, messages=messages, params=params_a, stop_event=stop_event, top_n=top_n,
                        step_lock=step_locks[0]),
               generate(lm_b, messages=messages, params=params_b, stop_event=stop_event, top_n=top_n,
                        step_lock=step_locks[1])]
    records = [run_a, run_b]
    live = [0, 1]
    try:
        while live:
            for side in list(live):
                event = next(streams[side], None)
                if event is None:
                    live.remove(side)
                    continue
                records[side].add(event)
            yield run_a, run_b
    finally:  # a client that went away: both engines drop their KV caches now
        for stream in streams:
            stream.close()


def same_tokenizer(lm_a: LoadedModel, lm_b: LoadedModel) -> bool:
    return lm_a is lm_b or (lm_a.path is not None and lm_a.path == lm_b.path) or (
        len(lm_a.tokenizer) == len(lm_b.tokenizer) and lm_a.tokenizer.get_vocab() == lm_b.tokenizer.get_vocab())


def divergence(run_a: RunRecord, run_b: RunRecord) -> Divergence:
    return first_divergence([t.token_id for t in run_a.tokens], [t.token_id for t in run_b.tokens])


def cross_probability(lm: LoadedModel, run: RunRecord, params: SamplingParams, step: int,
                      other_token: int | None) -> CrossProbability:
    """This side's probability of `other_token` at `step`, recomputed with one forward over its own prompt
    and the tokens both sides share up to `step`."""
    if other_token is None or run.prefill is None:
        return CrossProbability(None, None)
    context = list(run.prefill.prompt_ids) + [t.token_id for t in run.tokens[:step]]
    logits = next_token_logits(lm, context)
    if not 0 <= other_token < logits.shape[-1]:
        return CrossProbability(None, None)
    stages = stage_distributions(logits, context, params.replace(num_beams=1), top_n=1, chosen=other_token)
    return CrossProbability(raw=stages[0].chosen_prob, final=stages[-1].chosen_prob)


def divergence_report(lm_a: LoadedModel, lm_b: LoadedModel, run_a: RunRecord, run_b: RunRecord,
                      params_a: SamplingParams, params_b: SamplingParams) -> dict:
    """Everything the Compare tab says under the panes, as plain data (also the API's answer)."""
    if not same_tokenizer(lm_a, lm_b):
        text_a, text_b = run_a.done.text if run_a.done else "", run_b.done.text if run_b.done else ""
        index = next((i for i, (x, y) in enumerate(zip(text_a, text_b)) if x != y), None)
        if index is None and len(text_a) != len(text_b):
            index = min(len(text_a), len(text_b))
        return {"level": "text", "step": index, "a_token": None, "b_token": None,
                "a_prob_of_b": None, "b_prob_of_a": None}
    d = divergence(run_a, run_b)
    report = {"level": "token", "step": d.step, "a_token": d.a_token, "b_token": d.b_token,
              "a_token_text": lm_a.tokenizer.decode([d.a_token]) if d.a_token is not None else None,
              "b_token_text": lm_b.tokenizer.decode([d.b_token]) if d.b_token is not None else None,
              "a_prob_of_b": None, "b_prob_of_a": None}
    if d.step is not None and list(run_a.prefill.prompt_ids) == list(run_b.prefill.prompt_ids):
        a = cross_probability(lm_a, run_a, params_a, d.step, d.b_token)
        b = cross_probability(lm_b, run_b, params_b, d.step, d.a_token)
        report.update(a_prob_of_b=a.final, a_raw_prob_of_b=a.raw, b_prob_of_a=b.final, b_raw_prob_of_a=b.raw)
    return report


def describe(report: dict) -> str:
    """One paragraph for people, from divergence_report's data."""
    if report["step"] is None:
        return "Both answers are identical token for token."
    if report["level"] == "text":
        return (f"The models use different tokenizers; their texts first differ at character {report['step']}.")

    def pct(p):
        return "–" if p is None else f"{p:.1%}"

    a, b = report.get("a_token_text"), report.get("b_token_text")
    return (f"The answers first diverge at token {report['step']}: A chose {a!r}, B chose {b!r}. "
            f"A gave B's token {pct(report['a_prob_of_b'])} (raw {pct(report.get('a_raw_prob_of_b'))}); "
            f"B gave A's token {pct(report['b_prob_of_a'])} (raw {pct(report.get('b_raw_prob_of_a'))}).")
