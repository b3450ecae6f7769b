"""Speculative (assisted) decoding on two decode states: a small draft model proposes k tokens, the target
verifies them in one forward, and the target's state is cropped back to what it accepted.

Greedy: a proposal is kept while it is the target's argmax (after its processor chain), so the answer is exactly
the target's own greedy answer. Sampled: standard speculative sampling (Leviathan et al., Chen et al.): a proposal
x drawn from the draft's final distribution q is kept with probability min(1, p(x)/q(x)), where p is the target's
final distribution; at the first rejection a token is drawn from max(0, p − q) renormalised, and when all k are
kept one more comes from p. The answer then follows the target's distribution exactly (not its seeded draws).

Both states hold the committed tokens (prompt + answer) except a tail not fed yet; every forward of either model
goes through its own step gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from qdemo.core.chain import run_chain, summarise
from qdemo.core.decode import DecodeState, StepLock, decode_step, prefill, verify
from qdemo.core.events import StageTopN
from qdemo.models.loader import LoadedModel


@dataclass
class Emitted:
    token: int
    stages: tuple[StageTopN, ...]
    drafted: bool  # proposed by the draft and accepted


@dataclass
class Round:
    emitted: list[Emitted]
    proposed: int
    accepted: int


@dataclass
class SpeculativeDecoder:
    """One answer's speculative decoding: the two models, their states, chains and generators."""

    target: LoadedModel
    draft: LoadedModel
    target_state: DecodeState
    draft_state: DecodeState
    target_lock: StepLock
    draft_lock: StepLock
    stages: list  # the processor chain (transformers' classes), the same for both models
    greedy: bool
    k: int
    generator: torch.Generator | None = None  # the target's: acceptance draws and residual samples
    draft_generator: torch.Generator | None = None
    top_n: int = 20
    committed: list[int] = field(default_factory=list)  # prompt + emitted tokens
    target_logits: torch.Tensor | None = None  # [V] for the token after the target's fed tokens, when fresh
    draft_logits: torch.Tensor | None = None  # the same for the draft (only right after the prefill)

    def start(self, prompt: Sequence[int], chunk: int, should_stop: Callable[[], str | None] | None = None
              ) -> str | None:
        """Prefill both models with the prompt, a chunk per turn at each model's gate. `should_stop` is asked
        between chunks (the target's, then the draft's, and between the two prefills), as a plain run's prefill
        asks it: a long prompt is two prefills, and Stop must not wait for both. Returns its reason, or None once
        both models hold the prompt."""
        self.committed = list(prompt)
        logits, early = prefill(self.target, self.target_state, [list(prompt)], self.target_lock, chunk, should_stop)
        if early is None and should_stop is not None:
            early = should_stop()
        if early:
            return early
        draft_logits, early = prefill(self.draft, self.draft_state, [list(prompt)], self.draft_lock, chunk,
                                      should_stop)
        if early:
            return early
        self.target_logits, self.draft_logits = logits[0], draft_logits[0]
        return None

    def step(self, limit: int) -> Round:
        """One round: up to min(k, limit - 1) proposals, one verification forward; at most `limit` tokens out."""
        k = max(0, min(self.k, limit - 1))
        proposals, q_probs = self._propose(k)
        # Verify: the target's logits before each proposal and after the last, in one forward.
        tail = self.committed[self.target_state.width:]  # the last emitted token, not fed yet (none after prefill)
        fed = tail + proposals
        if fed:
            verified = verify(self.target, self.target_state, fed, self.target_lock)
            p_logits = verified[len(tail) - 1:] if tail else torch.cat([self.target_logits[None], verified])
        else:
            p_logits = self.target_logits[None]
        emitted: list[Emitted] = []
        accepted = 0
        for i, x in enumerate(proposals):
            chain = self._target_chain(p_logits[i], len(self.committed) + i)
            if self._accept(x, chain[0], q_probs[i]):
                emitted.append(Emitted(x, self._summary(chain, x), drafted=True))
                accepted += 1
                continue
            y = self._resample(chain[0], q_probs[i])
            emitted.append(Emitted(y, self._summary(chain, y), drafted=False))
            break
        else:
            chain = self._target_chain(p_logits[len(proposals)], len(self.committed) + len(proposals))
            final = chain[0]
            y = int(torch.argmax(final)) if self.greedy else int(torch.multinomial(final, 1, generator=self.generator))
            emitted.append(Emitted(y, self._summary(chain, y), drafted=False))
        # The target keeps the accepted proposals; the last emitted token is fed with the next round's proposals.
        keep = len(self.committed) + accepted
        if self.target_state.width > keep:
            self.target_state.crop(keep)
        self.committed += [e.token for e in emitted]
        if self.draft_state.width > keep:
            self.draft_state.crop(keep)
        self.target_logits = self.draft_logits = None
        return Round(emitted=emitted, proposed=len(proposals), accepted=accepted)

    # --- pieces ------------------------------------------------------------------------------------------------
    def _propose(self, k: int) -> tuple[list[int], list[torch.Tensor]]:
        """k draft tokens, each with the draft's final distribution it came from."""
        if k == 0:
            return [], []
        tail = self.committed[self.draft_state.width:]
        if tail:
            logits = verify(self.draft, self.draft_state, tail, self.draft_lock)[-1]
        else:  # right after the prefill
            logits = self.draft_logits
        proposals, q_probs = [], []
        for j in range(k):
            # the draft's state holds the committed tokens and the proposals so far: the penalty's context
            seq = self.draft_state.tokens[:, :self.draft_state.width]
            scores, _, _ = run_chain(logits[None], seq, self.stages, keep=False)
            probs = torch.softmax(scores, dim=-1)[0]
            token = int(torch.argmax(probs)) if self.greedy else int(
                torch.multinomial(probs, 1, generator=self.draft_generator))
            proposals.append(token)
            q_probs.append(probs)
            if j < k - 1:
                logits = decode_step(self.draft, self.draft_state, [token], self.draft_lock)[0]
        return proposals, q_probs

    def _target_chain(self, logits: torch.Tensor, length: int
                      ) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
        """The target's chain at a position whose context is the first `length` tokens of its state (the committed
        ones and the proposals verified with them): (final distribution, stage names, stage probabilities)."""
        seq = self.target_state.tokens[:, :length]
        _, names, probs = run_chain(logits[None], seq, self.stages, keep=True)
        return probs[-1][0], names, probs

    def _summary(self, chain: tuple[torch.Tensor, list[str], list[torch.Tensor]], token: int
                 ) -> tuple[StageTopN, ...]:
        """Stage summaries for the token actually emitted (one device→host copy, only for it)."""
        if not self.top_n:
            return ()
        _, names, probs = chain
        return summarise(names, probs, torch.tensor([token], device=probs[0].device), self.top_n)[1]

    def _accept(self, x: int, p: torch.Tensor, q: torch.Tensor) -> bool:
        if self.greedy:
            return int(torch.argmax(p)) == x
        ratio = float(p[x]) / max(float(q[x]), 1e-30)
        if ratio >= 1.0:
            return True
        u = float(torch.rand((), generator=self.generator, device=p.device))
        return u < ratio

    def _resample(self, p: torch.Tensor, q: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(p))
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p == q where it matters: any draw from p is right
            residual, total = p, float(p.sum())
        return int(torch.multinomial(residual / total, 1, generator=self.generator))

