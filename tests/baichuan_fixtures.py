"""Tiny Baichuan-style sentencepiece tokenizers trained in-process, and oracles built on sentencepiece itself.

Each style mirrors what is known of a real tokenizer.model: BPE, byte fallback, split digits, unk/bos/eos = 0/1/2,
user-defined `<reserved_N>` pieces with the chat role markers at ids 195/196, and the pad token `<unk>` named in
tokenizer_config.json (the Baichuan-13B-Chat / Baichuan2-*-Chat configs). Baichuan 2's report says it adds no dummy
prefix and applies no normalization; Baichuan 1 adds the dummy prefix. "sp-defaults" takes sentencepiece's own
defaults (nmt_nfkc, extra whitespace removed) to show the conversion follows whatever the proto says.
"""

from __future__ import annotations

import functools
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import sentencepiece as spm


@dataclass(frozen=True)
class SpStyle:
    name: str
    add_dummy_prefix: bool
    normalization: str  # sentencepiece normalization_rule_name
    remove_extra_whitespaces: bool
    roles: tuple[str, str]  # the pieces at ids 195 (user) and 196 (assistant)


STYLES = {
    "baichuan1": SpStyle("baichuan1", True, "identity", False, ("<reserved_102>", "<reserved_103>")),
    "baichuan2": SpStyle("baichuan2", False, "identity", False, ("<reserved_106>", "<reserved_107>")),
    "sp-defaults": SpStyle("sp-defaults", True, "nmt_nfkc", True, ("<reserved_106>", "<reserved_107>")),
}
USER_ID, ASSISTANT_ID = 195, 196
VOCAB_SIZE = 1200

_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, hello model!",
    "Large language models predict the next token.", "def add(a, b):\n    return a + b",
    "for i in range(10):\n\tprint(i)", "Numbers like 12345 and 3.14159 appear often.",
    "She said: \"it's fine\" -- and left.", "Baichuan is a bilingual model trained on many tokens.",
    "Please answer briefly and politely.", "What is the capital of France?",
]
_CHINESE = [
    "你好，世界！今天天气很好。", "我们一起学习语言模型。", "百川大模型是由百川智能的工程师们创造的。",
    "请问有什么我可以帮助你的吗？", "北京是中国的首都，上海是最大的城市。", "人工智能正在改变我们的生活和工作方式。",
    "这个问题的答案是四十二。", "我喜欢吃苹果和香蕉。", "世界上第二高的山峰是哪座？", "你叫什么名字？",
]


def _sentences(count: int = 3000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        parts = [rng.choice(_ENGLISH + _CHINESE) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.3:  # shuffled words give the merges some variety beyond the fixed sentences
            words = " ".join(parts).split(" ")
            rng.shuffle(words)
            parts = [" ".join(words)]
        yield rng.choice([" ", "", "  ", "\n", "\t"]).join(parts)


def user_defined_pieces(style_name: str) -> list[str]:
    """ids 3..196 (after unk/bos/eos): fillers, then the two role markers at 195 and 196."""
    return [f"<reserved_{1000 + i}>" for i in range(3, USER_ID)] + list(STYLES[style_name].roles)


@functools.lru_cache(maxsize=None)
def train_sp_model(style_name: str) -> bytes:
    """Serialized tokenizer.model for a style (deterministic; a fraction of a second)."""
    style = STYLES[style_name]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(), model_writer=writer, model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, add_dummy_prefix=style.add_dummy_prefix,
        normalization_rule_name=style.normalization, remove_extra_whitespaces=style.remove_extra_whitespaces,
        allow_whitespace_only_pieces=True, user_defined_symbols=user_defined_pieces(style_name), unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, max_sentencepiece_length=16, hard_vocab_limit=False, minloglevel=2)
    data = writer.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=data)
    assert processor.piece_to_id(style.roles[0]) == USER_ID and processor.piece_to_id(style.roles[1]) == ASSISTANT_ID
    return data


def _added_token(content: str) -> dict:
    # how Baichuan's tokenizer_config.json spells its special tokens
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": True}


def write_baichuan_tokenizer(path: Path, chat: bool = True, style: str | None = None,
                             config_overrides: dict | None = None) -> int:
    """Write an original-layout Baichuan tokenizer (tokenizer.model, tokenizer_config.json naming the remote
    BaichuanTokenizer, special_tokens_map.json) into path; returns the vocabulary size.

    The style defaults to Baichuan 2's (no dummy prefix) for chat models and Baichuan 1's for the base model."""
    style = style or ("baichuan2" if chat else "baichuan1")
    path.mkdir(parents=True, exist_ok=True)
    data = train_sp_model(style)
    (path / "tokenizer.model").write_bytes(data)
    config = {
        "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": _added_token("<s>"), "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>"),
        "model_max_length": 4096, "pad_token": _added_token("<unk>"), "sp_model_kwargs": {},
        "tokenizer_class": "BaichuanTokenizer", "unk_token": _added_token("<unk>"),
        **(config_overrides or {}),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    token_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in config}
    (path / "special_tokens_map.json").write_text(json.dumps(token_map, indent=2), encoding="utf-8")
    return spm.SentencePieceProcessor(model_proto=data).get_piece_size()


def sp_oracle(style_name: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=train_sp_model(style_name))


# ---- the plain-text oracle: the same model with its user-defined pieces marked UNUSED ----
# sentencepiece never emits an unused piece and does not match it in text, so this processor encodes
# "<reserved_106>" from its characters: what "user text stays plain text" means, computed by sentencepiece.

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _messages(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field, wire type, raw value bytes) for each field; varints come back re-encoded."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            raw = _varint(value)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            raw, pos = buf[pos:pos + size], pos + size
        else:
            size = {1: 8, 5: 4}[wire]
            raw, pos = buf[pos:pos + size], pos + size
        yield field, wire, raw


def proto_pieces(data: bytes) -> list[tuple[str, int]]:
    """(text, type) of each piece of a serialized ModelProto, read here (proto2 default type NORMAL = 1)."""
    pieces = []
    for field, _, raw in _messages(data):
        if field == 1:
            text, kind = "", 1
            for sub, _, value in _messages(raw):
                if sub == 1:
                    text = value.decode("utf-8")
                elif sub == 3:
                    kind = _read_varint(value, 0)[0]
            pieces.append((text, kind))
    return pieces


def _unused_piece(piece: bytes, unused: Callable[[str], bool]) -> bytes:
    text = next((raw.decode("utf-8") for field, _, raw in _messages(piece) if field == 1), "")
    out = b""
    for field, wire, raw in _messages(piece):
        if field == 3 and raw == _varint(4) and unused(text):  # USER_DEFINED -> UNUSED
            raw = _varint(5)
        out += _varint(field << 3 | wire) + (_varint(len(raw)) if wire == 2 else b"") + raw
    return out


def with_unused_pieces(data: bytes, unused: Callable[[str], bool]) -> bytes:
    """The ModelProto with the user-defined pieces whose text `unused` accepts marked UNUSED."""
    out = b""
    for field, wire, raw in _messages(data):
        if field == 1:
            raw = _unused_piece(raw, unused)
        out += _varint(field << 3 | wire) + (_varint(len(raw)) if wire == 2 else b"") + raw
    return out


@functools.lru_cache(maxsize=None)
def plain_oracle_proto(style_name: str) -> bytes:
    return with_unused_pieces(train_sp_model(style_name), lambda text: True)


def plain_oracle(style_name: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=plain_oracle_proto(style_name))


# ---- the official build_chat_input, restated over a plain `encode(text) -> ids` ----

def official_build_chat_input(encode: Callable[[str], list[int]], messages: Sequence[dict[str, str]],
                              max_input_tokens: int, user_token_id: int = USER_ID,
                              assistant_token_id: int = ASSISTANT_ID) -> tuple[list[int], int]:
    """Baichuan2-*-Chat generation_utils.build_chat_input with max_input_tokens = model_max_length −
    max_new_tokens, statement by statement; returns the ids and how many rounds (newest first) were kept."""
    system, rounds, current = "", [], []
    for i, message in enumerate(messages):
        if message["role"] == "system":
            assert i == 0
            system = message["content"]
            continue
        if message["role"] == "user" and current:
            rounds.append(current)
            current = []
        current.append(message)
    if current:
        rounds.append(current)

    system_tokens = encode(system)
    max_history_tokens = max_input_tokens - len(system_tokens)
    history_tokens: list[int] = []
    kept = 0
    for round_messages in rounds[::-1]:
        round_tokens: list[int] = []
        for message in round_messages:
            round_tokens.append(user_token_id if message["role"] == "user" else assistant_token_id)
            round_tokens.extend(encode(message["content"]))
        if len(history_tokens) == 0 or len(history_tokens) + len(round_tokens) <= max_history_tokens:
            history_tokens = round_tokens + history_tokens
            kept += 1
            if len(history_tokens) < max_history_tokens:
                continue
        break

    input_tokens = system_tokens + history_tokens
    if messages[-1]["role"] != "assistant":
        input_tokens.append(assistant_token_id)
    return input_tokens[-max_input_tokens:], kept


# Texts the tokenizer tests compare on: scripts, digits, every kind of whitespace, byte fallback, markers.
CHECK_TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "你好，世界！今天天气很好。",
    "mixed 中文 and English: 百川 model 123", "12345 + 678 = 13023, pi ≈ 3.14159", "  two leading spaces",
    "trailing spaces   ", "many     inner   spaces", "line one\nline two\n\nend\n", "\ttabbed\tcolumns\t",
    " \n \t mixed whitespace \n", "def f(x):\n    return x * 2\n", "emoji 🚀🌍✨ and 👍🏽", "rare CJK 𠮷 龘 䶮 and é ñ ü",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３", "literal ▁ marks▁here", "▁start", "", " ", "   ", "\n", "a",
    "say <reserved_106> then <reserved_107> please", "hi<reserved_106>", "x</s>y<s>z<unk>", "<reserved_10",
]
# Texts that start with a user-defined piece: with a dummy prefix sentencepiece puts a lone "▁" first, which
# the converted tokenizer's added-token matching cannot (a documented difference; encode_plain is unaffected).
LEADING_MARKER_TEXTS = ["<reserved_106>hello", "<reserved_107>", "<reserved_102> 你好"]


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghij klmnop  \n\t你好世界中国人民的了是0123456789🚀é.,!?<>_▁ＡＢ") + [
        "<reserved_106>", "<reserved_107>", "</s>", "<s>", "  ", "   "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]
