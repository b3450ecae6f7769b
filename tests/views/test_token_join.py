"""Issue 19, item 13: a character split over several tokens (rare CJK, emoji in byte-level BPE) showed in the
Chat's token view as "␣�" and "�" per token. Each token must show its share of the text, the split character
once, at the token that completes it — what the tokenizer's own decode of each prefix says
(qdemo.probes.attribution.token_pieces, the attribution view's join, is the oracle).

Two vocabularies: the tests' byte-level BPE (quick; characters outside its small corpus fall apart into bytes)
and the real Qwen2.5 tokenizer of the prepared default (real_model), where " 鬱" is " \\xe9" + two bytes.
"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from transformers import AutoTokenizer

from qdemo.core.events import MemorySample, TokenEvent
from qdemo.core.textstream import IncrementalDetokenizer
from qdemo.models.registry import load_registry
from qdemo.models.sources import resolve
from qdemo.probes.attribution import token_pieces
from qdemo.views.labels import token_label
from qdemo.views.tokens import token_shares, token_view_html
from tests.conftest import build_tokenizer

CPU = MemorySample(device="cpu", rss_bytes=1)
TEXTS = ["说 鬱 ok", "a 🦀 b 看 饕餮", "龘龘 齉。", "表情 🚀🌍 和中文"]


class Spans(HTMLParser):
    """Each token span's own text (its tooltip left out), in order."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self.depth = 0  # > 0 inside a token span; the tooltip span is deeper
        self.tip = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "span" and "tok" in classes:
            self.texts.append("")
            self.depth = 1
        elif self.depth and tag == "span":
            self.depth += 1
            self.tip += "tip" in classes or self.tip > 0

    def handle_endtag(self, tag):
        if self.depth and tag == "span":
            self.depth -= 1
            self.tip = max(0, self.tip - 1)

    def handle_data(self, data):
        if self.depth == 1 and not self.tip:
            self.texts[-1] += data


def streamed_answer(tokenizer, text: str) -> tuple[list[int], list[TokenEvent], list[str]]:
    """`text` as an answer the engine streamed: the ids, their events (the stream's text on each, as
    qdemo.core.emit writes it: held back while a character is incomplete) and each token decoded alone (what the
    chat hands the view)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    streamed = [detok.push(i) for i in ids]
    streamed[-1] += detok.flush()
    events = [TokenEvent(step=k, token_id=i, text=s, stages=(), step_seconds=0.1, kv_cache_bytes=0, memory=CPU)
              for k, (i, s) in enumerate(zip(ids, streamed))]
    return ids, events, [tokenizer.decode([i]) for i in ids]


def test_the_token_view_shows_a_split_character_once_at_the_token_completing_it():
    """The tests' small BPE splits most CJK characters and emoji into single bytes, and one of its tokens may end
    a character and begin the next: the run's record (each token alone, the stream) cannot say where the first
    ends, so both show at the token completing the second. Never before the character is whole, never as "�"."""
    tokenizer = build_tokenizer()
    for text in TEXTS:
        ids, events, alone = streamed_answer(tokenizer, text)
        assert any("\ufffd" in a for a in alone)  # the vocabulary really splits this text
        shares = token_shares(alone, [e.text for e in events])
        assert "".join(shares) == text and not any("\ufffd" in s for s in shares), shares
        pieces = token_pieces(tokenizer.decode, ids)
        for i in range(len(ids)):  # what the tokens up to i show is what the tokenizer has completed by then
            assert len("".join(shares[:i + 1])) <= len("".join(pieces[:i + 1])), (text, i)
        assert Spans(token_view_html(events, alone, {})).texts == [token_label(s) for s in shares]


@pytest.mark.real_model
def test_the_token_view_joins_split_characters_as_the_real_qwen_tokenizer_decodes():
    tokenizer = AutoTokenizer.from_pretrained(str(resolve(load_registry().get("qwen2.5-coder-0.5b-instruct"))))
    ids, events, alone = streamed_answer(tokenizer, "说 鬱")
    assert alone[1:] == [" \ufffd", "\ufffd", "\ufffd"]  # the "␣�" the issue saw
    assert Spans(token_view_html(events, alone, {})).texts == ["说", "␣", "∅", "鬱"]
    for text in TEXTS:
        ids, events, alone = streamed_answer(tokenizer, text)
        assert token_shares(alone, [e.text for e in events]) == token_pieces(tokenizer.decode, ids), text
