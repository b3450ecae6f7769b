"""The answer as coloured tokens: how sure the model was of each token it actually picked."""

from __future__ import annotations

from typing import Sequence

from qdemo.events import TokenEvent
from qdemo.views.labels import token_label


def token_highlights(tokens: Sequence[TokenEvent], texts: Sequence[str]) -> list[tuple[str, float | None]]:
    """(label, p) pairs for gr.HighlightedText. `texts[i]` is token i decoded on its own (TokenEvent.text can
    be "" while bytes are held back). p is the chosen token's probability at the last stage, the distribution
    it was drawn from; None when no stages were recorded (top_n=0), so the UI leaves it uncoloured."""
    if len(tokens) != len(texts):
        raise ValueError(f"token_highlights needs one text per token, got {len(tokens)} tokens and {len(texts)} texts")
    return [(token_label(text), event.stages[-1].chosen_prob if event.stages else None)
            for event, text in zip(tokens, texts)]


def probability_legend() -> str:
    return ("**Colour = probability of the chosen token** in the distribution it was sampled from "
            "(after every active sampling stage). Strong colour: the model was sure (p near 1); "
            "pale: it picked among many options (p near 0); uncoloured: no distribution was recorded. "
            "`␣` marks a space, `\\n` a newline, `∅` a token that adds no visible text on its own.")
