"""Which stage decided: per token of an answer, what each logits-processor stage did to the model's own choice.

Pure functions over recorded `TokenEvent.stages` (no torch, no model): did a stage change the top token, did one
remove the raw argmax, how much probability each stage removed, and was the chosen token the raw argmax. An
answer-level summary says it in words; `decided_indices` gives the token positions the token view can filter to.

Stages are read in their recorded order, which is the chain order (qdemo.core.chain.run_chain writes them so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from qdemo.core.events import StageTopN, TokenEvent

RAW = "raw"
DecisionKind = Literal["changed", "removed_argmax", "not_argmax", "below_final_top"]
KINDS: tuple[str, ...] = ("changed", "removed_argmax", "not_argmax", "below_final_top")
# Stage names in words (the names qdemo.sampling.build_stages gives); unknown names are shown as they are.
STAGE_WORDS: dict[str, str] = {"repetition_penalty": "repetition penalty", "temperature": "temperature",
                               "top_k": "top-k", "top_p": "top-p", "min_p": "min-p", "beam": "beam search"}


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


def _words(name: str) -> str:
    return STAGE_WORDS.get(name, name)


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


def decision_marks(decisions: Sequence[TokenDecision]) -> dict[int, str]:
    """{position: short note} for the tokens where a stage decided something, in the form
    qdemo.views.tokens.token_view_html's `marks` takes."""
    marks = {}
    for d in decisions:
        notes = [f"{_words(name)} changed the top token" for name in d.changed_by]
        if d.argmax_removed_by is not None:
            notes.append(f"{_words(d.argmax_removed_by)} removed the raw argmax")
        if d.not_argmax:
            notes.append("not the raw argmax")
        if d.below_final_top:
            notes.append("drawn below the final top")
        if notes:
            marks[d.index] = "; ".join(notes)
    return marks


def _pct(p: float) -> str:
    if p <= 0:
        return "0 %"
    if p < 0.001:
        return "<0.1 %"
    return f"{p * 100:.1f} %" if p < 0.1 else f"{p * 100:.0f} %"


def _times(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _ordered_names(decisions: Sequence[TokenDecision]) -> list[str]:
    names: dict[str, None] = {}
    for d in decisions:
        for name in d.stages[1:]:
            names.setdefault(name, None)
    return list(names)


def answer_summary(decisions: Sequence[TokenDecision]) -> list[str]:
    """Human lines about the whole answer; only lines that say something (no "top-k changed 0 tokens")."""
    if not decisions:
        return []
    recorded = [d for d in decisions if d.recorded]
    n = len(recorded)
    if not recorded:
        names = {name for d in decisions for name in d.stages}
        if names == {"beam"}:
            return ["beam search: each token carries its beam transition probability, not per-stage distributions"]
        return [f"no per-stage distributions were recorded for these {_times(len(decisions))}"]
    lines = []
    if n < len(decisions):
        lines.append(f"{len(decisions) - n} of {len(decisions)} tokens have no per-stage distribution; "
                     f"the lines below count the other {n}")
    names = _ordered_names(recorded)
    if not names:
        lines.append("no processor ran: only the model's own distribution was recorded")
    for name in names:
        count = sum(name in d.changed_by for d in recorded)
        if count:
            lines.append(f"{_words(name)} changed the top token of {count} of {n} tokens")
    if names and not any(d.changed_by for d in recorded):
        active = ", ".join(_words(name) for name in names)
        lines.append(f"no stage changed the top token at any of the {n} tokens (stages: {active})")
    for name in names:
        count = sum(d.argmax_removed_by == name for d in recorded)
        if count:
            lines.append(f"{_words(name)} removed the raw argmax at {_times(count)}")
    measured = [d for d in recorded if all(mass is not None for _, mass in d.removed)]
    for name in names:
        masses = [mass for d in measured for stage, mass in d.removed if stage == name and mass is not None]
        if masses and max(masses) > 0:
            lines.append(f"{_words(name)} removed {_pct(sum(masses) / len(masses))} of the probability on average "
                         f"(at most {_pct(max(masses))}, over {_times(len(masses))})")
    if names and len(measured) < n:
        lines.append(f"removed probability was not recorded for {len(recorded) - len(measured)} of {n} tokens "
                     "(a run saved before qdemo measured it)")
    misses = sum(bool(d.not_argmax) for d in recorded)
    if misses:
        lines.append(f"the chosen token was not the raw argmax at {misses} of {n} tokens")
    else:
        lines.append(f"the chosen token was the raw argmax at all {n} tokens")
    drawn = sum(bool(d.below_final_top) for d in recorded)
    if drawn:
        lines.append(f"the draw picked a token below the final top at {drawn} of {n} tokens")
    return lines
