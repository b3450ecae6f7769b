"""Which stage decided: per token of an answer, what each logits-processor stage did to the model's own choice.

Pure functions over recorded `TokenEvent.stages` (no torch, no model): did a stage change the top token, did one
remove the raw argmax, how much probability each stage removed, and was the chosen token the raw argmax.
`decided_indices` gives the token positions the token view can filter to; qdemo.views.decided says it in words.

Stages are read in their recorded order, which is the chain order (qdemo.core.chain.run_chain writes them so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from qdemo.core.events import StageTopN, TokenEvent

RAW = "raw"
DecisionKind = Literal["changed", "removed_argmax", "not_argmax", "below_final_top"]
KINDS: tuple[str, ...] = ("changed", "removed_argmax", "not_argmax", "below_final_top")


@dataclass(frozen=True)
class TokenDecision:
    """What the stages did at one token. Fields that need a recorded distribution are None without one (beam
    search, top_n=0, or a run saved without its stages)."""

    index: int  # position in the answer
    token_id: int  # the token chosen
    stages: tuple[str, ...]  # the stages recorded for this token, chain order ("raw" first)
    raw_top: int | None  # the model's own most likely token (the raw argmax)
    final_top: int | None  # the most likely token after the last stage
    changed_by: tuple[str, ...]  # stages whose top token differs from the stage before (a tie is no change)
    argmax_removed_by: str | None  # the stage that set the raw argmax's probability to 0 (None: none did)
    removed: tuple[tuple[str, float | None], ...]  # (stage, probability it removed) after raw; None: not recorded
    not_argmax: bool | None  # the chosen token was not the raw argmax (None: unknown)
    below_final_top: bool | None  # the draw picked a token below the last stage's top (sampling only; None: unknown)

    @property
    def recorded(self) -> bool:
        return self.raw_top is not None


def _listed(stage: StageTopN, token_id: int) -> float | None:
    for i, p in zip(stage.token_ids, stage.probs):
        if i == token_id:
            return p
    return None


def _argmax_prob(stage: StageTopN, raw_top: int) -> float | None:
    """The raw argmax's probability at `stage`: recorded exactly since `argmax_prob` exists; for older records,
    read from the top-N when listed, or 0 when the top-N ends in a zero (then every token with p > 0 is listed)."""
    if stage.argmax_prob is not None:
        return stage.argmax_prob
    listed = _listed(stage, raw_top)
    if listed is not None:
        return listed
    return 0.0 if any(p == 0 for p in stage.probs) else None


def _changed(before: StageTopN, here: StageTopN, raw_top: int) -> bool:
    """`here`'s top token differs from `before`'s and strictly outranks it at `here` (top-k order among equal
    probabilities is arbitrary, so a tie swapped is not a change)."""
    if not here.token_ids or not before.token_ids or here.token_ids[0] == before.token_ids[0]:
        return False
    old_top = before.token_ids[0]
    p_old = _listed(here, old_top)
    if p_old is None and old_top == raw_top:
        p_old = here.argmax_prob
    # Not listed and not known: outranked by all N listed tokens, so below the top unless all N tie.
    return p_old is None or p_old < here.probs[0]


def _unrecorded(index: int, event: TokenEvent) -> TokenDecision:
    return TokenDecision(index=index, token_id=event.token_id, stages=tuple(s.name for s in event.stages),
                         raw_top=None, final_top=None, changed_by=(), argmax_removed_by=None, removed=(),
                         not_argmax=None, below_final_top=None)


def token_decision(index: int, event: TokenEvent) -> TokenDecision:
    stages = event.stages
    if not stages or stages[0].name != RAW or not stages[0].token_ids:
        return _unrecorded(index, event)
    raw = stages[0]
    raw_top = raw.token_ids[0]
    # Old records have no argmax_prob and a default removed of 0.0 that means "not measured", not "nothing".
    measured = raw.argmax_prob is not None
    changed_by, removed_by, removed = [], None, []
    for before, here in zip(stages, stages[1:]):
        if _changed(before, here, raw_top):
            changed_by.append(here.name)
        if removed_by is None:
            p_before, p_here = _argmax_prob(before, raw_top), _argmax_prob(here, raw_top)
            if p_here == 0 and (p_before is None or p_before > 0):
                removed_by = here.name
        removed.append((here.name, here.removed if measured else None))
    # A tie with the raw top is still the argmax: compare probabilities, not ids.
    not_argmax = event.token_id != raw_top and raw.chosen_prob < raw.probs[0]
    final = stages[-1]
    below = bool(final.token_ids) and event.token_id != final.token_ids[0] and final.chosen_prob < final.probs[0]
    return TokenDecision(index=index, token_id=event.token_id, stages=tuple(s.name for s in stages),
                         raw_top=raw_top, final_top=final.token_ids[0] if final.token_ids else None,
                         changed_by=tuple(changed_by), argmax_removed_by=removed_by, removed=tuple(removed),
                         not_argmax=not_argmax, below_final_top=below)


def token_decisions(tokens: Sequence[TokenEvent]) -> list[TokenDecision]:
    """One decision per token of the answer, in order (RunRecord.tokens)."""
    return [token_decision(i, event) for i, event in enumerate(tokens)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown decision kind {kind!r}; choose one of {', '.join(KINDS)}")


def decided_indices(decisions: Sequence[TokenDecision], kind: DecisionKind | str, stage: str | None = None
                    ) -> list[int]:
    """Positions of the tokens where: "changed" a stage changed the top token, "removed_argmax" a stage removed
    the raw argmax, "not_argmax" the chosen token was not the raw argmax, "below_final_top" the draw picked a
    token below the last stage's top. `stage` (e.g. "top_p") narrows the first two to one stage; the other two
    take none."""
    _check_kind(kind)
    if kind in ("not_argmax", "below_final_top"):
        if stage is not None:
            raise ValueError(f"decision kind {kind!r} takes no stage, got stage {stage!r}")
        return [d.index for d in decisions if getattr(d, kind)]
    if kind == "changed":
        return [d.index for d in decisions if d.changed_by and (stage is None or stage in d.changed_by)]
    return [d.index for d in decisions
            if d.argmax_removed_by is not None and (stage is None or d.argmax_removed_by == stage)]
