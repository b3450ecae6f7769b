"""The stage summaries (qdemo.core.chain.summarise's numbers) from a chain run on its support: a stage after a filter
is ranked among its few survivors, a full-vocabulary stage borrows the order a filter or its temperature neighbour
already sorted (dividing by a temperature keeps the order), and only the rest rank the whole vocabulary. One
device→host copy per row, as before."""

from __future__ import annotations

import torch

from qdemo.core.chain import FILTER_STAGES, RESHAPING_STAGES, summarise
from qdemo.core.events import StageTopN
from qdemo.core.support import Chained, Dist


@torch.inference_mode()
def summarise_chained(chained: Chained, token: torch.Tensor, top_n: int) -> tuple[int, tuple[StageTopN, ...]]:
    """Top-N of every stage (a stage with fewer survivors lists them, then the tokens it cut at 0, as a full-vocabulary
    ranking would), the chosen token's and the raw argmax's probability at each, and the mass each filter removed.
    Returns (token id, summaries)."""
    stages = chained.stages
    if any(d.name not in RESHAPING_STAGES | FILTER_STAGES for d in stages[1:]):
        return summarise(chained.names, chained.probs, token, top_n)  # a stage of another kind: the exact sums
    n = min(top_n, chained.size)
    tops = _tops(stages, n)
    chosen = token.reshape(1)
    pieces: list[torch.Tensor] = []
    for i, (dist, ids) in enumerate(zip(stages, tops)):
        values = dist.at(ids)
        before = stages[i - 1].at(ids[:1]) if i else values[:1]
        pieces += [ids, values, dist.at(chosen), dist.at(tops[0][:1]), before]
    flat = torch.cat([p.to(torch.float64) for p in pieces + [chosen]]).cpu().tolist()
    summaries = []
    at = 0
    for i, (dist, ids) in enumerate(zip(stages, tops)):
        k = ids.numel()
        top_ids, probs = flat[at:at + k], flat[at + k:at + 2 * k]
        chosen_p, argmax_p, before_p = flat[at + 2 * k:at + 2 * k + 3]
        at += 2 * k + 3
        removed = 0.0
        if i and dist.name in FILTER_STAGES:
            removed = min(1.0, max(0.0, 1.0 - before_p / probs[0]))  # the survivors scaled by 1 / (1 - removed)
        summaries.append(StageTopN(name=dist.name, token_ids=tuple(int(t) for t in top_ids), probs=tuple(probs),
                                   chosen_prob=chosen_p, argmax_prob=argmax_p, removed=removed))
    return int(flat[-1]), tuple(summaries)


def _tops(stages: list[Dist], n: int) -> list[torch.Tensor]:
    """Each stage's n most likely vocabulary ids, sorting as little as possible."""
    tops: list[torch.Tensor | None] = [d.order[:n] if d.ids is None and d.order is not None and d.order.numel() >= n
                                       else None for d in stages]
    for i in [*reversed(range(len(stages) - 1)), *range(1, len(stages))]:  # across a temperature, either way
        if tops[i] is None and stages[i].ids is None:
            if stages[i + 1:i + 2] and _same_order(stages[i], stages[i + 1]) and tops[i + 1] is not None:
                tops[i] = tops[i + 1]
            elif i and _same_order(stages[i - 1], stages[i]) and tops[i - 1] is not None:
                tops[i] = tops[i - 1]
    for i, dist in enumerate(stages):
        if tops[i] is None:
            tops[i] = _ranked(dist, n, tops[i - 1] if i else None)
    return tops


def _same_order(first: Dist, then: Dist) -> bool:
    """Whether `then` ranks the vocabulary as `first` does: a temperature between two full-vocabulary stages."""
    return then.name == "temperature" and first.ids is None and then.ids is None


def _ranked(dist: Dist, n: int, previous: torch.Tensor | None) -> torch.Tensor:
    """The stage's own top n; a support with fewer tokens is followed by the previous stage's tokens it cut (their
    probability here is 0), so the list is n long and a listed 0 still says every token with p > 0 is listed."""
    if dist.ids is None:
        return torch.topk(dist.probs, n).indices
    k = min(n, dist.ids.numel())
    ids = dist.ids[torch.topk(dist.probs, k).indices]
    if k == n or previous is None:
        return ids
    cut = previous[~(previous.unsqueeze(1) == dist.ids.unsqueeze(0)).any(1)]
    return torch.cat([ids, cut[:n - k]])
