"""What a sampling sweep reports per cell (one setting, N samples): how varied the samples are (distinct-1/2 across
them), how likely they are to the model itself (mean log-probability per token under its raw distribution), how
long they are and how many ended on their own, how much they repeat themselves, and how often a sampling stage
changed the top token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

REPEAT_N = 3  # a repeated n-gram: this many tokens that already occurred together earlier in the same sample


@dataclass(frozen=True)
class Sample:
    tokens: tuple[int, ...]
    raw_logprobs: tuple[float, ...]  # log p of each token under the model's raw distribution
    ended: bool  # it ended on its own (an end token), not at the length limit
    stage_changed: int = 0  # tokens where a stage (not the raw argmax) decided the top token


@dataclass(frozen=True)
class CellMeasures:
    samples: int
    distinct_1: float  # distinct tokens / tokens, across the cell's samples
    distinct_2: float  # distinct bigrams / bigrams, across them
    mean_logprob: float  # per token, over every token of the cell
    mean_length: float
    ended_share: float
    repeat_rate: float  # share of a sample's REPEAT_N-grams seen earlier in it, averaged over samples
    stage_changed_share: float  # share of tokens whose top token a stage changed


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled across the samples (0 when there are none)."""
    grams = [g for tokens in samples for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeat_rate(tokens: Sequence[int], n: int = REPEAT_N) -> float:
    """The share of the sample's n-grams that already occurred earlier in it."""
    grams = _ngrams(tokens, n)
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams) if grams else 0.0


def cell_measures(samples: Sequence[Sample]) -> CellMeasures:
    if not samples:
        raise ValueError("a sweep cell needs at least one sample")
    for i, s in enumerate(samples):
        if len(s.raw_logprobs) != len(s.tokens):
            raise ValueError(f"sample {i} has {len(s.tokens)} tokens but {len(s.raw_logprobs)} log-probabilities")
    tokens = [s.tokens for s in samples]
    count = sum(len(t) for t in tokens)
    return CellMeasures(
        samples=len(samples), distinct_1=distinct(tokens, 1), distinct_2=distinct(tokens, 2),
        mean_logprob=sum(sum(s.raw_logprobs) for s in samples) / count if count else float("nan"),
        mean_length=count / len(samples), ended_share=sum(s.ended for s in samples) / len(samples),
        repeat_rate=sum(repeat_rate(t) for t in tokens) / len(samples),
        stage_changed_share=sum(s.stage_changed for s in samples) / count if count else 0.0)
