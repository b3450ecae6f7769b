"""The answer as coloured tokens: how sure the model was of each token it actually picked.

`token_view_html` draws the answer as HTML, one span per token, coloured by a chosen measure, with a tooltip per
token that shows its numbers on hover or focus (pure CSS: no server round trip). `token_highlights` is the older
(label, p) form for gr.HighlightedText.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from qdemo.core.events import StageTopN, TokenEvent
from qdemo.views.labels import html_text as _e
from qdemo.views.labels import percent, token_label
from qdemo.views.stages import ordered_stages

# Measure key → what it means, in words. The first one is the default.
MEASURES: dict[str, str] = {
    "raw": "raw probability (the model's own)",
    "final": "probability after the sampling stages (what it was drawn from)",
    "margin": "margin over the runner-up (raw)",
}
DEFAULT_MEASURE = "raw"
TOP_ALTERNATIVES = 5
TRANSPARENT = "transparent"
EMPTY_VIEW = '<p class="tokview-empty">No answer yet: the tokens appear here as they are generated.</p>'

# A sequential scale (ColorBrewer "Blues"): pale = low, strong = high. Positions in [0, 1].
_SCALE: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (247, 251, 255)),
    (0.25, (198, 219, 239)),
    (0.5, (107, 174, 214)),
    (0.75, (33, 113, 181)),
    (1.0, (8, 48, 107)),
)
_DARK_FROM = 0.6  # scale position from which the label is written in white


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _raw_stage(stages: Sequence[StageTopN]) -> StageTopN:
    """The model's own distribution: the "raw" stage, or the first one (a beam run's only stage)."""
    for stage in stages:
        if stage.name == "raw":
            return stage
    return ordered_stages(stages)[0]


def _final_stage(stages: Sequence[StageTopN]) -> StageTopN:
    return ordered_stages(stages)[-1]


def is_beam(event: TokenEvent) -> bool:
    return len(event.stages) == 1 and event.stages[0].name == "beam"


def _margin(stage: StageTopN, chosen: int) -> float | None:
    others = [p for token_id, p in zip(stage.token_ids, stage.probs) if token_id != chosen]
    if not others:
        return None  # the runner-up was not recorded
    return stage.chosen_prob - max(others)


def token_value(event: TokenEvent, measure: str = DEFAULT_MEASURE) -> float | None:
    """The chosen token's value for `measure`; None when the event has no stages (or the number is unknown,
    e.g. NaN, or a margin whose runner-up was not recorded)."""
    _check_measure(measure)
    if not event.stages:
        return None
    if measure == "raw":
        return _finite(_raw_stage(event.stages).chosen_prob)
    if measure == "final":
        return _finite(_final_stage(event.stages).chosen_prob)
    return _finite(_margin(_raw_stage(event.stages), event.token_id))


def _position(value: float, measure: str) -> float:
    """Where `value` sits on the colour scale, in [0, 1]: probabilities as they are, margins from [-1, 1]."""
    t = (value + 1.0) / 2.0 if measure == "margin" else value
    return min(1.0, max(0.0, t))


def measure_colour(value: float | None, measure: str = DEFAULT_MEASURE) -> str:
    """CSS colour "rgb(r, g, b)" on a pale → strong blue scale; "transparent" for None or NaN."""
    _check_measure(measure)
    value = _finite(value)
    if value is None:
        return TRANSPARENT
    t = _position(value, measure)
    for (t0, c0), (t1, c1) in zip(_SCALE, _SCALE[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            r, g, b = (round(a + (b - a) * f) for a, b in zip(c0, c1))
            return f"rgb({r}, {g}, {b})"
    r, g, b = _SCALE[-1][1]
    return f"rgb({r}, {g}, {b})"


def text_colour(value: float | None, measure: str = DEFAULT_MEASURE) -> str:
    """Label colour that stays readable on `measure_colour(value)`: white on the strong end."""
    value = _finite(value)
    return "#ffffff" if value is not None and _position(value, measure) >= _DARK_FROM else "#111111"


def format_value(value: float | None, measure: str) -> str:
    """A measure's value as shown: probabilities in percent, margins in signed percentage points."""
    value = _finite(value)
    if value is None:
        return percent(None)
    if measure == "margin":
        return f"{value * 100:+.1f} points"
    return percent(value)


def _label(labels: Mapping[int, str], token_id: int) -> str:
    return token_label(labels[token_id]) if token_id in labels else f"#{token_id}"


def _top(stage: StageTopN, n: int = TOP_ALTERNATIVES) -> list[tuple[int, float]]:
    ranked = sorted(((i, p) for i, p in zip(stage.token_ids, stage.probs) if _finite(p) and p > 0),
                    key=lambda item: -item[1])
    return ranked[:n]


def _same_top(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(i == j and abs(p - q) <= 1e-6 for (i, p), (j, q) in zip(a, b))


def _alternatives(title: str, top: list[tuple[int, float]], chosen: int, labels: Mapping[int, str]) -> str:
    items = []
    for token_id, p in top:
        item = f"{_e(_label(labels, token_id))} {percent(p)}"
        items.append(f"<b>{item}</b>" if token_id == chosen else item)
    return f'<span class="tip-row alts"><span class="tip-key">{_e(title)}:</span> {" · ".join(items)}</span>'


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _tooltip(i: int, event: TokenEvent, label: str, labels: Mapping[int, str], measure: str,
             mark: str | None, split: bool = False) -> str:
    rows = [f'<span class="tip-row tip-head">token {i} · <b>{_e(label)}</b> · id {event.token_id}</span>']
    if split:
        rows.append(f'<span class="tip-row">{_e(SPLIT_NOTE)}</span>')
    if mark:
        rows.append(f'<span class="tip-row tip-mark">{_e(mark)}</span>')
    if not event.stages:
        rows.append('<span class="tip-row">no distribution recorded for this token</span>')
        return f'<span class="tip" role="tooltip">{"".join(rows)}</span>'
    raw, final = _raw_stage(event.stages), _final_stage(event.stages)
    if is_beam(event):
        rows.append(f'<span class="tip-row">beam transition p {percent(raw.chosen_prob)}</span>')
    else:
        rows.append(f'<span class="tip-row">raw p {percent(raw.chosen_prob)} · final p {percent(final.chosen_prob)}</span>')
    rows.append(f'<span class="tip-row">{_e(MEASURES[measure])}: '
                f'{_e(format_value(token_value(event, measure), measure))}</span>')
    raw_top, final_top = _top(raw), _top(final)
    if any(token_id != event.token_id for token_id, _ in raw_top):
        rows.append(_alternatives("beam top" if is_beam(event) else "raw top-5", raw_top, event.token_id, labels))
    if final is not raw and final_top and not _same_top(raw_top, final_top):
        rows.append(_alternatives("final top-5", final_top, event.token_id, labels))
    return f'<span class="tip" role="tooltip">{"".join(rows)}</span>'


# Clicking a token of token_view_html sends its index as the component's "select" event (gr.HTML js_on_load).
TOKEN_CLICK_JS = ("element.addEventListener('click', (e) => { const t = e.target.closest('[data-i]'); "
                  "if (t) trigger('select', {index: Number(t.dataset.i)}); });")


SPLIT = "\ufffd"  # what the bytes of an incomplete character decode to
SPLIT_NOTE = "part of a character split across tokens: it shows at the token that completes it"


def token_shares(alone: Sequence[str], streamed: Sequence[str]) -> list[str]:
    """Each token's share of the answer's text, a character split across tokens counted once, at the token that
    completes it (the others keep what they hold before its first byte, or ""): the join
    qdemo.probes.attribution.token_pieces makes with the tokenizer, made here from what a run records.

    `alone[i]` is token i decoded on its own ("\ufffd" for an incomplete character's bytes); `streamed[i]` is
    what the stream wrote at it (TokenEvent.text: "" while such bytes are held back, then the whole character
    at the token that completes it). Tokens holding no split bytes keep their own text."""
    shares, done, settled, held, split = [], "", "", [], ""
    for i, (own, wrote) in enumerate(zip(alone, streamed)):
        if SPLIT in own or held:  # a split character is open: the stream settles it once it is whole
            held.append(own)
            split += wrote
            if wrote:
                settled, held, split = settled + split, [], ""
        else:
            settled += own
        text = settled + "".join(held)
        stable = text.rstrip(SPLIT) if i + 1 < len(alone) else text
        if stable.startswith(done):
            shares.append(stable[len(done):])
            done = stable
        else:  # the stream rewrote earlier text: keep the shares in order
            shares.append("")
    return shares


def token_view_html(tokens: Sequence[TokenEvent], texts: Sequence[str], labels: Mapping[int, str],
                    measure: str = DEFAULT_MEASURE, marks: Mapping[int, str] | None = None) -> str:
    """The answer as one coloured span per token, each with a CSS hover/focus tooltip of its numbers.

    `texts[i]` is token i decoded on its own (TokenEvent.text can be "" while bytes are held back); a character
    split across tokens shows once, at the token that completes it (`token_shares`). `labels` maps token ids (the
    alternatives' too) to their decoded text. `marks` {index: short text} adds a note to a
    token's tooltip and a CSS class ("marked" and "mark-<slug>"). A token whose text holds a newline is
    followed by a line break, so the view reads like the text."""
    _check_measure(measure)
    if len(tokens) != len(texts):
        raise ValueError(f"token_view_html needs one text per token, got {len(tokens)} tokens and {len(texts)} texts")
    if not tokens:
        return EMPTY_VIEW
    marks = marks or {}
    parts = []
    shares = token_shares(texts, [t.text for t in tokens])
    for i, (event, own, text) in enumerate(zip(tokens, texts, shares)):
        value = token_value(event, measure)
        label = token_label(text)
        mark = marks.get(i)
        classes = "tok" + (f" marked mark-{_slug(mark)}" if mark else "") + ("" if event.stages else " nodist")
        style = f"background:{measure_colour(value, measure)};color:{text_colour(value, measure)}"
        parts.append(f'<span class="{_e(classes)}" data-i="{i}" tabindex="0" style="{style}">{_e(label)}'
                     f"{_tooltip(i, event, label, labels, measure, mark, SPLIT in own)}</span>")
        if "\n" in text:
            parts.append("<br>")
    return f'<div class="tokview" data-measure="{_e(measure)}">{"".join(parts)}</div>'


LEGEND_TICKS: dict[str, tuple[float, ...]] = {"raw": (0.0, 0.25, 0.5, 0.75, 1.0),
                                             "final": (0.0, 0.25, 0.5, 0.75, 1.0),
                                             "margin": (-1.0, 0.0, 1.0)}
LEGEND_SENTENCES: dict[str, str] = {
    "raw": ("Colour = the model's own probability for the token it wrote, before any sampling stage: strong "
            "means the model itself put most of its probability on this token, pale that it spread it over "
            "many options."),
    "final": ("Colour = the chosen token's probability in the distribution it was drawn from, after "
              "temperature, top-k, top-p and min-p: strong means the sampling settings left little choice, "
              "pale that the draw was among many options. It reflects the settings as much as the model."),
    "margin": ("Colour = the chosen token's raw probability minus that of the best other token: strong (near +1) "
               "means a clear winner, the middle (0) a near tie, pale (below 0) that a lower-ranked token "
               "was sampled."),
}
LEGEND_FOOTER = ("Hover over or tap a token for its numbers. ␣ marks a space, \\n a newline, ∅ a token that "
                 "adds no visible text on its own; uncoloured tokens have no recorded distribution.")


def _tick(value: float) -> str:
    return f"{value:g}"


def token_legend_html(measure: str = DEFAULT_MEASURE) -> str:
    """A gradient bar drawn from `measure_colour`, tick labels under it, and what the colour means."""
    _check_measure(measure)
    ticks = LEGEND_TICKS[measure]
    low, high = ticks[0], ticks[-1]
    steps = [low + (high - low) * k / 8 for k in range(9)]
    gradient = ", ".join(f"{measure_colour(v, measure)} {k * 12.5:g}%" for k, v in enumerate(steps))
    tick_spans = "".join(f'<span class="legend-tick" style="left:{(v - low) / (high - low) * 100:g}%">'
                         f"{_e(_tick(v))}</span>" for v in ticks)
    return (f'<div class="tok-legend" data-measure="{_e(measure)}">'
            f'<div class="legend-title">{_e(MEASURES[measure])}</div>'
            f'<div class="legend-bar" style="background:linear-gradient(to right, {gradient})"></div>'
            f'<div class="legend-ticks">{tick_spans}</div>'
            f'<p class="legend-text">{_e(LEGEND_SENTENCES[measure])}</p>'
            f'<p class="legend-text legend-footer">{_e(LEGEND_FOOTER)}</p></div>')


TOKEN_VIEW_CSS = """
.tokview { line-height: 1.9; font-size: 15px; overflow-wrap: anywhere; position: relative; }
.tokview-empty { color: #888; font-style: italic; }
.tok { position: relative; display: inline; padding: 1px 2px; margin: 0 1px; border-radius: 3px;
       cursor: help; box-decoration-break: clone; -webkit-box-decoration-break: clone; }
.tok:focus { outline: 2px solid #F58518; outline-offset: 1px; }
.tok.nodist { outline: 1px dashed #bbb; }
.tok.marked { border-bottom: 3px solid #F58518; }
.tok .tip { display: none; position: absolute; bottom: calc(100% + 6px); left: 0; z-index: 50;
            width: max-content; max-width: min(340px, 86vw); padding: 6px 8px; border-radius: 6px;
            background: #222; color: #f4f4f4; font-size: 12.5px; line-height: 1.45; font-weight: normal;
            text-align: left; white-space: normal; overflow-wrap: anywhere; word-break: break-word;
            box-shadow: 0 2px 8px rgba(0, 0, 0, .3); pointer-events: none; }
.tok:hover .tip, .tok:focus .tip, .tok:focus-within .tip { display: block; }
/* Three classes deep: the host page's prose rules colour every descendant (e.g. ".container .prose *"). */
.tok .tip .tip-row { display: block; color: #f4f4f4; }
.tok .tip .tip-head b { color: #fff; }
.tok .tip .tip-mark { color: #ffc98b; }
.tok .tip .tip-key { color: #aac8e4; }
.tok .tip .alts b { color: #ffc98b; }
@media (max-width: 480px) {
  /* Narrow screens: the tooltip spans the view's width just below the token's line, never off-screen. */
  .tok { position: static; }
  .tok .tip { bottom: auto; left: 0; right: 0; width: auto; max-width: none; margin-top: 1.7em; }
}
.tok-legend { max-width: 420px; font-size: 13px; margin: 4px 0 8px; }
.tok-legend .legend-title { font-weight: 600; margin-bottom: 2px; }
.tok-legend .legend-bar { height: 12px; border-radius: 3px; border: 1px solid #ccc; }
.tok-legend .legend-ticks { position: relative; height: 1.3em; margin: 0 6px; font-size: 11.5px; color: #555; }
.tok-legend .legend-tick { position: absolute; transform: translateX(-50%); }
.tok-legend .legend-text { margin: 2px 0; color: #444; }
.chips { line-height: 2.1; overflow-wrap: anywhere; }
.chip { display: inline-block; margin: 1px 2px; padding: 0 4px; border: 1px solid #c6dbef; border-radius: 4px;
        background: #f4f8fc; font-size: 13.5px; white-space: pre-wrap; vertical-align: top; line-height: 1.5; }
.chip .chip-id { display: block; font-size: 9.5px; color: #777; line-height: 1.1; }
.chip.special { background: #fde8d4; border-color: #F58518; color: #8a3c00; font-weight: 600; }
.dropped { margin-top: 10px; padding: 6px 8px; border-left: 3px solid #bbb; color: #777; font-size: 13px; }
.dropped .dropped-title { font-weight: 600; margin: 0 0 4px; }
.dropped ul { margin: 0; padding-left: 18px; }
.dropped .role { font-weight: 600; margin-right: 4px; }
.dropped s { color: #999; overflow-wrap: anywhere; }
"""


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
