"""Prompt attribution: how much each earlier token drove one chosen token.

Two measures of the log-probability the model gave the chosen token:
- gradient × input: one forward and one backward from the token embeddings (∂ log p / ∂ e_i · e_i, summed over
  the hidden size). Gradients exist only inside `gradient_x_input` (`torch.enable_grad` there alone); the
  weights never require grad, so nothing but the embeddings' gradient is computed, and the graph is freed
  before it returns.
- occlusion: leave a unit (one token, one turn, all template tokens) out and recompute; the drop in log p is
  that unit's share. Units are taken from the last to the first on one decode state: each is cropped back to
  where the unit begins, so the prefix before it is never recomputed.
"""

from __future__ import annotations

import gc
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Sequence

import pandas as pd
import torch

from qdemo.core.decode import ShouldStop, _forward, new_state
from qdemo.errors import Cut, Interrupted
from qdemo.models.loader import LoadedModel
from qdemo.probes.clock import check_clock, layer_clock

StepLock = Callable[[], ContextManager[None]]
MAX_TOKEN_OCCLUSION = 160  # per-token occlusion costs ≈ n²/2 token forwards: above this, units must be turns


@dataclass(frozen=True)
class Unit:
    """Tokens left out together: one token, one turn's text, or every template token."""

    label: str  # "system", "user 1", "assistant 1", "answer so far", "template", or a token's text
    kind: str  # "system" | "user" | "assistant" | "answer" | "template" | "token"
    indices: tuple[int, ...]  # positions in the context


@dataclass(frozen=True)
class Attribution:
    """Per-token scores (gradient × input) or per-unit scores (occlusion) for one chosen token."""

    model: str
    method: str  # "gradient×input" | "occlusion"
    context: tuple[int, ...]  # the ids before the chosen token
    target: int  # the chosen token's id
    logprob: float  # log p(target | context) from the full context
    scores: tuple[float | None, ...]  # per token (gradient×input) or per unit (occlusion; None: nothing left)
    units: tuple[Unit, ...] = ()  # occlusion: what each score left out
    cut: Cut | None = None  # occlusion ended early (Stop, the time limit): the units not reached score None

    def per_unit(self, units: Sequence[Unit]) -> list[tuple[Unit, float]]:
        """Token scores summed per unit (gradient × input shown per turn)."""
        if self.method != "gradient×input":
            raise ValueError("per_unit sums token scores; occlusion already scores units")
        return [(u, float(sum(self.scores[i] for i in u.indices))) for u in units]

    def to_frame(self, texts: dict[int, str] | None = None):
        """One row per context token (gradient×input) or per unit (occlusion). `texts` maps a context position to
        its text (token_pieces' list, enumerated)."""
        texts = texts or {}
        if self.method == "occlusion":
            return pd.DataFrame.from_records([
                {"unit": u.label, "kind": u.kind, "tokens": len(u.indices), "first": min(u.indices),
                 "logprob_drop": s} for u, s in zip(self.units, self.scores)])
        return pd.DataFrame.from_records([
            {"position": i, "id": t, "token": texts.get(i, str(t)), "score": s}
            for i, (t, s) in enumerate(zip(self.context, self.scores))])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "context": list(self.context), "target": self.target,
                "logprob": self.logprob, "scores": list(self.scores),
                "units": [{"label": u.label, "kind": u.kind, "indices": list(u.indices)} for u in self.units],
                "cut": asdict(self.cut) if self.cut else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _check(lm: LoadedModel, context: Sequence[int], target: int) -> list[int]:
    if lm.model is None:
        raise ValueError(f"model {lm.spec.name}: attribution needs the torch weights (this copy runs on "
                         f"{lm.forward_label})")
    lm.check_ids([target], "the chosen token")
    return lm.check_ids(context, "the context before the chosen token")


def gradient_x_input(lm: LoadedModel, context: Sequence[int], target: int, lock: StepLock = nullcontext, *,
                     should_stop: ShouldStop | None = None) -> Attribution:
    """∂ log p(target | context) / ∂ e_i · e_i for every context token i: one forward and one backward, in one
    turn at the gate. `should_stop` is read before the forward, before each decoder layer and before the backward;
    when it says stop, Interrupted is raised (one gradient is all or nothing)."""
    ids = _check(lm, context, target)
    model = lm.model
    embed = model.get_input_embeddings()
    layers = _layers(model)
    what = f"model {lm.spec.name}: gradient × input"
    check_clock(should_stop, Cut("", 0, len(layers), "layers"), what)
    try:
        with lock(), torch.inference_mode(False), torch.enable_grad(), layer_clock(layers, should_stop, what):
            inputs = embed(torch.tensor([ids], device=lm.device)).detach().requires_grad_(True)
            out = model(inputs_embeds=inputs, use_cache=False, logits_to_keep=1)
            logprob = torch.log_softmax(_wide(out.logits[0, -1]), dim=-1)[int(target)]
            check_clock(should_stop, Cut("", len(layers), len(layers), "layers"), what)
            (grad,) = torch.autograd.grad(logprob, inputs)
            scores = (_wide(grad) * _wide(inputs.detach())).sum(-1)[0]
            value = float(logprob.detach())
            result = scores.tolist()
    finally:
        inputs = out = logprob = grad = scores = None  # noqa: F841 — drop the graph before returning
        gc.collect()
    return Attribution(model=lm.spec.name, method="gradient×input", context=tuple(ids), target=int(target),
                       logprob=value, scores=tuple(result))


def _layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if layers is not None else ()


def _wide(x: torch.Tensor) -> torch.Tensor:
    # fp32 at least (bf16 weights), fp64 kept (the finite-difference oracle runs a float64 copy).
    return x if x.dtype == torch.float64 else x.float()


def _logprob(logits: torch.Tensor, target: int) -> float:
    return float(torch.log_softmax(logits.float(), dim=-1)[int(target)])


@torch.inference_mode()
def occlusion(lm: LoadedModel, context: Sequence[int], target: int, units: Sequence[Unit],
              lock: StepLock = nullcontext, chunk: int = 256, *, should_stop: ShouldStop | None = None
              ) -> Attribution:
    """The drop in log p(target) when each unit is left out (positive: the unit made the token likelier). One
    decode state: the full context once, then per unit (last first) a crop to the unit's first token and a
    prefill of what follows it without the unit. `should_stop` is read before every forward chunk: when it says
    stop, the units not finished score None and `cut` says how many were (Interrupted before the first)."""
    ids = _check(lm, context, target)
    for u in units:
        if not u.indices or min(u.indices) < 0 or max(u.indices) >= len(ids):
            raise ValueError(f"model {lm.spec.name}: unit {u.label!r} must name positions in 0..{len(ids) - 1}")
    if sum(u.kind == "token" for u in units) > MAX_TOKEN_OCCLUSION:
        raise ValueError(f"model {lm.spec.name}: per-token occlusion over more than {MAX_TOKEN_OCCLUSION} tokens "
                         "would recompute the text hundreds of times: occlude per turn, or use gradient × input")
    state = new_state(lm)
    scores: list[float | None] = [None] * len(units)
    feed = _Feeder(lm, state, lock, chunk, should_stop)
    done, cut = 0, None
    try:
        base = feed(ids)
        if base is None:
            raise Interrupted(Cut(feed.reason, 0, len(units), "units"), f"model {lm.spec.name}: occlusion")
        full = _logprob(base, target)
        for u in sorted(range(len(units)), key=lambda k: min(units[k].indices), reverse=True):
            left_out = set(units[u].indices)
            start = min(left_out)
            rest = [t for i, t in enumerate(ids) if i >= start and i not in left_out]
            if start == 0 and not rest:
                done += 1
                continue  # nothing left to condition on
            if not rest:  # the unit is the tail: read the logits after the token before it
                start, rest = start - 1, [ids[start - 1]]
            state.crop(start)
            logits = feed(rest)
            if logits is None:
                cut = Cut(feed.reason, done, len(units), "units")
                break
            scores[u] = full - _logprob(logits, target)
            done += 1
    finally:
        state.release()
    return Attribution(model=lm.spec.name, method="occlusion", context=tuple(ids), target=int(target),
                       logprob=full, scores=tuple(scores), units=tuple(units), cut=cut)


@dataclass
class _Feeder:
    """Tokens after the state's width, a chunk per turn at the gate; the clock is read before every chunk."""

    lm: LoadedModel
    state: Any
    lock: StepLock
    chunk: int
    should_stop: ShouldStop | None
    reason: str = ""  # why the last call returned None

    def __call__(self, ids: list[int]) -> torch.Tensor | None:
        """The logits after the last of `ids`, or None when the clock said stop (the state then holds a part)."""
        block = torch.tensor([ids], dtype=torch.long, device=self.state.tokens.device)
        logits = None
        for begin in range(0, len(ids), self.chunk):
            self.reason = (self.should_stop() if self.should_stop is not None else None) or ""
            if self.reason:
                return None
            with self.lock():
                logits = _forward(self.lm, self.state, block[:, begin:begin + self.chunk], keep=1)[0, -1]
        return logits


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text: concatenated they give the text, a character split across tokens
    counted once, at the token that completes it (the others get "")."""
    pieces, done, ids = [], "", [int(t) for t in ids]
    for i in range(len(ids)):
        text = decode(ids[:i + 1])
        stable = text.rstrip("\ufffd") if i + 1 < len(ids) else text
        if stable.startswith(done):
            pieces.append(stable[len(done):])
            done = stable
        else:  # the tokenizer rewrote earlier text (a leading space dropped, say): keep offsets monotone
            pieces.append("")
    return pieces


def token_units(texts: Sequence[str], indices: Sequence[int] | None = None) -> list[Unit]:
    """One unit per token (its text as the label)."""
    chosen = range(len(texts)) if indices is None else indices
    return [Unit(label=f"{i}: {texts[i]!r}", kind="token", indices=(int(i),)) for i in chosen]


def turn_units(texts: Sequence[str], messages: Sequence[dict[str, str]], answer_from: int | None = None
               ) -> list[Unit]:
    """Units per turn of a chat prompt: each message's content tokens (system / user k / assistant k), the
    answer written so far (positions from `answer_from`), and every other token as "template". Tokens are
    placed by their character offsets in the decoded text, so a character split across tokens still lands in
    its turn (`texts` are the pieces of `token_pieces`: a character split across tokens belongs to the token that
    completes it); a message whose text is not found (cut to fit, say) gets no unit."""
    starts, offset = [], 0
    for t in texts:
        starts.append(offset)
        offset += len(t)
    whole = "".join(texts)
    end_of_prompt = len(texts) if answer_from is None else answer_from
    limit = starts[end_of_prompt] if end_of_prompt < len(texts) else len(whole)
    owner: list[int | None] = [None] * len(texts)
    units: list[Unit] = []
    search, counts = 0, {"user": 0, "assistant": 0}
    for message in messages:
        content, role = message.get("content", ""), message.get("role", "")
        if not content.strip():
            continue
        at = whole.find(content, search, limit)
        if at < 0:
            at = whole.find(content.strip(), search, limit)
            content = content.strip()
        if at < 0:
            continue
        search = at + len(content)
        members = tuple(i for i in range(end_of_prompt)
                        if owner[i] is None and starts[i] < at + len(content) and starts[i] + len(texts[i]) > at)
        if not members:
            continue
        for i in members:
            owner[i] = len(units)
        if role in counts:
            counts[role] += 1
            label = f"{role} {counts[role]}"
        else:
            label = role or "message"
        units.append(Unit(label=label, kind=role if role in ("system", "user", "assistant") else "template",
                          indices=members))
    for i in range(end_of_prompt - 2, -1, -1):
        # A token holding only the first bytes of a character has no text of its own: it goes with the token
        # that completes the character.
        if owner[i] is None and not texts[i] and owner[i + 1] is not None:
            owner[i] = owner[i + 1]
            unit = units[owner[i]]
            units[owner[i]] = Unit(unit.label, unit.kind, tuple(sorted(unit.indices + (i,))))
    if answer_from is not None and answer_from < len(texts):
        units.append(Unit(label="answer so far", kind="answer", indices=tuple(range(answer_from, len(texts)))))
    template = tuple(i for i in range(end_of_prompt) if owner[i] is None)
    if template:
        units.append(Unit(label="template", kind="template", indices=template))
    return units
