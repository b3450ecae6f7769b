"""Score any text, and measure how two models diverge on the same text: teacher-forced, a chunk at a time.

Everything runs on the decode-state primitives (`qdemo.core.decode.position_logits`), so it works on every family and
on both forwards (torch and llama.cpp) alike, one chunk per turn at each model's step gate; memory stays one
chunk of logits per model, never [length, vocab].

Positions: position i (1 ≤ i < len(ids)) is the token ids[i], predicted from ids[:i]. `first` skips the positions
before it (a chat's prompt: context only, not scored).

Knows nothing of Gradio, services or chats: it works on token ids.
"""

from __future__ import annotations

import json
import math
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd
import torch

from qdemo.core.decode import DecodeState, ShouldStop, StepLock, position_logits
from qdemo.errors import Cut, Interrupted
from qdemo.models.loader import LoadedModel, same_tokenizer

LN2 = math.log(2.0)
_ROWS = 8  # rows of a chunk turned into fp64 statistics at once (8 × 152k × 8 bytes ≈ 10 MB per temporary)


# --- checks ---------------------------------------------------------------------------------------------------

def _check_ids(lm: LoadedModel, ids: Sequence[int], first: int, label: str = "") -> list[int]:
    name = label or lm.spec.name
    ids = lm.check_ids(ids, "the scored text (its first token is context only)", least=2)
    if lm.max_context and len(ids) > lm.max_context:
        raise ValueError(f"{len(ids)} tokens is longer than {name}'s context of {lm.max_context} tokens")
    if not 1 <= first < len(ids):
        raise ValueError(f"first must be in [1, {len(ids) - 1}] for {len(ids)} tokens, got {first}")
    return ids


def _row_blocks(n: int) -> Iterator[slice]:
    for s in range(0, n, _ROWS):
        yield slice(s, min(n, s + _ROWS))


def _token_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row of fp32 logits [n, V] and its target [n]: log p(target) (nats), rank (1 + logits strictly above
    the target's), entropy (nats), top-1 id. fp64 from log_softmax."""
    logits = logits.float()
    target_logit = logits.gather(-1, targets[:, None])
    ranks = (logits > target_logit).sum(-1) + 1
    top1 = logits.argmax(-1)
    logprob = torch.empty(len(targets), dtype=torch.float64)
    entropy = torch.empty(len(targets), dtype=torch.float64)
    for rows in _row_blocks(len(targets)):
        lp = torch.log_softmax(logits[rows].double(), dim=-1)
        logprob[rows] = lp.gather(-1, targets[rows, None])[:, 0]
        entropy[rows] = -(lp.exp() * lp).nansum(-1)  # 0 · -inf counts as 0
    return {"logprob": logprob, "rank": ranks, "entropy": entropy, "top1": top1}


def _kl_both(la: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_a‖P_b) and KL(P_b‖P_a) in nats per row, from fp32 logits [n, V] of equal width (fp64, from
    log_softmax; terms where the first distribution is 0 count 0)."""
    kl_ab = torch.empty(la.shape[0], dtype=torch.float64)
    kl_ba = torch.empty(la.shape[0], dtype=torch.float64)
    for rows in _row_blocks(la.shape[0]):
        a = torch.log_softmax(la[rows].double(), dim=-1)
        b = torch.log_softmax(lb[rows].double(), dim=-1)
        pa, pb = a.exp(), b.exp()
        kl_ab[rows] = torch.where(pa > 0, pa * (a - b), 0.0).sum(-1).clamp(min=0.0)
        kl_ba[rows] = torch.where(pb > 0, pb * (b - a), 0.0).sum(-1).clamp(min=0.0)
    return kl_ab, kl_ba


def _perplexity(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else float("nan")


def _scored_chunks(lm: LoadedModel, ids: list[int], lock: StepLock, first: int, chunk: int,
                   state: DecodeState | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(position of the first row, logits [n, V] predicting ids[pos:pos + n], those targets [n]) for every
    position from `first` on; the logits after the last token are not fed at all. A kept `state` supplies the
    context it already holds."""
    gen = position_logits(lm, ids[:-1], lock, chunk, start=first - 1, state=state)
    targets = torch.tensor(ids, dtype=torch.long)
    with closing(gen):
        for start, logits in gen:
            n = logits.shape[0]
            yield start + 1, logits, targets[start + 1:start + 1 + n]


def _clocked(should_stop: ShouldStop | None, cut: list[str]) -> Iterator[None]:
    """One step per chunk wanted: ends (noting why in `cut`) once the clock says stop. Zipped before a chunk
    generator, it is read before each chunk is asked for, so no forward starts after a stop."""
    while True:
        reason = should_stop() if should_stop is not None else None
        if reason:
            cut.append(reason)
            return
        yield None


def _cut_of(cut: list[str], done: int, total: int, what: str) -> Cut | None:
    """The Cut of a scoring run that ended early after `done` of `total` positions (Interrupted when none)."""
    if not cut:
        return None
    if not done:
        raise Interrupted(Cut(cut[0], 0, total, "tokens"), what)
    return Cut(cut[0], done, total, "tokens")


# --- scoring one text -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextScore:
    """Teacher-forced scores of one text under one model. Per scored position i (tuples, in order): the token
    ids[i], log p(ids[i] | ids[:i]) in nats, its probability, its rank (1 = the model's top choice; ties: 1 + the
    number of strictly greater logits), its surprisal in bits, the entropy of the predictive distribution in bits,
    and the model's top-1 id there."""

    model: str  # the pool's key ("name", or "name [llama.cpp]")
    forward: str  # how it ran: "torch fp32", "llama.cpp Q4_K_M"
    ids: tuple[int, ...]  # the whole text, context included
    first: int  # the first scored position
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    probs: tuple[float, ...]
    ranks: tuple[int, ...]
    surprisal_bits: tuple[float, ...]
    entropy_bits: tuple[float, ...]
    top1_ids: tuple[int, ...]
    cut: Cut | None = None  # scoring ended early (Stop, the time limit): the positions it reached

    @property
    def count(self) -> int:
        """Tokens scored."""
        return len(self.positions)

    @property
    def mean_surprisal_bits(self) -> float:
        return sum(self.surprisal_bits) / self.count

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood (nats) over the scored tokens."""
        return _perplexity(self.logprobs)

    @property
    def top1_share(self) -> float:
        """Share of scored tokens that were the model's top choice (rank 1)."""
        return sum(r == 1 for r in self.ranks) / self.count

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "forward": self.forward, "tokens_scored": self.count, "first": self.first,
                "mean_surprisal_bits": self.mean_surprisal_bits, "perplexity": self.perplexity,
                "top1_share": self.top1_share}

    def to_frame(self, texts: Mapping[int, str] | None = None):
        """A pandas frame, one row per scored token: position, token_id, [text,] logprob, prob, rank,
        surprisal_bits, entropy_bits, top1_id. `texts` maps token ids to their text (a `text` column)."""
        columns: dict[str, Any] = {"position": list(self.positions), "token_id": list(self.token_ids)}
        if texts is not None:
            columns["text"] = [texts.get(t, "") for t in self.token_ids]
        columns.update(logprob=list(self.logprobs), prob=list(self.probs), rank=list(self.ranks),
                       surprisal_bits=list(self.surprisal_bits), entropy_bits=list(self.entropy_bits),
                       top1_id=list(self.top1_ids))
        return pd.DataFrame(columns)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (a non-finite float becomes None)."""
        return _jsonable({**asdict(self), "summary": self.summary()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@torch.inference_mode()
def score_ids(lm: LoadedModel, ids: Sequence[int], lock: StepLock = nullcontext, first: int = 1, *,
              chunk: int = 32, should_stop: ShouldStop | None = None, state: DecodeState | None = None
              ) -> TextScore:
    """Score every token of `ids` from position `first` on (earlier tokens are context only) under `lm`,
    teacher-forced, `chunk` tokens per turn at the lock. `should_stop` is read before every chunk: when it says
    stop, the score holds the positions scored so far (`cut` says how many; Interrupted when none). A kept one-row
    `state` supplies the context it already holds (its longest common prefix with the ids before `first`)."""
    ids = _check_ids(lm, ids, first)
    parts: dict[str, list] = {"logprob": [], "rank": [], "entropy": [], "top1": []}
    cut: list[str] = []
    chunks = _scored_chunks(lm, ids, lock, first, chunk, state)
    with closing(chunks):
        for _, (_, logits, targets) in zip(_clocked(should_stop, cut), chunks):
            stats = _token_stats(logits, targets)
            for key in parts:
                parts[key].extend(stats[key].tolist())
    logprobs = tuple(parts["logprob"])
    end = first + len(logprobs)
    return TextScore(
        model=lm.key, forward=lm.forward_label, ids=tuple(ids), first=first,
        cut=_cut_of(cut, len(logprobs), len(ids) - first, f"{lm.spec.name}: scoring"),
        positions=tuple(range(first, end)), token_ids=tuple(ids[first:end]), logprobs=logprobs,
        probs=tuple(math.exp(x) for x in logprobs), ranks=tuple(int(r) for r in parts["rank"]),
        surprisal_bits=tuple(-x / LN2 for x in logprobs), entropy_bits=tuple(e / LN2 for e in parts["entropy"]),
        top1_ids=tuple(int(t) for t in parts["top1"]))


# --- two models on one text -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DivergentPosition:
    position: int
    token_id: int  # the text's token there
    kl_ab: float
    kl_ba: float
    top1_a: int
    top1_b: int
    prob_a: float  # each model's probability of the text's token
    prob_b: float


@dataclass(frozen=True)
class Divergence:
    """Two models teacher-forced on the same ids. Per scored position i (tuples, in order): KL(P_a‖P_b) and
    KL(P_b‖P_a) in nats between the two predictive distributions over ids[i], each model's top-1 id and its
    probability (and log-probability) of the actual token."""

    model_a: str
    model_b: str
    forward_a: str
    forward_b: str
    ids: tuple[int, ...]
    first: int
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    kl_ab: tuple[float, ...]
    kl_ba: tuple[float, ...]
    top1_a: tuple[int, ...]
    top1_b: tuple[int, ...]
    logprob_a: tuple[float, ...]
    logprob_b: tuple[float, ...]
    top: int = 10  # most_different's default
    note: str = ""  # how the distributions were compared, when not over one identical vocabulary
    compared_vocab: int = 0  # logits rows the KL covers
    cut: Cut | None = None  # ended early (Stop, the time limit): the positions both models reached

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def prob_a(self) -> tuple[float, ...]:
        return tuple(math.exp(x) for x in self.logprob_a)

    @property
    def prob_b(self) -> tuple[float, ...]:
        return tuple(math.exp(x) for x in self.logprob_b)

    @property
    def agree(self) -> tuple[bool, ...]:
        return tuple(a == b for a, b in zip(self.top1_a, self.top1_b))

    @property
    def mean_kl_ab(self) -> float:
        return sum(self.kl_ab) / self.count

    @property
    def mean_kl_ba(self) -> float:
        return sum(self.kl_ba) / self.count

    @property
    def max_kl_ab(self) -> tuple[float, int]:
        """(the largest KL(a‖b), its position); the earliest position on ties."""
        k = max(range(self.count), key=lambda j: (self.kl_ab[j], -j))
        return self.kl_ab[k], self.positions[k]

    @property
    def max_kl_ba(self) -> tuple[float, int]:
        k = max(range(self.count), key=lambda j: (self.kl_ba[j], -j))
        return self.kl_ba[k], self.positions[k]

    @property
    def agreement(self) -> float:
        """Share of positions where the two top-1 tokens are the same."""
        return sum(self.agree) / self.count

    @property
    def perplexity_a(self) -> float:
        return _perplexity(self.logprob_a)

    @property
    def perplexity_b(self) -> float:
        return _perplexity(self.logprob_b)

    def position(self, k: int) -> DivergentPosition:
        """The k-th scored position's figures (k counts from 0, i.e. position first + k)."""
        return DivergentPosition(self.positions[k], self.token_ids[k], self.kl_ab[k], self.kl_ba[k],
                                 self.top1_a[k], self.top1_b[k], math.exp(self.logprob_a[k]),
                                 math.exp(self.logprob_b[k]))

    def most_different(self, top: int | None = None) -> list[DivergentPosition]:
        """The `top` positions (default: the result's `top`) with the largest KL(a‖b), largest first (ties:
        earlier position first)."""
        top = self.top if top is None else top
        order = sorted(range(self.count), key=lambda j: (-self.kl_ab[j], j))
        return [self.position(k) for k in order[:max(0, top)]]

    def summary(self) -> dict[str, Any]:
        max_ab, at_ab = self.max_kl_ab
        max_ba, at_ba = self.max_kl_ba
        return {"model_a": self.model_a, "model_b": self.model_b, "forward_a": self.forward_a,
                "forward_b": self.forward_b, "tokens_scored": self.count, "first": self.first,
                "mean_kl_ab": self.mean_kl_ab, "mean_kl_ba": self.mean_kl_ba, "max_kl_ab": max_ab,
                "max_kl_ab_position": at_ab, "max_kl_ba": max_ba, "max_kl_ba_position": at_ba,
                "agreement": self.agreement, "perplexity_a": self.perplexity_a, "perplexity_b": self.perplexity_b,
                "compared_vocab": self.compared_vocab, "note": self.note}

    def to_frame(self, texts: Mapping[int, str] | None = None):
        """A pandas frame, one row per scored position: position, token_id, [text,] kl_ab, kl_ba, top1_a,
        top1_b, agree, prob_a, prob_b."""
        columns: dict[str, Any] = {"position": list(self.positions), "token_id": list(self.token_ids)}
        if texts is not None:
            columns["text"] = [texts.get(t, "") for t in self.token_ids]
        columns.update(kl_ab=list(self.kl_ab), kl_ba=list(self.kl_ba), top1_a=list(self.top1_a),
                       top1_b=list(self.top1_b), agree=list(self.agree), prob_a=list(self.prob_a),
                       prob_b=list(self.prob_b))
        return pd.DataFrame(columns)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (a non-finite float becomes None)."""
        return _jsonable({**asdict(self), "summary": self.summary(),
                          "most_different": [asdict(p) for p in self.most_different()]})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@torch.inference_mode()
def divergence(lm_a: LoadedModel, lm_b: LoadedModel, ids: Sequence[int], lock_a: StepLock = nullcontext,
               lock_b: StepLock = nullcontext, first: int = 1, top: int = 10, *, chunk: int = 32,
               should_stop: ShouldStop | None = None) -> Divergence:
    """Both models teacher-forced on the same ids, chunk by chunk in turn (each under its own lock), so memory
    stays one chunk of logits per model. They must share a tokenizer. Where their logits have different widths
    (padded embedding tables), the KL compares the first min(V_a, V_b) rows, each renormalised (`note` says so);
    each model's probability of the text's tokens and its top-1 come from its own full distribution.
    `should_stop` is read before every pair of chunks, as in `score_ids`."""
    label_a, label_b = _label(lm_a), _label(lm_b)
    if label_a == label_b and lm_a is not lm_b:
        label_a, label_b = f"{label_a} (a)", f"{label_b} (b)"
    if not same_tokenizer(lm_a, lm_b):
        raise ValueError(f"{label_a} and {label_b} have different tokenizers: the same ids would be different "
                         f"texts, so their distributions cannot be compared")
    ids = _check_ids(lm_a, ids, first, label_a)
    _check_ids(lm_b, ids, first, label_b)
    width = min(lm_a.vocab_size, lm_b.vocab_size)
    note = ""
    if lm_a.vocab_size != lm_b.vocab_size:
        note = (f"the logits have different widths ({label_a}: {lm_a.vocab_size}, {label_b}: {lm_b.vocab_size}); "
                f"the KL compares the first {width} entries, each distribution renormalised over them")
    parts: dict[str, list] = {k: [] for k in ("kl_ab", "kl_ba", "top1_a", "top1_b", "logprob_a", "logprob_b")}
    chunks_a = _scored_chunks(lm_a, ids, lock_a, first, chunk)
    chunks_b = _scored_chunks(lm_b, ids, lock_b, first, chunk)
    cut: list[str] = []
    with closing(chunks_a), closing(chunks_b):
        for _, (pos_a, la, targets), (pos_b, lb, _) in zip(_clocked(should_stop, cut), chunks_a, chunks_b):
            assert pos_a == pos_b and la.shape[0] == lb.shape[0], (pos_a, pos_b, la.shape, lb.shape)
            sa, sb = _token_stats(la, targets), _token_stats(lb, targets)
            kl_ab, kl_ba = _kl_both(la[:, :width], lb[:, :width])
            parts["kl_ab"].extend(kl_ab.tolist())
            parts["kl_ba"].extend(kl_ba.tolist())
            parts["top1_a"].extend(sa["top1"].tolist())
            parts["top1_b"].extend(sb["top1"].tolist())
            parts["logprob_a"].extend(sa["logprob"].tolist())
            parts["logprob_b"].extend(sb["logprob"].tolist())
            del la, lb
    end = first + len(parts["kl_ab"])
    return Divergence(model_a=lm_a.key, model_b=lm_b.key, forward_a=lm_a.forward_label,
                      forward_b=lm_b.forward_label, ids=tuple(ids), first=first,
                      positions=tuple(range(first, end)), token_ids=tuple(ids[first:end]),
                      top=top, note=note, compared_vocab=width,
                      cut=_cut_of(cut, end - first, len(ids) - first, f"{label_a} and {label_b}: a divergence"),
                      **{k: tuple(v) for k, v in parts.items()})


def _label(lm: LoadedModel) -> str:
    return f"{lm.spec.name} ({lm.forward_label})"


def _jsonable(value: Any) -> Any:
    """Floats JSON can carry (inf / nan → None), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
