from __future__ import annotations

import pytest

from qdemo.core.textstream import IncrementalDetokenizer

TEXTS = ["你好，世界！", "emoji 🚀🌍✨ mixed 中文 and English", "café naïve 😀", "plain ascii"]


@pytest.fixture(scope="module")
def byte_tokenizer():
    from tests.conftest import build_tokenizer

    return build_tokenizer(merges=False)  # every UTF-8 byte its own token


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    detok = IncrementalDetokenizer(byte_tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_incomplete_tail_is_dropped_at_flush(byte_tokenizer):
    ids = byte_tokenizer.encode("ok 你")[:-1]
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert "".join(detok.push(i) for i in ids) == "ok "
    assert detok.flush() == "" and detok.text == "ok "


def test_genuinely_invalid_bytes_are_shown_once_followed(byte_tokenizer):
    # a lone continuation byte is invalid, not incomplete: it appears once more text follows it
    lone = byte_tokenizer.convert_tokens_to_ids(byte_tokenizer.convert_ids_to_tokens(byte_tokenizer.encode("é")[1]))
    ids = byte_tokenizer.encode("a") + [lone] + byte_tokenizer.encode("b")
    detok = IncrementalDetokenizer(byte_tokenizer)
    for i in ids:
        detok.push(i)
    assert detok.text == "a\ufffdb"
