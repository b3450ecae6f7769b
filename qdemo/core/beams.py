"""Beam search on the decode state's primitives: the beams are the state's rows.

It computes what transformers' `generate(num_beams=n, do_sample=False, length_penalty=1.0, early_stopping=False)`
computes (the same top-2n continuations, the same finished-beam bookkeeping and early-stop heuristic), but a step at
a time through the step gate, so the search streams its current best beam, reports its KV cache, takes turns with
other users and stops within a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qdemo.core.decode import DecodeState, StepLock, decode_step
from qdemo.sampling import SamplingParams, build_stages

NEG = -1.0e9


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (the prompt excluded)
    step_logprobs: list[float]  # each token's processed log-probability when it was chosen (its transition score)
    score: float  # accumulated log-probability (running) or length-normalised score (finished)
    # With top_n: at each step, the top-N (token ids, log-probabilities) of the processed distribution the token
    # was chosen from. Shared with the parent, never changed in place.
    step_tops: list[tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=list)

    def extend(self, token: int, step_lp: float, score: float,
               top: tuple[tuple[int, ...], tuple[float, ...]] | None) -> Hypothesis:
        """This hypothesis followed by `token`, chosen with log-probability `step_lp` from a distribution whose
        top-N is `top` (None: not captured)."""
        tops = self.step_tops if top is None else self.step_tops + [top]
        return Hypothesis(self.tokens + [token], self.step_logprobs + [step_lp], score, tops)


@dataclass
class BeamStep:
    """After one search step: the best hypothesis so far (finished, else running) and how many steps were run."""

    step: int
    best: Hypothesis
    finished: bool = False  # the search is over


@dataclass
class _Candidate:
    """One of a step's top-scored continuations: beam `beam` followed by `token`."""

    score: float  # the beam's score plus the token's log-probability
    beam: int
    token: int
    step_lp: float  # the token's processed log-probability
    hits: bool  # the hypothesis ends here (a stop token, or the last step)


def beam_search(lm, state: DecodeState, first_logits: torch.Tensor, params: SamplingParams,
                stop_ids: set[int] | frozenset[int], lock: StepLock, length_penalty: float = 1.0, top_n: int = 0
                ) -> Iterator[BeamStep]:
    """Run the search on a state holding the prompt in ONE row (it is forked into the beams here); yields after
    every step. The caller may stop consuming at any step (Stop, time limit): the last BeamStep's `best` is then
    the answer so far. No `stop_ids`: every hypothesis runs to max_new_tokens. `top_n` > 0: hypotheses keep each
    step's top-N candidates (Hypothesis.step_tops)."""
    beams = params.num_beams
    stages = build_stages(params.replace(num_beams=1))  # the repetition penalty, as generate applies it to beams
    keep = max(2, 1 + len(stop_ids)) * beams
    state.fork(beams)
    logits = first_logits.expand(beams, -1)
    running = [Hypothesis([], [], 0.0 if b == 0 else NEG) for b in range(beams)]
    finished: list[Hypothesis] = []  # at most `beams`, best first
    improvable = True
    step = 0
    while True:
        log_probs = _processed(logits, state, stages)
        last = step + 1 >= params.max_new_tokens
        candidates, tops = _candidates(log_probs, running, keep, top_n, stop_ids, last)
        # Finished beams count only while the early-stop heuristic says an improvement is still possible.
        if improvable:
            finished = _merge_finished(finished, candidates, running, tops, beams, (step + 1) ** length_penalty)
        running, sources, tokens = _next_running(candidates, running, tops, beams)
        step += 1
        # The heuristic of early_stopping=False: stop once the best running beam cannot beat the worst finished one.
        best_possible = running[0].score / (step ** length_penalty)
        worst_finished = min(h.score for h in finished) if len(finished) == beams else NEG
        improvable = improvable and best_possible > worst_finished
        over = not improvable or all(c.hits for c in candidates)
        # While searching, the best running beam is shown; the answer is the best finished one.
        yield BeamStep(step=step, best=finished[0] if over and finished else running[0], finished=over)
        if over:
            return
        state.select(sources)  # each beam continues from the cache of the beam it extends
        logits = decode_step(lm, state, tokens, lock)


def _processed(logits: torch.Tensor, state: DecodeState, stages: list) -> torch.Tensor:
    """Each beam's log-probabilities after the processor chain (its context: the state's row)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    seq = state.tokens[:, :state.width]
    for _, processor in stages:
        log_probs = processor(seq, log_probs)
    return log_probs


def _candidates(log_probs: torch.Tensor, running: list[Hypothesis], keep: int, top_n: int,
                stop_ids: set[int] | frozenset[int], last: bool
                ) -> tuple[list[_Candidate], list[tuple[tuple[int, ...], tuple[float, ...]] | None]]:
    """The `keep` best continuations over all beams, best first, and each beam's top-N (None without top_n).
    Everything the step needs comes to the host in one copy (not one per candidate or per beam)."""
    beams, vocab = log_probs.shape
    scores = log_probs + torch.tensor([h.score for h in running], device=log_probs.device)[:, None]
    top_scores, top_index = torch.topk(scores.reshape(-1), k=keep)
    columns = [top_scores, top_index, log_probs.reshape(-1).index_select(0, top_index)]
    n = min(top_n, vocab)
    if n:
        top = torch.topk(log_probs, n, dim=-1)
        columns += [top.indices.reshape(-1), top.values.reshape(-1)]
    payload = torch.cat([c.to(torch.float64) for c in columns]).tolist()  # float64 holds ids and fp32 exactly
    candidates = []
    for score, index, step_lp in zip(payload[:keep], payload[keep:2 * keep], payload[2 * keep:3 * keep]):
        beam, token = divmod(int(index), vocab)
        candidates.append(_Candidate(score, beam, token, step_lp, last or token in stop_ids))
    tops: list[tuple[tuple[int, ...], tuple[float, ...]] | None] = [None] * beams
    if n:
        ids, values = payload[3 * keep:3 * keep + beams * n], payload[3 * keep + beams * n:]
        tops = [(tuple(int(i) for i in ids[b * n:(b + 1) * n]), tuple(values[b * n:(b + 1) * n]))
                for b in range(beams)]
    return candidates, tops


def _merge_finished(finished: list[Hypothesis], candidates: list[_Candidate], running: list[Hypothesis],
                    tops: list, beams: int, penalty: float) -> list[Hypothesis]:
    """The best `beams` finished hypotheses after this step: only candidates among the top `beams` can finish,
    scored with the length penalty (`penalty`: the new length ** length_penalty)."""
    merged = list(finished)
    for c in candidates[:beams]:
        if c.hits:
            merged.append(running[c.beam].extend(c.token, c.step_lp, c.score / penalty, tops[c.beam]))
    merged.sort(key=lambda h: -h.score)
    return merged[:beams]


def _next_running(candidates: list[_Candidate], running: list[Hypothesis], tops: list, beams: int
                  ) -> tuple[list[Hypothesis], list[int], list[int]]:
    """The running beams for the next step (the best continuations that did not end), the beam each extends (its
    cache row) and the token it feeds."""
    alive = sorted(((c.score + (NEG if c.hits else 0.0), i) for i, c in enumerate(candidates)),
                   key=lambda x: -x[0])[:beams]
    next_running, sources, tokens = [], [], []
    for score, i in alive:
        c = candidates[i]
        next_running.append(running[c.beam].extend(c.token, c.step_lp, score, tops[c.beam]))
        sources.append(c.beam)
        tokens.append(c.token)
    return next_running, sources, tokens


def transition_probs(hypothesis: Hypothesis) -> list[float]:
    """Each chosen token's probability at its step (exp of its processed log-probability)."""
    return [math.exp(lp) for lp in hypothesis.step_logprobs]


def step_candidates(hypothesis: Hypothesis) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """Each step's top-N (token ids, probabilities) of the processed distribution, when they were captured."""
    return [(ids, tuple(math.exp(lp) for lp in lps)) for ids, lps in hypothesis.step_tops]
