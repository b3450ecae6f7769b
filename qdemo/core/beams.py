"""Beam search on the decode state's primitives: the beams are the state's rows.

It computes what transformers' `generate(num_beams=n, do_sample=False, length_penalty=1.0, early_stopping=False)`
computes (the same top-2n continuations, the same finished-beam bookkeeping and early-stop heuristic), but a step at
a time through the step gate, so the search streams its current best beam, reports its KV cache, takes turns with
other users and stops within a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class BeamStep:
    """After one search step: the best hypothesis so far (finished, else running) and how many steps were run."""

    step: int
    best: Hypothesis
    finished: bool = False  # the search is over


def beam_search(lm, state: DecodeState, first_logits: torch.Tensor, params: SamplingParams,
                stop_ids: set[int], lock: StepLock, length_penalty: float = 1.0) -> Iterator[BeamStep]:
    """Run the search on a state holding the prompt in ONE row (it is forked into the beams here); yields after
    every step. The caller may stop consuming at any step (Stop, time limit): the last BeamStep's `best` is then
    the answer so far."""
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
        log_probs = torch.log_softmax(logits, dim=-1)
        seq = state.tokens[:, :state.width]
        for _, processor in stages:
            log_probs = processor(seq, log_probs)
        vocab = log_probs.shape[-1]
        scores = log_probs + torch.tensor([h.score for h in running], device=log_probs.device)[:, None]
        top_scores, top_index = torch.topk(scores.reshape(-1), k=keep)
        # The candidates' own log-probabilities come to the host with their scores: one copy, not one per candidate.
        top_lps = log_probs.reshape(-1).index_select(0, top_index)
        candidates = []
        for score, index, step_lp in zip(top_scores.tolist(), top_index.tolist(), top_lps.tolist()):
            beam, token = divmod(index, vocab)
            parent = running[beam]
            hits = token in stop_ids or step + 1 >= params.max_new_tokens
            candidates.append((score, beam, token, parent, step_lp, hits))
        # Finished beams: only candidates among the top `beams` count, scored with the length penalty, and only
        # while the early-stop heuristic says an improvement is still possible.
        if improvable:
            merged = list(finished)
            for rank, (score, beam, token, parent, step_lp, hits) in enumerate(candidates):
                if hits and rank < beams:
                    merged.append(Hypothesis(parent.tokens + [token], parent.step_logprobs + [step_lp],
                                             score / ((step + 1) ** length_penalty)))
            merged.sort(key=lambda h: -h.score)
            finished = merged[:beams]
        # Running beams for the next step: the best continuations that did not stop.
        alive = sorted(((score + (NEG if hits else 0.0), i) for i, (score, *_rest, hits) in enumerate(candidates)),
                       key=lambda x: -x[0])[:beams]
        next_running, sources, tokens = [], [], []
        for score, i in alive:
            _, beam, token, parent, step_lp, _ = candidates[i]
            next_running.append(Hypothesis(parent.tokens + [token], parent.step_logprobs + [step_lp], score))
            sources.append(beam)
            tokens.append(token)
        running = next_running
        step += 1
        # The heuristic of early_stopping=False: stop once the best running beam cannot beat the worst finished one.
        best_possible = running[0].score / (step ** length_penalty)
        worst_finished = min(h.score for h in finished) if len(finished) == beams else NEG
        improvable = improvable and best_possible > worst_finished
        over = not improvable or all(c[-1] for c in candidates)
        # While searching, the best running beam is shown; the answer is the best finished one.
        yield BeamStep(step=step, best=finished[0] if over and finished else running[0], finished=over)
        if over:
            return
        state.select(sources)  # each beam continues from the cache of the beam it extends
        logits = decode_step(lm, state, tokens, lock)


def transition_probs(hypothesis: Hypothesis) -> list[float]:
    """Each chosen token's probability at its step (exp of its processed log-probability)."""
    return [math.exp(lp) for lp in hypothesis.step_logprobs]
