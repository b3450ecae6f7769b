"""The processor chain run on the tokens that survive it, and the draw among them.

transformers' warpers work on the whole vocabulary: after top-k has left 20 of 151,936 tokens, top-p still sorts
all of them and `multinomial` still walks them all, which costs more than a decode step of a small model on a CPU.
Here each filter (top-k, top-p, min-p) narrows a *support* — the vocabulary ids still in play — and every later stage
and the draw work on it. The probabilities are the ones transformers' processors give on the full vocabulary: a
removed token's logit is -inf there, so its softmax share is exactly 0 and the survivors' shares are the softmax of
the survivors alone. A stage of any other kind (none today) runs on the full vocabulary, the support spread back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from qdemo.sampling import RAW_STAGE

FILTERS = ("top_k", "top_p", "min_p")


@dataclass
class Dist:
    """One stage's distribution: `probs` [n] over the vocabulary (`ids` None) or over the vocabulary ids `ids` [n]
    (every other token has 0). `order`: vocabulary ids by falling probability, when a filter has sorted them."""

    name: str
    probs: torch.Tensor
    ids: torch.Tensor | None = None
    order: torch.Tensor | None = None

    def at(self, vocab_ids: torch.Tensor) -> torch.Tensor:
        """The probabilities of these vocabulary ids ([m] long) here: 0 off the support."""
        if self.ids is None:
            return self.probs[vocab_ids]
        return ((self.ids.unsqueeze(0) == vocab_ids.unsqueeze(1)) * self.probs.unsqueeze(0)).sum(1)

    def full(self, size: int) -> torch.Tensor:
        """[1, size] probabilities."""
        if self.ids is None:
            return self.probs.unsqueeze(0)
        return _spread(self.probs.unsqueeze(0), self.ids, size, 0.0)


@dataclass
class Chained:
    """A row's scores after the chain: on the full vocabulary (`support` None, `scores` [1, V]) or on the support
    (`scores` [1, s] for the vocabulary ids `support` [s]). `stages`: every stage's distribution, when kept."""

    scores: torch.Tensor
    support: torch.Tensor | None
    stages: list[Dist]
    size: int  # the vocabulary's

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.stages]

    @property
    def probs(self) -> list[torch.Tensor]:
        """Every stage's [1, V] probabilities (spread out: for checks and for stages summarised the full way)."""
        return [d.full(self.size) for d in self.stages]

    def full_scores(self) -> torch.Tensor:
        """[1, V] scores, -inf off the support: what transformers' processors would have returned."""
        if self.support is None:
            return self.scores
        return _spread(self.scores, self.support, self.size, float("-inf"))


@torch.inference_mode()
def run_on_support(logits: torch.Tensor, seq: torch.Tensor, stages: list[tuple[str, LogitsProcessor]],
                   keep: bool) -> Chained:
    """Apply the named processors to [1, V] fp32 logits (seq: [1, len] context ids for the repetition penalty),
    each filter narrowing the support; with `keep`, every stage's [1, V] probabilities as well."""
    out = Chained(scores=logits, support=None, stages=[], size=logits.shape[-1])
    if keep:
        out.stages.append(_dist(out, RAW_STAGE))
    for name, processor in stages:
        if name in FILTERS:
            _filter(out, name, processor, keep)
        elif out.support is None:
            out.scores = processor(seq, out.scores)
        elif name == "temperature":
            out.scores = processor(seq, out.scores)  # elementwise: the same values on the support
        else:
            out.scores, out.support = processor(seq, out.full_scores()), None
        if keep:
            out.stages.append(_dist(out, name))
    return out


def _dist(out: Chained, name: str) -> Dist:
    return Dist(name, torch.softmax(out.scores[0], dim=-1), out.support)


def _spread(values: torch.Tensor, support: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    full = torch.full((1, size), fill, dtype=values.dtype, device=values.device)
    full[0, support] = values[0]
    return full


def _filter(out: Chained, name: str, processor: LogitsProcessor, kept: bool) -> None:
    """Narrow the support by one filter, keeping exactly the tokens transformers' warper keeps."""
    scores = out.scores[0]
    if name == "top_k":
        keep, order = _top_k(scores, int(processor.top_k))
        if kept and out.support is None and order is not None:
            out.stages[-1].order = order  # the stage before has these scores: its summary needs no sort of its own
    elif name == "min_p":
        probs = torch.softmax(scores, dim=-1)
        keep = (probs >= processor.min_p * probs.max()).nonzero().squeeze(1)  # the top token always passes
    else:  # on the full vocabulary this is transformers' own sort: the edge of a wide nucleus depends on its order
        keep = _top_p(scores, float(processor.top_p), int(processor.min_tokens_to_keep))
    finite = keep[scores[keep] > float("-inf")]  # a -inf "survivor" (fewer finite scores than k) has no share
    keep = finite if finite.numel() else keep[:1]
    out.support = keep if out.support is None else out.support[keep]
    out.scores = scores[keep].unsqueeze(0)


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The positions whose score is at least the k-th largest (ties at the edge all stay, as in TopKLogitsWarper),
    and the positions by falling score that showed it (None when a tie made it look at all of them)."""
    k = min(k, scores.numel())
    look = min(k + 1, scores.numel())
    values, positions = torch.topk(scores, look)
    if look > k and values[k] == values[k - 1]:
        return (scores >= values[k - 1]).nonzero().squeeze(1), None
    return positions[:k], positions


def _top_p(scores: torch.Tensor, top_p: float, min_keep: int) -> torch.Tensor:
    """TopPLogitsWarper on a few scores: sorted ascending, a token goes when the mass up to it is <= 1 - top_p."""
    ordered, positions = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-min_keep:] = False
    return positions[~remove]


@torch.inference_mode()
def draw(chained: Chained, generator: torch.Generator | None, exact: bool = False) -> torch.Tensor:
    """One token id ([1] long) from the chain's final distribution. Fast: a draw among the support's few tokens, or
    on the full vocabulary a uniform against the cumulative sum (no sort, no walk in Python). `exact`: torch's
    `multinomial` over the full vocabulary, as transformers' generate draws — token for token the same as it under
    the same seed, at the full vocabulary's cost."""
    if exact:
        probs = torch.softmax(chained.full_scores(), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    # With stages kept, the last one is already this softmax: the full-vocabulary one costs as much as the draw.
    probs = chained.stages[-1].probs if chained.stages else torch.softmax(chained.scores, dim=-1)[0]
    if chained.support is not None and probs.numel() <= 4096:
        index = torch.multinomial(probs, num_samples=1, generator=generator)
    else:
        cumulative = probs.cumsum(0, dtype=torch.float64)  # in float32, a 1e-9 token's step would round away
        u = torch.rand(1, generator=generator, device=probs.device, dtype=torch.float64) * cumulative[-1]
        index = torch.searchsorted(cumulative, u, right=True).clamp_(max=probs.numel() - 1)
    return index if chained.support is None else chained.support[index]
