"""The HTML views (answer tokens, their legend, prompt chips): the numbers and words they show, escaped."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest

from qdemo.core.events import MemorySample, StageTopN, TokenEvent
from qdemo.views.prompt import prompt_chips_html
from qdemo.views.tokens import (
    MEASURES,
    TOKEN_VIEW_CSS,
    measure_colour,
    token_legend_html,
    token_value,
    token_view_html,
)

CPU = MemorySample(device="cpu", rss_bytes=1)
VOID = {"br", "img", "hr", "input", "meta", "link"}


class Tree(HTMLParser):
    """Checks the HTML nests properly and collects every element with its attributes and own text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[dict] = []
        self.elements: list[dict] = []
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed: {[e['tag'] for e in self.stack]}"

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "children": []}
        if self.stack:
            self.stack[-1]["children"].append(element)
        self.elements.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1]["tag"] == tag, f"</{tag}> closes {self.stack[-1]['tag']}"
        self.stack.pop()

    def handle_data(self, data):
        for element in self.stack:
            element["text"] += data

    def with_class(self, name: str) -> list[dict]:
        return [e for e in self.elements if name in e["attrs"].get("class", "").split()]


def own_text(element: dict) -> str:
    """The element's text without its tooltip child."""
    tip = "".join(c["text"] for c in element["children"] if "tip" in c["attrs"].get("class", "").split())
    return element["text"].replace(tip, "", 1)


def event(token_id: int, stages: tuple[StageTopN, ...] = (), step: int = 0) -> TokenEvent:
    return TokenEvent(step=step, token_id=token_id, text="", stages=stages, step_seconds=0.1, kv_cache_bytes=0,
                      memory=CPU)


RAW = StageTopN("raw", (5, 7, 9), (0.5, 0.3, 0.2), chosen_prob=0.3)
TOP_K = StageTopN("top_k", (5, 7, 9), (0.6, 0.4, 0.0), chosen_prob=0.4)
LABELS = {5: "<script>", 7: ' "w"', 9: "你好"}


def chose(token_id: int, *stages: StageTopN) -> tuple[StageTopN, ...]:
    """The stages with chosen_prob set for `token_id`, as the engine records them."""
    return tuple(StageTopN(s.name, s.token_ids, s.probs, dict(zip(s.token_ids, s.probs))[token_id]) for s in stages)


# --- values and colours -------------------------------------------------------------------------------------

def test_measures_are_ordered_words_with_raw_first():
    assert list(MEASURES) == ["raw", "final", "margin"]
    assert MEASURES["raw"] == "raw probability (the model's own)"
    assert MEASURES["margin"] == "margin over the runner-up (raw)"


def test_token_value_per_measure():
    sampled_second = event(7, (TOP_K, RAW))  # stages given out of chain order on purpose
    assert token_value(sampled_second, "raw") == 0.3
    assert token_value(sampled_second, "final") == 0.4
    assert token_value(sampled_second, "margin") == pytest.approx(0.3 - 0.5)  # a lower-ranked token was sampled
    assert token_value(event(5, chose(5, RAW)), "margin") == pytest.approx(0.5 - 0.3)
    # Chosen outside the listed top-N: its own p against the best listed one.
    assert token_value(event(42, (StageTopN("raw", (5, 7), (0.6, 0.3), 0.01),)), "margin") == pytest.approx(-0.59)
    for measure in MEASURES:
        assert token_value(event(5), measure) is None
    beam = event(4, (StageTopN("beam", (4,), (0.9,), 0.9),))
    assert token_value(beam, "raw") == token_value(beam, "final") == 0.9
    assert token_value(beam, "margin") is None  # no runner-up recorded
    assert token_value(event(4, (StageTopN("beam", (4,), (math.nan,), math.nan),)), "raw") is None
    with pytest.raises(ValueError, match="measure"):
        token_value(sampled_second, "entropy")


@pytest.mark.parametrize("value, measure, colour", [
    (0.0, "raw", "rgb(247, 251, 255)"),  # pale end
    (1.0, "final", "rgb(8, 48, 107)"),  # strong end
    (0.5, "raw", "rgb(107, 174, 214)"),
    (0.3, "raw", "rgb(180, 210, 234)"),  # a fifth of the way from the 0.25 stop to the 0.5 stop
    (-1.0, "margin", "rgb(247, 251, 255)"),
    (0.0, "margin", "rgb(107, 174, 214)"),  # a tie sits mid-scale
    (-0.4, "margin", "rgb(180, 210, 234)"),  # (−0.4 + 1) / 2 = 0.3
    (1.0, "margin", "rgb(8, 48, 107)"),
    (1.7, "raw", "rgb(8, 48, 107)"),  # clipped
    (None, "raw", "transparent"),
    (math.nan, "margin", "transparent"),
])
def test_measure_colour(value, measure, colour):
    assert measure_colour(value, measure) == colour


# --- token view ---------------------------------------------------------------------------------------------

def test_token_view_one_span_per_token_coloured_by_the_measure():
    tokens = [event(7, (RAW, TOP_K), 0), event(5, chose(5, RAW, TOP_K), 1), event(9, (), 2)]
    html = token_view_html(tokens, [" 你好", "<script>", '"\n'], LABELS)
    tree = Tree(html)
    spans = tree.with_class("tok")
    assert [s["attrs"]["data-i"] for s in spans] == ["0", "1", "2"]
    assert [own_text(s) for s in spans] == ["␣你好", "<script>", '"\\n']
    # raw p 0.3 and 0.5 by hand on the scale; no stages: no colour.
    assert spans[0]["attrs"]["style"].startswith("background:rgb(180, 210, 234);")
    assert spans[1]["attrs"]["style"].startswith("background:rgb(107, 174, 214);")
    assert spans[2]["attrs"]["style"].startswith("background:transparent;")
    final = Tree(token_view_html(tokens, ["a", "b", "c"], LABELS, measure="final")).with_class("tok")
    # final p 0.4: three fifths of the way from the 0.25 stop (198, 219, 239) to the 0.5 stop (107, 174, 214).
    assert final[0]["attrs"]["style"].startswith("background:rgb(143, 192, 224);")
    with pytest.raises(ValueError, match="one text per token"):
        token_view_html(tokens, ["a"], LABELS)


def test_token_view_escapes_token_text_and_alternatives():
    html = token_view_html([event(5, chose(5, RAW)), event(7, (RAW,))], ["<script>", '"&\''], LABELS)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&quot;&amp;&#x27;" in html and '"&\'' not in html
    tree = Tree(html)
    assert not [e for e in tree.elements if e["tag"] == "script"]
    assert '␣"w"' in tree.with_class("tip")[0]["text"]  # the alternative's label, unescaped by the parser


def test_token_view_line_break_after_a_newline_token():
    html = token_view_html([event(1), event(2), event(3)], ["第一行\n", "x", "y"], {})
    assert html.count("<br>") == 1
    assert html.index("<br>") < html.index('data-i="1"')


def test_token_view_tooltip_shows_raw_final_measure_and_alternatives():
    tree = Tree(token_view_html([event(7, (RAW, TOP_K))], [" w"], LABELS, measure="margin"))
    text = tree.with_class("tip")[0]["text"]
    assert "raw p 30.0% · final p 40.0%" in text
    assert "margin over the runner-up (raw): -20.0 points" in text
    assert 'raw top-5: <script> 50.0% · ␣"w" 30.0% · 你好 20.0%' in text
    assert 'final top-5: <script> 60.0% · ␣"w" 40.0%' in text  # differs from raw, and p = 0 is left out
    bold = [e["text"] for e in tree.elements if e["tag"] == "b"]
    assert bold == ['␣w', '␣"w" 30.0%', '␣"w" 40.0%']  # the token itself, then the chosen one in each list


def test_token_view_tooltip_top_five_only_and_no_final_list_when_unchanged():
    ids = tuple(range(10, 17))
    probs = (0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05)
    raw = StageTopN("raw", ids, probs, 0.3)
    same = StageTopN("repetition_penalty", ids, probs, 0.3)
    text = Tree(token_view_html([event(10, (raw, same))], ["a"], {})).with_class("tip")[0]["text"]
    assert "raw top-5: #10 30.0% · #11 20.0% · #12 15.0% · #13 12.0% · #14 10.0%" in text
    assert "#15" not in text and "final top-5" not in text
    assert "raw probability (the model's own): 30.0%" in text


def test_token_view_beam_and_missing_stages():
    beam = event(4, (StageTopN("beam", (4,), (0.9,), 0.9),))
    html = token_view_html([beam, event(8)], ["好", "!"], {4: "好"})
    tips = [t["text"] for t in Tree(html).with_class("tip")]
    assert "beam transition p 90.0%" in tips[0] and "final p" not in tips[0] and "top-5" not in tips[0]
    assert "no distribution recorded" in tips[1]


def test_token_view_marks_add_a_class_and_a_note():
    html = token_view_html([event(7, (RAW, TOP_K)), event(5, chose(5, RAW, TOP_K))], ["a", "b"], LABELS,
                           marks={1: "changed by top-p"})
    spans = Tree(html).with_class("tok")
    assert spans[0]["attrs"]["class"] == "tok"
    assert spans[1]["attrs"]["class"].split() == ["tok", "marked", "mark-changed-by-top-p"]
    assert "changed by top-p" in Tree(html).with_class("tip")[1]["text"]


def test_token_view_empty_and_bad_measure():
    html = token_view_html([], [], {})
    assert html.startswith("<p") and "tok" not in Tree(html).elements[0]["attrs"]["class"].split()
    with pytest.raises(ValueError, match="measure"):
        token_view_html([], [], {}, measure="entropy")


# --- legend and CSS -----------------------------------------------------------------------------------------

def test_legend_ticks_gradient_and_sentence_per_measure():
    raw = Tree(token_legend_html("raw"))
    assert [t["text"] for t in raw.with_class("legend-tick")] == ["0", "0.25", "0.5", "0.75", "1"]
    bar = raw.with_class("legend-bar")[0]["attrs"]["style"]
    assert "rgb(247, 251, 255) 0%" in bar and "rgb(107, 174, 214) 50%" in bar and "rgb(8, 48, 107) 100%" in bar
    margin = Tree(token_legend_html("margin"))
    assert [t["text"] for t in margin.with_class("legend-tick")] == ["-1", "0", "1"]
    assert [t["attrs"]["style"] for t in margin.with_class("legend-tick")] == ["left:0%", "left:50%", "left:100%"]
    sentences = {m: Tree(token_legend_html(m)).with_class("legend-text")[0]["text"] for m in MEASURES}
    assert len(set(sentences.values())) == 3
    assert "model's own" in sentences["raw"] and "sampling settings" in sentences["final"]
    assert "runner" not in sentences["final"] and "was sure" not in sentences["final"]
    assert "best other token" in sentences["margin"]


def test_css_hides_tooltips_until_hover_or_focus():
    css = TOKEN_VIEW_CSS
    assert ".tok .tip { display: none;" in css
    assert ".tok:hover .tip, .tok:focus .tip" in css
    assert "max-width: min(340px, 86vw)" in css and "overflow-wrap: anywhere" in css
    assert "@media (max-width: 480px)" in css
    for selector in (".tok-legend", ".chip.special", ".dropped"):
        assert selector in css


# --- prompt chips -------------------------------------------------------------------------------------------

PROMPT = [(151644, "<|im_start|>", True), (872, "user", False), (198, "\n", False), (108386, "你好", False),
          (1, '"<b>&', False), (151645, "<|im_end|>", True)]


def test_prompt_chips_text_id_and_special():
    tree = Tree(prompt_chips_html(PROMPT))
    chips = tree.with_class("chip")
    assert [c["children"][0]["text"] for c in chips] == ["<|im_start|>", "user", "\\n", "你好", '"<b>&', "<|im_end|>"]
    assert [c["children"][1]["text"] for c in chips] == ["151644", "872", "198", "108386", "1", "151645"]
    assert ["special" in c["attrs"]["class"].split() for c in chips] == [True, False, False, False, False, True]
    assert not tree.with_class("dropped")


def test_prompt_chips_escape_and_break_after_newlines():
    html = prompt_chips_html(PROMPT)
    assert "<|im_start|>" not in html and "&lt;|im_start|&gt;" in html
    assert "&quot;&lt;b&gt;&amp;" in html
    assert html.count("<br>") == 1 and html.index("<br>") < html.index("108386")


def test_prompt_chips_list_dropped_messages():
    html = prompt_chips_html(PROMPT[:2], dropped=[("user", "x" * 100), ("assistant", "<b>早上好</b>")])
    tree = Tree(html)
    section = tree.with_class("dropped")[0]
    assert "left out to fit the context (2 messages)" in section["text"]
    items = [e for e in tree.elements if e["tag"] == "li"]
    assert [i["children"][0]["text"] for i in items] == ["user", "assistant"]
    struck = [e["text"] for e in tree.elements if e["tag"] == "s"]
    assert struck == ["x" * 80 + "…", "<b>早上好</b>"]
    assert "<b>早上好" not in html


def test_prompt_chips_empty():
    assert prompt_chips_html([]).startswith("<p")
    only_dropped = Tree(prompt_chips_html([], dropped=[("system", "hi")]))
    assert only_dropped.with_class("dropped") and not only_dropped.with_class("chip")


def test_one_percentage_format_everywhere():
    from qdemo.views.labels import percent

    assert [percent(p) for p in (0.1234, 1.0, 0.0, 0.0004, 0.0005, None, float("nan"))] == \
        ["12.3%", "100.0%", "0%", "<0.1%", "0.1%", "–", "–"]
    assert [percent(p, places=0) for p in (0.004, 0.006, 0.876)] == ["<1%", "1%", "88%"]
