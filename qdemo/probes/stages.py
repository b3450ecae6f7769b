"""Sampling lab: one set of next-token logits, the processor chain re-applied as often as the sliders move.

No model call here: the logits come from qdemo.probes.introspect.next_token_logits once per context.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from qdemo.core.chain import run_chain, summarise
from qdemo.core.events import StageTopN
from qdemo.sampling import SamplingParams, build_stages

MAX_SAMPLES = 10_000


def _inputs(logits: torch.Tensor, context_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 1:
        raise ValueError(f"logits must be one vector [vocab], got shape {tuple(logits.shape)}")
    if not context_ids:
        raise ValueError("the context is empty: the repetition penalty and the model need at least one token")
    seq = torch.tensor([list(context_ids)], dtype=torch.long, device=logits.device)
    return logits.to(torch.float32).reshape(1, -1), seq


def stage_distributions(logits: torch.Tensor, context_ids: Sequence[int], params: SamplingParams, top_n: int = 20,
                        chosen: int | None = None) -> tuple[StageTopN, ...]:
    """Each active stage's top-N for these logits; `chosen` (default: the final stage's most likely token)
    is the token whose probability every stage reports."""
    if not 1 <= top_n <= logits.shape[-1]:
        raise ValueError(f"top_n must be between 1 and the vocabulary size {logits.shape[-1]}, got {top_n}")
    row, seq = _inputs(logits, context_ids)
    scores, names, probs = run_chain(row, seq, build_stages(params), keep=True)
    token = torch.argmax(scores, dim=-1) if chosen is None else torch.tensor([chosen], device=row.device)
    if not 0 <= int(token) < row.shape[-1]:
        raise ValueError(f"chosen token {chosen} is outside the vocabulary (0..{row.shape[-1] - 1})")
    return summarise(names, probs, token, top_n)[1]


def sample_counts(logits: torch.Tensor, context_ids: Sequence[int], params: SamplingParams, n: int,
                  seed: int = 0) -> Counter[int]:
    """Draw n next tokens (with replacement) from the final distribution, reproducibly for a seed.
    Greedy settings always give the argmax, as generate would."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"number of samples must be an integer from 1 to {MAX_SAMPLES}, got {n!r}")
    row, seq = _inputs(logits, context_ids)
    scores, _, _ = run_chain(row, seq, build_stages(params), keep=False)
    if params.greedy:
        return Counter({int(torch.argmax(scores)): n})
    generator = torch.Generator(device=row.device)
    generator.manual_seed(seed)
    draws = torch.multinomial(torch.softmax(scores, dim=-1)[0], n, replacement=True, generator=generator)
    return Counter(draws.tolist())
