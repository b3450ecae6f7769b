"""How the Chat tab draws an answer beside the chat: the token view (coloured, optionally only the tokens where a
given stage decided), the which-stage-decided line and the decoding line. Shared by the chat's handlers and the
branch panel, which redraws the same view for the branch it shows."""

from __future__ import annotations

from typing import Sequence

from qdemo.models.registry import ModelSpec
from qdemo.probes.decided import decided_indices
from qdemo.sampling import SamplingParams
from qdemo.services import settings
from qdemo.services.chat import AnswerView
from qdemo.serving.remote import distribution_note
from qdemo.views.decided import decision_marks
from qdemo.views.tokens import token_view_html

MEASURE_CHOICES = [("raw probability", "raw"), ("after the sampling stages", "final"),
                   ("margin over the runner-up", "margin")]  # the legend says what each means
TOKENS_HINT = "<p class='tok-empty'>The tokens of the last answer appear here: hover one for its numbers, click " \
              "it for the stage-by-stage view.</p>"
DECIDED_CHOICES = [("all tokens", "all"), ("a stage changed the top token", "changed"),
                   ("a stage removed the raw argmax", "removed_argmax"), ("not the raw argmax", "not_argmax"),
                   ("drawn below the final top", "below_final_top")]
DECIDED_LABELS = {value: label for label, value in DECIDED_CHOICES}


def view_html(view: AnswerView, measure: str, kind: str) -> str:
    """The token view: every token coloured by `measure`; with a `kind` other than "all", the others dimmed."""
    shown = decided_indices(view.decisions, kind) if kind != "all" else []
    html = token_view_html(view.run.tokens, view.texts, view.labels, measure, marks=_marks(view, shown))
    if kind == "all":
        return html
    return (f'<p class="decided-count">{len(shown)} of {len(view.run.tokens)} tokens: {DECIDED_LABELS[kind]}</p>'
            f'<div class="only-marked">{html}</div>')


def _marks(view: AnswerView, shown: Sequence[int] = ()) -> dict[int, str]:
    """Tokens the draft model proposed and the model accepted, and the `shown` ones with what decided there."""
    marks = {i: "drafted, accepted" for i, t in enumerate(view.run.tokens) if t.drafted}
    notes = decision_marks(view.decisions) if shown else {}
    for i in shown:
        marks[i] = "; ".join(m for m in (marks.get(i), notes.get(i)) if m)
    return marks


def decided_summary(view: AnswerView) -> str:
    if view.run.prefill is not None and view.run.prefill.memory.device == "remote":
        return (f"**Token probabilities as the server reports them** ({distribution_note()}): one distribution "
                "per token; its sampling stages ran on the server.")
    lines = view.decision_summary
    return "**Which stage decided:** " + "; ".join(lines) + "." if lines else ""


def decoding_line(params: SamplingParams) -> str:
    return f"decoding: **{settings.summary(params)}**"


def assisted_label(spec: ModelSpec) -> str:
    return f"speculative decoding, {spec.draft} drafting" if spec.draft else "speculative decoding"
