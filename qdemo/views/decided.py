"""Which stage decided, in words: notes per token for the token view, and lines about a whole answer.

The data comes from qdemo.probes.decided (`token_decisions`); this module only writes it for people.
"""

from __future__ import annotations

from typing import Sequence

from qdemo.probes.decided import TokenDecision
from qdemo.views.labels import percent, stage_words


def decision_marks(decisions: Sequence[TokenDecision]) -> dict[int, str]:
    """{position: short note} for the tokens where a stage decided something, in the form
    qdemo.views.tokens.token_view_html's `marks` takes."""
    marks = {}
    for d in decisions:
        notes = [f"{stage_words(name)} changed the top token" for name in d.changed_by]
        if d.argmax_removed_by is not None:
            notes.append(f"{stage_words(d.argmax_removed_by)} removed the raw argmax")
        if d.not_argmax:
            notes.append("not the raw argmax")
        if d.below_final_top:
            notes.append("drawn below the final top")
        if notes:
            marks[d.index] = "; ".join(notes)
    return marks


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
            lines.append(f"{stage_words(name)} changed the top token of {count} of {n} tokens")
    if names and not any(d.changed_by for d in recorded):
        active = ", ".join(stage_words(name) for name in names)
        lines.append(f"no stage changed the top token at any of the {n} tokens (stages: {active})")
    for name in names:
        count = sum(d.argmax_removed_by == name for d in recorded)
        if count:
            lines.append(f"{stage_words(name)} removed the raw argmax at {_times(count)}")
    measured = [d for d in recorded if all(mass is not None for _, mass in d.removed)]
    for name in names:
        masses = [mass for d in measured for stage, mass in d.removed if stage == name and mass is not None]
        if masses and max(masses) > 0:
            lines.append(f"{stage_words(name)} removed {percent(sum(masses) / len(masses))} of the probability on average "
                         f"(at most {percent(max(masses))}, over {_times(len(masses))})")
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
