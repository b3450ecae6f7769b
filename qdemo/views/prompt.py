"""The prompt as the model sees it: every token a chip (its visible text and its id), special tokens marked,
and the messages left out to fit the context listed under it."""

from __future__ import annotations

from typing import Sequence

from qdemo.views.labels import html_text as _e
from qdemo.views.labels import token_label

DROPPED_TITLE = "left out to fit the context"
DROPPED_CHARS = 80
EMPTY_PROMPT = '<p class="chips-empty">No prompt yet: its tokens appear here once a message is sent.</p>'


def _excerpt(text: str, limit: int = DROPPED_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def prompt_chips_html(tokens: Sequence[tuple[int, str, bool]], dropped: Sequence[tuple[str, str]] = ()) -> str:
    """`tokens` are (id, decoded text, is special); `dropped` are (role, text) of messages left out. Each token
    is a chip with its visible text (whitespace shown as ␣ / \\n) and, small, its id; special tokens have the
    class "special". A line break follows a chip whose text holds a newline, so the prompt reads like the
    chat template. Everything is HTML-escaped."""
    if not tokens and not dropped:
        return EMPTY_PROMPT
    parts = []
    for token_id, text, special in tokens:
        kind = "chip special" if special else "chip"
        parts.append(f'<span class="{kind}" title="id {_e(token_id)}{" (special)" if special else ""}">'
                     f'<span class="chip-text">{_e(token_label(text))}</span>'
                     f'<span class="chip-id">{_e(token_id)}</span></span>')
        if "\n" in text:
            parts.append("<br>")
    out = f'<div class="chips" data-tokens="{len(tokens)}">{"".join(parts)}</div>' if tokens else EMPTY_PROMPT
    if dropped:
        items = "".join(f'<li><span class="role">{_e(role)}</span> <s>{_e(_excerpt(text))}</s></li>'
                        for role, text in dropped)
        out += (f'<div class="dropped"><p class="dropped-title">{_e(DROPPED_TITLE)} '
                f'({len(dropped)} message{"s" if len(dropped) != 1 else ""})</p><ul>{items}</ul></div>')
    return out
