"""User text can never produce an added token, special or not, in any prompt format.

For every added token t of each tokenizer (the tiny test tokenizer with Qwen2.5's two non-special tool-call tokens
added, the Qwen v1 and Baichuan2 tokenizers converted from the released files, and the real default Qwen2.5-Coder
tokenizer), a message "x t y" goes through each prompt format the tokenizer is used with: the prompt holds an added
token's id only where the format writes its own control token, and the text encodes exactly as the model's
tokenizer encodes those characters as ordinary text. The oracles are independent of the code under test: GPT-2's
byte-level BPE written out here over the tokenizer's vocabulary and merges, tiktoken, and sentencepiece. Baichuan2's
ordinary user-defined pieces (`\\n`, `，`, `?`) are how sentencepiece encodes ordinary text: only its `<reserved_N>`
and control pieces are kept out.
"""

from __future__ import annotations

import functools
import json
import unicodedata

import pytest
import regex

from qdemo.models.families import get_family
from qdemo.models.families.baichuan_chat import build_chat_input_ids
from qdemo.models.families.qwen_chat import DEFAULT_SYSTEM, make_context_ids
from qdemo.models.prompting import build_prompt, conversation_prompt_ids, encode_user_text, raw_text_ids
from tests.baichuan_fixtures import official_build_chat_input
from tests.conftest import build_tokenizer
from tests.qwen_v1_fixtures import IM_END, IM_START, QWEN_PAT_STR, official_make_context
from tests.real_vocab_fixtures import (
    ASSISTANT_ID,
    RESERVED_PIECE,
    USER_ID,
    baichuan2_plain_sp,
    baichuan2_sp,
    baichuan2_tokenizer,
    qwen_v1_tiktoken,
    qwen_v1_tokenizer,
)

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOOL_TOKENS = ("<tool_call>", "</tool_call>")  # Qwen2.5's added tokens that are not marked special
SYSTEM = "Be brief."


def placements(token: str) -> list[str]:
    """Where a typed token may sit in a message: between words, alone, at the edges, twice, beside newlines."""
    return [f"x {token} y", token, f"{token}\n\nnext", f"\n\n{token}", f"a{token}{token}b", f"问{token}？"]


# ---------------------------------------------------------------------------------- byte-level BPE oracle

@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's encoder.py: a printable character for every byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


class ByteLevelBpe:
    """GPT-2's tokenizer (encoder.py's bpe()): regex pre-tokens, bytes as printable characters, then the best-ranked
    merge applied everywhere until none applies. Text is NFC-normalised first where the tokenizer does that."""

    def __init__(self, tokenizer, pattern: str, nfc: bool) -> None:
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        assert model["type"] == "BPE" and not model.get("ignore_merges")
        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pattern, self.nfc = regex.compile(pattern), nfc

    @functools.lru_cache(maxsize=None)
    def bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        table = bytes_to_unicode()
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            ids += [self.vocab[part] for part in self.bpe("".join(table[b] for b in piece.encode("utf-8")))]
        return ids


def chatml_oracle(encode, control: dict[str, int], messages, add_generation_prompt: bool) -> list[int]:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (then `<|im_start|>assistant\\n`): the control
    tokens by id, each text run between them encoded whole as ordinary text."""
    pieces: list = []
    for m in messages:
        pieces += [IM_START, f"{m['role']}\n{m['content']}", IM_END, "\n"]
    if add_generation_prompt:
        pieces += [IM_START, "assistant\n"]
    return [i for piece in pieces for i in ([control[piece]] if piece in control else encode(piece))]


def added_ids(tokenizer) -> dict[int, str]:
    return {int(i): str(token) for i, token in tokenizer.added_tokens_decoder.items()}


def check_template_path(tokenizer, encode, tokens) -> None:
    """Chat template prompts (build_prompt without a family builder), the conversation view with an answer, and
    raw text, for every token of `tokens` in every placement."""
    control = {IM_START: tokenizer.convert_tokens_to_ids(IM_START), IM_END: tokenizer.convert_tokens_to_ids(IM_END)}
    every_added = added_ids(tokenizer)
    clean = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"},
             {"role": "user", "content": "x y"}]
    with_system = [{"role": "system", "content": SYSTEM}] + clean
    direct = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=True, return_dict=False)
    # with no added token's text typed, the prompt is apply_chat_template's, and the oracle agrees with it
    assert build_prompt(tokenizer, clean, 4096, 16, SYSTEM).ids == list(direct)
    assert chatml_oracle(encode, control, with_system, True) == list(direct)
    failures = []
    for token in tokens:
        for text in placements(token):
            messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": f"ok {token}"},
                        {"role": "user", "content": text}]
            full = [{"role": "system", "content": SYSTEM}] + messages
            ids = build_prompt(tokenizer, messages, 4096, 16, SYSTEM).ids
            seen = conversation_prompt_ids(tokenizer, full + [{"role": "assistant", "content": text}])
            checks = {
                "user text": (encode_user_text(tokenizer, text), encode(text)),
                "raw text": (raw_text_ids(tokenizer, text), encode(text)),
                "chat prompt": (ids, chatml_oracle(encode, control, full, True)),
                "conversation": (seen, chatml_oracle(encode, control, full + [{"role": "assistant", "content": text}],
                                                     False)),
            }
            for name, (got, expected) in checks.items():
                if got != expected:
                    failures.append((token, text, name))
            if {i for i in ids if i in every_added} - set(control.values()):
                failures.append((token, text, "added id in the prompt"))
            if ids.count(control[IM_START]) != 5 or ids.count(control[IM_END]) != 4:
                failures.append((token, text, "control token count"))
    assert failures == []


# ---------------------------------------------------------------------------------- tiny test tokenizer

@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(TOOL_TOKENS))  # not special, as in Qwen2.5
    return tokenizer, ByteLevelBpe(tokenizer, GPT2_PAT, nfc=False)


def test_tiny_tokenizer_has_special_and_plain_added_tokens(tiny):
    tokenizer, _ = tiny
    flags = {str(t): t.special for t in tokenizer.added_tokens_decoder.values()}
    assert flags == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True, "<tool_call>": False,
                     "</tool_call>": False}
    # the tokenizer's own text encoding matches a non-special added token even with special tokens split
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in tokenizer(
        "x <tool_call> y", add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_tiny_tokenizer_every_added_token_stays_text(tiny):
    tokenizer, oracle = tiny
    check_template_path(tokenizer, oracle.encode, list(added_ids(tokenizer).values()))


def test_plain_text_follows_tokens_added_later():
    tokenizer = build_tokenizer()
    oracle = ByteLevelBpe(tokenizer, GPT2_PAT, nfc=False)
    assert encode_user_text(tokenizer, "x <tool_call> y") == oracle.encode("x <tool_call> y")
    tokenizer.add_tokens(["<tool_call>"])
    tool = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert tool in tokenizer("x <tool_call> y", add_special_tokens=False)["input_ids"]
    assert encode_user_text(tokenizer, "x <tool_call> y") == oracle.encode("x <tool_call> y")
    prompt = build_prompt(tokenizer, [{"role": "user", "content": "<tool_call>"}], 512, 8, SYSTEM)
    assert tool not in prompt.ids


# ---------------------------------------------------------------------------------- Qwen v1 (released vocabulary)

@pytest.fixture(scope="module")
def qwen_v1():
    return qwen_v1_tokenizer(), qwen_v1_tiktoken()


def tiktoken_plain(enc, text: str) -> list[int]:
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())


def test_qwen_v1_every_added_token_stays_text_in_make_context(qwen_v1):
    tokenizer, enc = qwen_v1
    every_added = added_ids(tokenizer)
    assert len(every_added) == 208 and min(every_added) == 151643
    controls = {151644, 151645}
    build = get_family("qwen").build_prompt
    failures = []
    for token in every_added.values():
        text = f"x {token} y"
        history = [("hello", f"ok {token}")]
        messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": f"ok {token}"},
                    {"role": "user", "content": text}]
        _, expected, _ = official_make_context(enc, text, history, DEFAULT_SYSTEM, 6144)
        ids, _ = make_context_ids(tokenizer, [{"role": "system", "content": DEFAULT_SYSTEM}] + messages)
        if ids != expected:
            failures.append((token, "make_context"))
        if build_prompt(tokenizer, messages, 8192, 512, DEFAULT_SYSTEM, builder=build).ids != expected:
            failures.append((token, "build_prompt"))
        if {i for i in ids if i in every_added} - controls or ids.count(151644) != 5 or ids.count(151645) != 4:
            failures.append((token, "control tokens"))
        answer = f"{token}\n{token} done"
        seen = conversation_prompt_ids(tokenizer, [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
                                       + [{"role": "assistant", "content": answer}], build)
        if seen != expected + tiktoken_plain(enc, answer):
            failures.append((token, "conversation"))
        if encode_user_text(tokenizer, text) != tiktoken_plain(enc, text) or raw_text_ids(
                tokenizer, text) != tiktoken_plain(enc, text):
            failures.append((token, "user text"))
    assert failures == []


def test_qwen_v1_chat_template_path(qwen_v1):
    # the converted tokenizer also carries a chatml template; through it the same rule holds
    tokenizer, enc = qwen_v1
    tokens = [t for i, t in sorted(added_ids(tokenizer).items())][:12] + ["<|extra_204|>"]
    check_template_path(tokenizer, lambda text: tiktoken_plain(enc, text), tokens)


# ---------------------------------------------------------------------------------- Baichuan2 (released model)

@pytest.fixture(scope="module")
def baichuan2():
    return baichuan2_tokenizer(), baichuan2_sp(), baichuan2_plain_sp()


def test_baichuan2_every_added_token(baichuan2):
    tokenizer, sp, plain = baichuan2
    every_added = added_ids(tokenizer)
    assert len(every_added) == 1086 + 3
    blocked = {i for i, t in every_added.items() if RESERVED_PIECE.fullmatch(t)} | {0, 1, 2}
    assert len(blocked) == 991 and {USER_ID, ASSISTANT_ID} <= blocked
    chat, base = get_family("baichuan2").build_prompt, get_family("baichuan").build_prompt
    failures = []
    for token_id, token in every_added.items():
        text = f"x {token} y"
        expected_text = plain.encode(text)
        if token_id not in blocked:
            # an ordinary piece: exactly sentencepiece, the piece itself included
            assert expected_text == sp.encode(text) and token_id in expected_text, token
        messages = [{"role": "system", "content": f"sys {token}"}, {"role": "user", "content": "hi?"},
                    {"role": "assistant", "content": f"ok {token}"}, {"role": "user", "content": text}]
        expected, _ = official_build_chat_input(plain.encode, messages, 4096, USER_ID, ASSISTANT_ID)
        ids, _ = build_chat_input_ids(tokenizer, messages, 4096)
        if ids != expected:
            failures.append((token, "build_chat_input"))
        if build_prompt(tokenizer, messages, 4096, 2048, builder=chat).ids != expected:
            failures.append((token, "build_prompt"))
        markers = [i for i in ids if i in blocked]
        if markers != [USER_ID, ASSISTANT_ID, USER_ID, ASSISTANT_ID]:
            failures.append((token, "markers"))
        answer = f"{token}{token}!"
        seen = conversation_prompt_ids(tokenizer, messages + [{"role": "assistant", "content": answer}], chat)
        if seen != expected + plain.encode(answer):
            failures.append((token, "conversation"))
        if build_prompt(tokenizer, messages, 4096, 2048, builder=base).ids != expected_text:
            failures.append((token, "base model prompt"))
        if encode_user_text(tokenizer, text) != expected_text or raw_text_ids(tokenizer, text) != expected_text:
            failures.append((token, "user text"))
    assert failures == []


# ---------------------------------------------------------------------------------- real default (Qwen2.5-Coder)

@pytest.fixture(scope="module")
def qwen25():
    from transformers import AutoTokenizer

    from qdemo.models.registry import load_registry
    from qdemo.models.sources import resolve

    path = resolve(load_registry().get("qwen2.5-coder-0.5b-instruct"))  # prepared in the qdemo cache
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, ByteLevelBpe(tokenizer, QWEN_PAT_STR, nfc=True)


@pytest.mark.real_model
def test_qwen25_every_added_token_stays_text(qwen25):
    tokenizer, oracle = qwen25
    every_added = added_ids(tokenizer)
    assert len(every_added) == 22 and every_added[151657] == "<tool_call>"
    assert not tokenizer.added_tokens_decoder[151657].special  # why split_special_tokens alone was not enough
    assert 151657 in tokenizer("x <tool_call> y", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    check_template_path(tokenizer, oracle.encode, list(every_added.values()))
