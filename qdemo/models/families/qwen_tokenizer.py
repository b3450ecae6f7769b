"""Qwen v1 (Qwen-7B/14B-Chat) tokenizer rebuilt as a transformers fast tokenizer, so no remote code runs.

The original `QWenTokenizer` is a tiktoken Encoding: byte-level BPE over the ranks in `qwen.tiktoken`
(lines `<base64 token bytes> <rank>`), Qwen's pre-tokenizer regex (single digits, unlike cl100k's `\\p{N}{1,3}`),
NFC normalisation of the text before encoding, and 208 special tokens numbered after the last rank. This module
writes the same thing as a `tokenizer.json` plus tokenizer_config.json (with a chatml chat_template) that
`PreTrainedTokenizerFast` loads.

tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank, and emits a
pre-token that is itself a token whole. A tokenizers BPE behaves the same when its merges are every split of every
token into two tokens, ordered by the rank of the result, and `ignore_merges` is on (the whole-token shortcut).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)
from transformers import PreTrainedTokenizerFast

from qdemo.models.families.qwen_chat import DEFAULT_SYSTEM

VOCAB_FILE = "qwen.tiktoken"
# Pre-tokenizer of Qwen's tokenization_qwen.py (PAT_STR).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# In this order, with ids from len(ranks) on (151643.. for the released vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
DEFAULT_MODEL_MAX_LENGTH = 8192

# chatml as Qwen2's template writes it, for callers that use apply_chat_template. The family's own prompt builder
# (qwen_chat.make_context_ids) tokenizes role and content separately as the official make_context does.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank from a tiktoken BPE file; the ranks must be 0..n-1 with every single byte present."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the Qwen vocabulary {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        token, rank = _parse_rank_line(path, number, line)
        if token in ranks:
            raise ValueError(f"{path} line {number}: token {token!r} appears twice")
        ranks[token] = rank
    _check_ranks(path, ranks)
    return ranks


def _parse_rank_line(path: Path, number: int, line: bytes) -> tuple[bytes, int]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{path} line {number}: expected '<base64 token> <rank>', got {line[:80]!r}")
    try:
        return base64.b64decode(parts[0], validate=True), int(parts[1])
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{path} line {number}: bad token or rank {line[:80]!r}: {exc}") from exc


def _check_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    # Special tokens are numbered from len(ranks), so a gap or a duplicate rank would shift or collide with them.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte-level BPE needs all 256 single bytes; missing {missing[:8]}")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet tokenizers' ByteLevel pre-tokenizer maps bytes to."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tokenizers BPE vocab and merges equivalent to tiktoken's rank-ordered merging (see the module docstring)."""
    table = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                keyed.append((rank, ranks[left], ranks[right], left, right))
    keyed.sort()
    return vocab, [(text(left), text(right)) for _, _, _, left, right in keyed]


def build_backend(ranks: dict[bytes, int]):
    """A `tokenizers.Tokenizer` that encodes like tiktoken over `ranks` with Qwen's regex and special tokens."""
    vocab, merges = bpe_vocab_and_merges(ranks)
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize normalises to NFC before tiktoken
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    _check_special_ids(backend, len(ranks))
    return backend


def _check_special_ids(backend, first_id: int) -> None:
    for offset, token in enumerate(SPECIAL_TOKENS):
        got = backend.token_to_id(token)
        if got != first_id + offset:
            raise RuntimeError(f"Qwen special token {token} got id {got}, expected {first_id + offset}")


def build_qwen_tokenizer(ranks: dict[bytes, int], model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
    """A `PreTrainedTokenizerFast` equal to QWenTokenizer over `ranks`: eos = pad = <|endoftext|>, no bos."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(ranks),
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
        # decode must give back the text exactly, as tiktoken's decode does
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )


def _model_max_length(src_dir: Path) -> int:
    """The original tokenizer_config's model_max_length, else the config's seq_length, else 8192."""
    for name, key in (("tokenizer_config.json", "model_max_length"), ("config.json", "seq_length")):
        path = src_dir / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MODEL_MAX_LENGTH


def convert_qwen_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Write a fast tokenizer for the Qwen v1 checkpoint in `src_dir` (its qwen.tiktoken) into `out_dir`."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    vocab_path = src_dir / VOCAB_FILE
    if not vocab_path.is_file():
        raise ValueError(f"Qwen v1 checkpoint {src_dir} has no {VOCAB_FILE}")
    tokenizer = build_qwen_tokenizer(read_tiktoken_ranks(vocab_path), _model_max_length(src_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    # The chat template goes into tokenizer_config.json rather than a separate chat_template.jinja.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)


def load_qwen_tokenizer(path: Path):
    """Load what convert_qwen_tokenizer wrote, exactly as written.

    AutoTokenizer picks Qwen2Tokenizer when the folder's config.json says model_type "qwen2", and that class
    rebuilds the BPE from vocab and merges without `ignore_merges`, which can split a whole-token pre-token
    differently from tiktoken. The generic fast tokenizer keeps tokenizer.json as it is.
    """
    return PreTrainedTokenizerFast.from_pretrained(str(path))
