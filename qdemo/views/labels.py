"""How a token or a run is written on screen. One place, so Chinese and English tokens read alike everywhere."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

MAX_LABEL = 24
EMPTY = "∅"
ELLIPSIS = "…"
# Whitespace a reader would otherwise not see, or that would break a one-line axis label.
_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _visible(ch: str) -> str:
    if ch in _VISIBLE:
        return _VISIBLE[ch]
    if ch.isprintable():  # CJK, emoji and the replacement char "�" are printable and shown as they are
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def token_label(text: str) -> str:
    """`text` with whitespace and control characters made visible, "∅" when empty, at most 24 characters."""
    if not text:
        return EMPTY
    pieces = [_visible(ch) for ch in text]
    if sum(map(len, pieces)) <= MAX_LABEL:
        return "".join(pieces)
    # Cut on piece boundaries so an escape like "\n" is never split in half.
    out, used = [], 0
    for piece in pieces:
        if used + len(piece) > MAX_LABEL - len(ELLIPSIS):
            break
        out.append(piece)
        used += len(piece)
    return "".join(out) + ELLIPSIS


def id_labels(ids: Sequence[int], labels: Mapping[int, str]) -> list[str]:
    """Display labels for token ids, unique even when two ids decode alike (e.g. two partial-byte "�"),
    because plotly merges equal category names into one bar."""
    shown = [token_label(labels.get(i, f"#{i}")) for i in ids]
    counts: dict[str, int] = {}
    for label in shown:
        counts[label] = counts.get(label, 0) + 1
    return [f"{label} #{i}" if counts[label] > 1 else label for label, i in zip(shown, ids)]


def plot_text(text: str) -> str:
    """`text` safe inside a plotly label or hover: plotly reads a subset of HTML ("<b>", "<br>") in text, so a
    token like "<b>" would vanish; plotly shows the entities "&lt;", "&gt;" and "&amp;" as the characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def html_text(text: object) -> str:
    """Text made safe inside HTML, attribute values included."""
    return html.escape(str(text), quote=True)


# Stage names in words (the names qdemo.sampling.build_stages gives); unknown names are shown as they are.
STAGE_WORDS: dict[str, str] = {"raw": "raw (model)", "repetition_penalty": "repetition penalty",
                               "temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
                               "beam": "beam transition"}


def stage_words(name: str) -> str:
    return STAGE_WORDS.get(name, name)


def percent(p: float | None, places: int = 1) -> str:
    """A probability as people read it, the same everywhere: "12.3%", "0%" for exactly nothing, "<0.1%" for a
    little that would round to zero, "–" when unknown (None or NaN). `places`: decimals (0 on crowded bars)."""
    if p is None or p != p:
        return "–"
    if p <= 0:
        return "0%"
    text = f"{p * 100:.{places}f}"
    if float(text) == 0:  # a little that rounds to nothing still shows as something
        return f"<{10.0 ** -places:.{places}f}%"
    return f"{text}%"
