"""The logits-processor chain run stage by stage, and the per-stage top-N summaries the UI shows.

Shared by the engine (every decode step) and the sampling lab (re-applied to one fixed set of logits),
so both show exactly the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor

from qdemo.events import StageTopN
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


@torch.inference_mode()
def summarise(names: list[str], probs: list[torch.Tensor], token: torch.Tensor, top_n: int
              ) -> tuple[int, tuple[StageTopN, ...]]:
    """Top-N of every stage plus the chosen token's probability at each, in a single device→host copy.
    Returns (token id, summaries)."""
    stacked = torch.cat(probs, dim=0)  # [stages, vocab]
    k = min(top_n, stacked.shape[-1])
    top = torch.topk(stacked, k, dim=-1)
    chosen = stacked[:, token.reshape(-1)[0]]
    payload = torch.cat([top.indices.to(torch.float64), top.values.to(torch.float64),
                         chosen.to(torch.float64).reshape(-1, 1),
                         token.to(torch.float64).reshape(1, 1).expand(len(names), 1)], dim=1).cpu().tolist()
    summaries = tuple(
        StageTopN(name=name, token_ids=tuple(int(i) for i in row[:k]), probs=tuple(row[k:2 * k]),
                  chosen_prob=row[2 * k])
        for name, row in zip(names, payload)
    )
    return int(payload[0][2 * k + 1]), summaries
