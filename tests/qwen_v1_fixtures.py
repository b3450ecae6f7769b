"""A tiny but real qwen.tiktoken for the Qwen v1 tests, and the tiktoken oracle that the original QWenTokenizer is.

The vocabulary is learned here by a small greedy BPE over a mixed corpus (English, Chinese, digits, code, runs of
spaces and newlines, emoji), so it has multi-byte and partial-UTF-8 tokens like the released file. The single bytes
get cl100k's order (printable bytes first), not byte order, so nothing may assume rank == byte value. A few whole
words are then added as tokens that greedy merging never reaches (tiktoken still emits them for a pre-token that
is exactly that word), which is the case the whole-token shortcut of a BPE port has to get right, and multi-digit
tokens that Qwen's single-digit pre-tokenizer must never produce.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections import Counter
from pathlib import Path

import regex

# Facts from Qwen's tokenization_qwen.py, written out here so the oracle does not lean on the code under test.
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

TRAIN_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello model! I'm sure we'll see; they've said it.",
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n\n\nprint(is_prime(12345))\n",
    "你好，世界！今天天气很好。我们一起学习语言模型。你是一个有用的助手。北京是中国的首都。",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2023 3.14159 -7 1,000,000",
    "  two  spaces   three    four\n\nblank\n\n\nlines\r\nwindows\ttab\t\tend  \n",
    "emoji 🙂👍🏽🚀 café naïve résumé Ελληνικά русский 日本語 한국어",
    "system user assistant\nsystem\nuser\nassistant\n",
]
N_MERGES = 420
BYTE_ORDER = [*range(33, 127), *range(161, 173), *range(174, 256)]
BYTE_ORDER += [b for b in range(256) if b not in BYTE_ORDER]


def _pretokens(text: str) -> list[bytes]:
    return [m.encode("utf-8") for m in regex.findall(QWEN_PAT_STR, unicodedata.normalize("NFC", text))]


def learn_ranks(corpus: list[str] = TRAIN_CORPUS, n_merges: int = N_MERGES) -> dict[bytes, int]:
    """Greedy byte-level BPE: repeatedly merge the most frequent adjacent pair (ties: smallest bytes)."""
    ranks = {bytes([b]): rank for rank, b in enumerate(BYTE_ORDER)}
    words = Counter(tuple(bytes([b]) for b in piece) for text in corpus for piece in _pretokens(text))
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p[0] + p[1], p[0]))
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return ranks


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def greedy_parts(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge loop without its whole-token shortcut: merge the lowest-ranked adjacent pair."""
    parts = [bytes([b]) for b in piece]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return parts
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def add_shortcut_tokens(ranks: dict[bytes, int], count: int = 6) -> list[bytes]:
    """Add `count` ASCII words made of two lower-ranked tokens that greedy merging leaves in 3+ parts.

    Such a token is valid for tiktoken (two lower-ranked tokens make it) but a BPE that only follows merges never
    produces it; tiktoken emits it when a pre-token is exactly that word. Returns the tokens added, in rank order.
    """
    def words(pattern: bytes) -> list[bytes]:
        return sorted((t for t in ranks if len(t) >= 2 and regex.fullmatch(pattern, t)), key=ranks.__getitem__)

    added: list[bytes] = []
    used: set[bytes] = set()  # a different right half each time, for variety
    for left in words(rb" ?[a-z]+"):
        for right in words(rb"[a-z]+"):
            word = left + right
            if right not in used and word not in ranks and len(greedy_parts(word, ranks)) >= 3:
                used.add(right)
                ranks[word] = len(ranks)
                added.append(word)
                break
        if len(added) == count:
            break
    return added


def add_digit_tokens(ranks: dict[bytes, int]) -> None:
    """Multi-digit tokens, as the released vocabulary has (from cl100k); Qwen's single-digit regex never uses them."""
    for number in [f"{n:02d}" for n in range(100)] + ["000", "123", "202", "345"]:
        ranks.setdefault(number.encode(), len(ranks))


def build_ranks() -> tuple[dict[bytes, int], list[bytes]]:
    ranks = learn_ranks()
    add_digit_tokens(ranks)
    return ranks, add_shortcut_tokens(ranks)


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    # Released files list tokens by rank; shuffle-free but not byte-sorted, as here.
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiktoken_oracle(ranks: dict[bytes, int]):
    """What QWenTokenizer wraps: tiktoken.Encoding(pat_str, ranks, specials numbered from len(ranks))."""
    import tiktoken

    specials = {tok: len(ranks) + i for i, tok in enumerate(QWEN_SPECIALS)}
    return tiktoken.Encoding("qwen-test", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def oracle_encode(enc, text: str, allow_special: bool) -> list[int]:
    """QWenTokenizer.tokenize: NFC first, then tiktoken with "all" or no special tokens recognised."""
    text = unicodedata.normalize("NFC", text)
    if allow_special:
        return enc.encode(text, allowed_special="all")
    return enc.encode(text, allowed_special=set(), disallowed_special=())


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file as tiktoken's load_tiktoken_bpe reads it: `<base64 token> <rank>` per line."""
    return {base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)}


def official_make_context(enc, query, history, system, max_window_size):
    """Qwen's qwen_generation_utils.make_context(chat_format="chatml"), restated over a tiktoken Encoding.

    QWenTokenizer.encode(text, allowed_special=...) is NFC + tiktoken; its default allows every special token.
    Returns (raw_text, context_tokens, rounds_kept); rounds_kept is counted here for the dropped-index checks.
    """
    def encode(text, allowed_special="all"):
        return oracle_encode(enc, text, allow_special=allowed_special == "all")

    im_start_tokens = [enc.encode_single_token(IM_START)]
    im_end_tokens = [enc.encode_single_token(IM_END)]
    nl_tokens = encode("\n")

    def tokenize_str(role, content):
        return f"{role}\n{content}", encode(role, set()) + nl_tokens + encode(content, set())

    system_text, system_part = tokenize_str("system", system)
    system_tokens = im_start_tokens + system_part + im_end_tokens
    raw_text, context_tokens, kept = "", [], 0
    for turn_query, turn_response in reversed(history):
        query_text, query_part = tokenize_str("user", turn_query)
        response_text, response_part = tokenize_str("assistant", turn_response)
        next_context_tokens = (nl_tokens + im_start_tokens + query_part + im_end_tokens
                               + nl_tokens + im_start_tokens + response_part + im_end_tokens)
        prev_chat = f"\n{IM_START}{query_text}{IM_END}\n{IM_START}{response_text}{IM_END}"
        if len(system_tokens) + len(next_context_tokens) + len(context_tokens) < max_window_size:
            context_tokens = next_context_tokens + context_tokens
            raw_text = prev_chat + raw_text
            kept += 1
        else:
            break
    context_tokens = system_tokens + context_tokens
    raw_text = f"{IM_START}{system_text}{IM_END}" + raw_text
    context_tokens += (nl_tokens + im_start_tokens + tokenize_str("user", query)[1] + im_end_tokens
                       + nl_tokens + im_start_tokens + encode("assistant") + nl_tokens)
    raw_text += f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
    return raw_text, context_tokens, kept


def as_messages(query, history, system=None):
    messages = [] if system is None else [{"role": "system", "content": system}]
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return messages + [{"role": "user", "content": query}]


def convert_tiny(root: Path, ranks: dict[bytes, int]) -> Path:
    """Write the tiny qwen.tiktoken into root/src, convert it into root/tokenizer and return that folder."""
    from qdemo.models.families.qwen_tokenizer import convert_qwen_tokenizer

    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    write_tiktoken(src / "qwen.tiktoken", ranks)
    out = root / "tokenizer"
    convert_qwen_tokenizer(src, out)
    return out


def write_qwen_tiktoken(directory: Path, model_max_length: int = 8192) -> int:
    """The tokenizer files of a Qwen v1 checkpoint folder; returns a model vocab_size that covers them.

    Writes qwen.tiktoken (the tiny vocabulary), the released tokenizer_config.json shape (QWenTokenizer through
    auto_map) and a tokenization_qwen.py that fails if anything runs it. The vocab size is the tokenizer's
    (ranks + 208 specials) rounded up to a multiple of 128, padded past the tokenizer as the real 151936 is.
    """
    ranks, _ = build_ranks()
    directory.mkdir(parents=True, exist_ok=True)
    write_tiktoken(directory / "qwen.tiktoken", ranks)
    config = {"model_max_length": model_max_length, "tokenizer_class": "QWenTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "tokenization_qwen.py").write_text("raise RuntimeError('remote tokenizer code must never run')\n")
    return -(-(len(ranks) + len(QWEN_SPECIALS)) // 128) * 128
