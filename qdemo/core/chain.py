"""The logits-processor chain run stage by stage, and the per-stage top-N summaries the UI shows.

Shared by the engine (every decode step) and the sampling lab (re-applied to one fixed set of logits),
so both show exactly the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor

from qdemo.core.events import StageTopN
from qdemo.sampling import RAW_STAGE

Stages = Sequence[tuple[str, LogitsProcessor]]


@torch.inference_mode()
def run_chain(logits: torch.Tensor, seq: torch.Tensor, stages: Stages, keep: bool
              ) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
    """Apply each processor in turn to [1, vocab] fp32 logits (seq: [1, len] context ids for the
    repetition penalty). Returns the final scores and, when `keep`, every stage's probabilities."""
    scores = logits
    names = [RAW_STAGE]
    probs = [torch.softmax(scores, dim=-1)] if keep else []
    for name, processor in stages:
        scores = processor(seq, scores)
        if keep:
            names.append(name)
            probs.append(torch.softmax(scores, dim=-1))
    return scores, names, probs


# How each stage of qdemo.sampling.build_stages acts on the distribution. Reshaping stages move probability but
# never mask a logit (a far-tail token can still underflow to 0 in fp32: that is rounding, not a cut, and is not
# counted). Filters set logits to -inf and softmax renormalises the rest, so every token they keep is scaled by
# 1 / (1 - removed): the stage's own top token before and after gives the removed mass without another pass over
# the vocabulary (this runs every decode step). A stage of any other name gets the exact full-vocabulary sum.
RESHAPING_STAGES = frozenset({"repetition_penalty", "temperature"})
FILTER_STAGES = frozenset({"top_k", "top_p", "min_p"})


def _exact_removed(stacked: torch.Tensor) -> torch.Tensor:
    """[stages, 1]: the previous stage's mass on the tokens each stage set to 0 (0 for the first)."""
    here, before = stacked[1:], stacked[:-1]
    cut = torch.where((here == 0) & (before > 0), before, 0.0).sum(-1)
    return torch.cat([stacked.new_zeros(1), cut]).reshape(-1, 1)


def _removed(name: str, before: float, top_prob: float, exact: float) -> float:
    """One stage's removed mass from its top token's probability one stage earlier (`before`) and here."""
    if name in RESHAPING_STAGES:
        return 0.0
    if name in FILTER_STAGES:
        return min(1.0, max(0.0, 1.0 - before / top_prob))  # rounding can put "removed nothing" a hair below 0
    return exact


@torch.inference_mode()
def summarise(names: list[str], probs: list[torch.Tensor], token: torch.Tensor, top_n: int
              ) -> tuple[int, tuple[StageTopN, ...]]:
    """Top-N of every stage, the chosen token's and the raw argmax's probability at each, and the mass each stage
    removed, in a single device→host copy. Returns (token id, summaries)."""
    stacked = torch.cat(probs, dim=0)  # [stages, vocab]
    k = min(top_n, stacked.shape[-1])
    top = torch.topk(stacked, k, dim=-1)
    chosen = stacked[:, token.reshape(-1)[0]]
    # The raw stage's top-1 is "the raw argmax" everywhere (decided.py reads it from token_ids[0]), ties included.
    argmax = stacked[:, top.indices[0, 0]]
    # Each stage's top token's probability one stage earlier (the first stage: its own, unused).
    before = torch.cat([top.values[:1, :1], stacked[:-1].gather(1, top.indices[1:, :1])])
    known = all(name in RESHAPING_STAGES or name in FILTER_STAGES for name in names[1:])
    exact = before if known else _exact_removed(stacked)  # `before` as a placeholder column: never read
    columns = [top.indices.to(torch.float64), top.values.to(torch.float64), chosen.to(torch.float64).reshape(-1, 1),
               argmax.to(torch.float64).reshape(-1, 1), before.to(torch.float64), exact.to(torch.float64),
               token.to(torch.float64).reshape(1, 1).expand(len(names), 1)]
    payload = torch.cat(columns, dim=1).cpu().tolist()
    summaries = tuple(
        StageTopN(name=name, token_ids=tuple(int(i) for i in row[:k]), probs=tuple(row[k:2 * k]),
                  chosen_prob=row[2 * k], argmax_prob=row[2 * k + 1],
                  removed=0.0 if s == 0 else _removed(name, row[2 * k + 2], row[k], row[2 * k + 3]))
        for s, (name, row) in enumerate(zip(names, payload))
    )
    return int(payload[0][2 * k + 4]), summaries
