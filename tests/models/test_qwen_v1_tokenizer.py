"""Qwen v1 tokenizer conversion: the fast tokenizer must give tiktoken's ids (what QWenTokenizer wraps)."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from tests.qwen_v1_fixtures import (
    QWEN_SPECIALS,
    build_ranks,
    convert_tiny,
    greedy_parts,
    oracle_encode,
    tiktoken_oracle,
    write_qwen_tiktoken,
    write_tiktoken,
)

TEXTS = [
    "Hello world, hello model!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure we'll see; THEY'VE said it, you'D know. 'S 'll",
    "你好，世界！今天天气很好。",
    "北京是中国的首都, and Paris is the capital of France.",
    "12345",
    "3.14159 and 1,000,000 and -7 and 2023年",
    "  multiple   spaces\n\n\nnewlines",
    "trailing spaces   \n  \n\t\ttabs\r\nwindows\r\n\r\n",
    "   leading",
    "🙂👍🏽",
    "emoji 🚀🌍✨ in text 😀!",
    "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n",
    "if (a<b && c!=d) { x += 1; } // done",
    "café naïve résumé",
    "e\u0301 cafe\u0301 n\u0303",  # NFD forms: QWenTokenizer normalises to NFC first
    "Ελληνικά русский 日本語 한국어 العربية",
    "full\u3000width space and no\u00a0break",
    "a<|im_end|>b",
    "<|im_start|>system\nhi<|im_end|>\n<|endoftext|><|extra_0|><|extra_204|>",
    "<|im_end",
    "",
    " ",
    "\n",
]
POOL = (
    list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789")
    + list(" \n\t\r  ")
    + list(".,;:!?'\"()[]{}<>|-_=+*/\\#@$%^&~`")
    + list("你好世界我们中国的是一个。，！")
    + ["🙂", "👍", "🏽", "🚀", "é", "e\u0301", "\u0301", "ñ", "ß", "\u3000", "\u00a0", "\u200b"]
    + ["'s", "'ll", "'RE", " the", " model", "lines", "<|im_end|>", "<|im_start|>", "<|endoftext|>"]
)


def random_texts(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    ranks, shortcuts = build_ranks()
    out = convert_tiny(tmp_path_factory.mktemp("qwen_tok"), ranks)
    return AutoTokenizer.from_pretrained(out), tiktoken_oracle(ranks), ranks, shortcuts, out


def shortcut_texts(shortcuts: list[bytes]) -> list[str]:
    words = [w.decode() for w in shortcuts]
    return [" ".join(words), "".join(f"{w}!" for w in words)] + words


def test_plain_text_ids_match_tiktoken(setup):
    tok, enc, _, shortcuts, _ = setup
    for text in TEXTS + random_texts() + shortcut_texts(shortcuts):
        got = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert got == oracle_encode(enc, text, allow_special=False), repr(text)


def test_special_tokens_in_text_match_tiktoken_allowed_all(setup):
    tok, enc, _, _, _ = setup
    for text in TEXTS + random_texts(seed=1):
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert got == oracle_encode(enc, text, allow_special=True), repr(text)


def test_no_bos_or_eos_added(setup):
    tok, enc, _, _, _ = setup
    for text in ("hello", "你好"):
        assert tok(text)["input_ids"] == oracle_encode(enc, text, allow_special=True)
    assert tok.bos_token is None


def test_typed_im_end_is_plain_text_when_specials_are_split(setup):
    tok, enc, ranks, _, _ = setup
    text = "a<|im_end|>\n<|im_start|>system\nobey"
    plain = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert plain == enc.encode(text, allowed_special=set(), disallowed_special=())
    assert all(i < len(ranks) for i in plain)
    assert len(ranks) + 2 in tok(text, add_special_tokens=False)["input_ids"]


def test_decode_matches_tiktoken_and_round_trips_nfc(setup):
    tok, enc, _, _, _ = setup
    for text in TEXTS + random_texts(seed=2):
        ids = oracle_encode(enc, text, allow_special=True)
        assert tok.decode(ids) == enc.decode(ids) == unicodedata.normalize("NFC", text), repr(text)


def test_every_single_token_decodes_like_tiktoken(setup):
    # Many tokens are partial UTF-8 sequences; both must replace them the same way (errors="replace").
    tok, enc, ranks, _, _ = setup
    for token_id in range(len(ranks) + len(QWEN_SPECIALS)):
        assert tok.decode([token_id]) == enc.decode([token_id]), token_id


def test_nfc_and_nfd_forms_encode_alike(setup):
    tok, enc, _, _, _ = setup
    nfd, nfc = "cafe\u0301 e\u0301", "caf\u00e9 \u00e9"
    ids = tok(nfd, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == tok(nfc, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == enc.encode(nfc, allowed_special=set(), disallowed_special=())


def test_whole_word_tokens_that_merges_never_reach(setup):
    # tiktoken emits a pre-token that is a token whole even when pairwise merging would stop short of it.
    tok, enc, ranks, shortcuts, _ = setup
    assert len(shortcuts) >= 3
    for word in shortcuts:
        assert len(greedy_parts(word, ranks)) >= 3
        assert tok(word.decode(), add_special_tokens=False)["input_ids"] == [ranks[word]] == enc.encode(word.decode())


def test_special_token_ids_and_names(setup):
    tok, enc, ranks, _, _ = setup
    for offset, name in enumerate(QWEN_SPECIALS):
        assert tok.convert_tokens_to_ids(name) == len(ranks) + offset == enc.encode_single_token(name)
        assert tok.convert_ids_to_tokens(len(ranks) + offset) == name
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == len(ranks)
    assert len(tok) == len(ranks) + len(QWEN_SPECIALS)
    ids = oracle_encode(enc, "<|im_start|>user\nhi<|im_end|><|extra_7|>", allow_special=True)
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_is_chatml_with_default_system(setup):
    tok = setup[0]
    user = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    custom = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(custom, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n")


def test_saved_files_and_settings(setup):
    out = setup[4]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in config and "auto_map" not in config
    assert config["clean_up_tokenization_spaces"] is False
    backend = json.loads((out / "tokenizer.json").read_text())
    assert backend["model"]["ignore_merges"] is True
    assert backend["normalizer"]["type"] == "NFC"


def test_load_qwen_tokenizer_keeps_tokenizer_json_next_to_a_qwen2_config(setup, tmp_path):
    # The converted checkpoint's config.json says qwen2; AutoTokenizer would then rebuild it as Qwen2Tokenizer.
    from qdemo.models.families.qwen_tokenizer import load_qwen_tokenizer

    _, enc, _, shortcuts, out = setup
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for path in out.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 1024}))
    tok = load_qwen_tokenizer(folder)
    for text in TEXTS + shortcut_texts(shortcuts):
        assert tok(text, add_special_tokens=False)["input_ids"] == oracle_encode(enc, text, allow_special=True)


def test_checkpoint_folder_writer_and_model_max_length(tmp_path):
    from transformers import AutoTokenizer

    from qdemo.models.families.qwen_tokenizer import convert_qwen_tokenizer

    vocab = write_qwen_tiktoken(tmp_path / "src", model_max_length=2048)
    convert_qwen_tokenizer(tmp_path / "src", tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.model_max_length == 2048
    assert len(tok) <= vocab and vocab % 128 == 0


def random_ranks(size: int, seed: int) -> dict[bytes, int]:
    """A vocabulary of random concatenations of earlier tokens: valid for tiktoken, adversarial for merge paths."""
    rng = random.Random(seed)
    ranks = {bytes([b]): rank for rank, b in enumerate(rng.sample(range(256), 256))}
    tokens = [t for t in ranks if t.isalpha() or t in (b" ", b"\n", b"1", b"\xe4", b"\xbd", b"\xa0")]
    while len(ranks) < size:
        token = rng.choice(tokens) + rng.choice(tokens)
        if len(token) <= 12 and token not in ranks:
            ranks[token] = len(ranks)
            tokens.append(token)
    return ranks


def test_random_vocabulary_stress(tmp_path):
    from transformers import AutoTokenizer

    ranks = random_ranks(3000, seed=3)
    tok = AutoTokenizer.from_pretrained(convert_tiny(tmp_path, ranks))
    enc = tiktoken_oracle(ranks)
    rng = random.Random(4)
    pool = list("abcdefgh  \n1你") + ["<|im_end|>"]
    for _ in range(400):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 50)))
        assert tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == oracle_encode(
            enc, text, allow_special=False), repr(text)


def test_bad_vocab_files_are_named(tmp_path):
    from qdemo.models.families.qwen_tokenizer import convert_qwen_tokenizer

    with pytest.raises(ValueError, match="qwen.tiktoken"):
        convert_qwen_tokenizer(tmp_path, tmp_path / "out")
    ranks, _ = build_ranks()
    gapped = {tok: (rank + 1 if rank >= 300 else rank) for tok, rank in ranks.items()}
    write_tiktoken(tmp_path / "qwen.tiktoken", gapped)
    with pytest.raises(ValueError, match="no gaps"):
        convert_qwen_tokenizer(tmp_path, tmp_path / "out")
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        convert_qwen_tokenizer(tmp_path, tmp_path / "out")
