"""convert_sp_tokenizer / encode_plain against sentencepiece itself, on tiny Baichuan-style models trained here."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaConfig

from qdemo.models.families.sp_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    convert_sp_tokenizer,
    encode_plain,
    parse_model_proto,
)
from tests.baichuan_fixtures import (
    ASSISTANT_ID,
    CHECK_TEXTS,
    LEADING_MARKER_TEXTS,
    STYLES,
    USER_ID,
    plain_oracle,
    random_texts,
    sp_oracle,
    train_sp_model,
    user_defined_pieces,
    with_unused_pieces,
    write_baichuan_tokenizer,
)


def _convert(root: Path, style: str, **overrides):
    src, out = root / "original", root / "converted"
    vocab = write_baichuan_tokenizer(src, style=style, **overrides)
    convert_sp_tokenizer(src, out)
    # the Baichuan conversion writes a llama config next to the tokenizer: AutoTokenizer must still take
    # tokenizer.json as written, not rebuild a LlamaTokenizer from its vocabulary
    LlamaConfig(vocab_size=vocab).save_pretrained(out)
    return out, AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module", params=list(STYLES))
def converted(request, tmp_path_factory):
    out, tokenizer = _convert(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, out, tokenizer


def _starts_with_marker(text: str, style: str) -> bool:
    return any(text.startswith(piece) for piece in user_defined_pieces(style))


def _compared_texts(style: str) -> list[str]:
    texts = CHECK_TEXTS + random_texts(300, seed=7)
    if STYLES[style].add_dummy_prefix:  # the documented difference, pinned in its own test below
        texts = [t for t in texts if not _starts_with_marker(t, style)]
    return texts


def test_converted_tokenizer_loads_natively_with_baichuan_ids(converted):
    style, out, tokenizer = converted
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert type(tokenizer).__name__ == "TokenizersBackend" and tokenizer.is_fast
    assert "auto_map" not in config and (out / "tokenizer.json").is_file()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0, 1, 2, 0)
    user, assistant = STYLES[style].roles
    assert tokenizer.convert_tokens_to_ids([user, assistant]) == [USER_ID, ASSISTANT_ID]
    assert len(tokenizer) == sp_oracle(style).get_piece_size()
    assert tokenizer.model_max_length == 4096


def test_encode_matches_sentencepiece(converted):
    style, _, tokenizer = converted
    sp = sp_oracle(style)
    for text in _compared_texts(style):
        expected = sp.encode(text)
        assert tokenizer.encode(text) == expected, (style, text)
        assert tokenizer(text)["input_ids"] == expected, (style, text)


def test_every_piece_text_encodes_like_sentencepiece(converted):
    # the surface text of each piece exercises every merge path of the vocabulary
    style, _, tokenizer = converted
    sp = sp_oracle(style)
    texts = [sp.decode([i]) for i in range(sp.get_piece_size())]
    texts = [t for t in texts if not (STYLES[style].add_dummy_prefix and _starts_with_marker(t, style))]
    mismatches = [t for t in texts if tokenizer.encode(t) != sp.encode(t)]
    assert mismatches == []


def test_leading_marker_with_dummy_prefix_only_lacks_the_lone_prefix_piece(converted):
    style, _, tokenizer = converted
    sp = sp_oracle(style)
    space = sp.piece_to_id("▁")
    for text in LEADING_MARKER_TEXTS:
        expected = sp.encode(text)
        if STYLES[style].add_dummy_prefix and _starts_with_marker(text, style):
            assert expected[0] == space and tokenizer.encode(text) == expected[1:], text
        else:
            assert tokenizer.encode(text) == expected, text


def test_decode_matches_sentencepiece(converted):
    style, _, tokenizer = converted
    sp = sp_oracle(style)
    for text in _compared_texts(style):
        ids = sp.encode(text)
        assert tokenizer.decode(ids) == sp.decode(ids), (style, text)
    # arbitrary sequences of whole pieces, control tokens included (byte runs are covered by the texts above)
    rng = random.Random(3)
    pool = [i for i in range(sp.get_piece_size()) if not sp.is_byte(i) and not sp.is_unknown(i)]
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids


def test_encode_plain_is_sentencepiece_with_markers_as_text(converted):
    style, _, tokenizer = converted
    sp, plain = sp_oracle(style), plain_oracle(style)
    protected = {0, 1, 2} | set(range(3, ASSISTANT_ID + 1))  # control pieces and every user-defined piece
    for text in CHECK_TEXTS + LEADING_MARKER_TEXTS + random_texts(300, seed=11):
        ids = encode_plain(tokenizer, text)
        assert ids == plain.encode(text), (style, text)
        assert not protected.intersection(ids), (style, text)
        if not any(piece in text for piece in user_defined_pieces(style)):
            assert ids == sp.encode(text), (style, text)
    user = STYLES[style].roles[0]
    assert tokenizer.encode(f"x{user}") == sp.encode(f"x{user}") and USER_ID in sp.encode(f"x{user}")
    assert USER_ID not in encode_plain(tokenizer, f"x{user}")


def test_bos_and_eos_follow_the_tokenizer_config(tmp_path):
    sp = sp_oracle("baichuan2")
    _, tokenizer = _convert(tmp_path, "baichuan2",
                            config_overrides={"add_bos_token": True, "add_eos_token": True})
    assert tokenizer.encode("你好 world") == [1] + sp.encode("你好 world") + [2]
    assert tokenizer.encode("你好 world", add_special_tokens=False) == sp.encode("你好 world")
    assert encode_plain(tokenizer, "你好 world") == sp.encode("你好 world")


def test_special_tokens_fall_back_to_the_map_then_the_proto(tmp_path):
    src, out = tmp_path / "original", tmp_path / "converted"
    write_baichuan_tokenizer(src, style="baichuan1")
    (src / "tokenizer_config.json").unlink()
    convert_sp_tokenizer(src, out)
    from_map = AutoTokenizer.from_pretrained(out)
    assert (from_map.bos_token, from_map.eos_token, from_map.pad_token) == ("<s>", "</s>", "<unk>")
    (src / "special_tokens_map.json").unlink()
    convert_sp_tokenizer(src, out)
    from_proto = AutoTokenizer.from_pretrained(out)
    assert (from_proto.unk_token_id, from_proto.bos_token_id, from_proto.eos_token_id) == (0, 1, 2)
    assert from_proto.pad_token_id == 0  # Baichuan pads with <unk>
    assert from_proto.encode("hello 世界") == sp_oracle("baichuan1").encode("hello 世界")


def test_proto_reader_agrees_with_sentencepiece():
    for style in STYLES:
        data = train_sp_model(style)
        sp, model = spm.SentencePieceProcessor(model_proto=data), parse_model_proto(data)
        assert len(model.pieces) == sp.get_piece_size()
        for i, piece in enumerate(model.pieces):
            assert piece.text == sp.id_to_piece(i) and piece.score == pytest.approx(sp.get_score(i))
            assert (piece.kind == UNKNOWN, piece.kind == CONTROL, piece.kind == BYTE) == (
                sp.is_unknown(i), sp.is_control(i), sp.is_byte(i))
        assert {p.text for p in model.pieces if p.kind == USER_DEFINED} == set(user_defined_pieces(style))
        assert sum(p.kind == NORMAL for p in model.pieces) > 500
        assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (
            sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
        assert model.add_dummy_prefix == STYLES[style].add_dummy_prefix and model.byte_fallback
        assert model.remove_extra_whitespaces == STYLES[style].remove_extra_whitespaces


def test_conversion_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.model"):
        convert_sp_tokenizer(tmp_path / "missing", tmp_path / "out")

    unigram = tmp_path / "unigram"
    unigram.mkdir()
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CHECK_TEXTS * 20), model_writer=writer,
                                   model_type="unigram", vocab_size=300, hard_vocab_limit=False, minloglevel=2)
    (unigram / "tokenizer.model").write_bytes(writer.getvalue())
    with pytest.raises(ValueError, match="not BPE"):
        convert_sp_tokenizer(unigram, tmp_path / "out")

    bad_pad = tmp_path / "bad_pad"
    write_baichuan_tokenizer(bad_pad, style="baichuan2", config_overrides={"pad_token": "<pad>"})
    with pytest.raises(ValueError, match="pad_token '<pad>'"):
        convert_sp_tokenizer(bad_pad, tmp_path / "out")

    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "tokenizer.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        convert_sp_tokenizer(tmp_path / "garbage", tmp_path / "out")


# ---- a Baichuan2-like model whose user-defined pieces are mostly ordinary text (the released one has ~100) ----

ORDINARY_PIECES = ["\n", "，", "。", "?", "!", "...", "<p>", "１", "+"]
RESERVED_PIECES = ["<reserved_106>", "<reserved_107>", "<reserved_5>"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHECK_TEXTS * 30 + random_texts(300, seed=5)), model_writer=writer, model_type="bpe",
        vocab_size=600, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=ORDINARY_PIECES + RESERVED_PIECES, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, hard_vocab_limit=False, minloglevel=2)
    data = writer.getvalue()
    write_baichuan_tokenizer(root / "original", style="baichuan2")
    (root / "original" / "tokenizer.model").write_bytes(data)
    convert_sp_tokenizer(root / "original", root / "converted")
    sp = spm.SentencePieceProcessor(model_proto=data)
    plain = spm.SentencePieceProcessor(model_proto=with_unused_pieces(data, lambda text: text in RESERVED_PIECES))
    return AutoTokenizer.from_pretrained(root / "converted"), sp, plain


def test_encode_plain_matches_ordinary_user_defined_pieces_as_sentencepiece_does(mixed):
    tokenizer, sp, plain = mixed
    ordinary_ids = {sp.piece_to_id(p) for p in ORDINARY_PIECES}
    reserved_ids = {sp.piece_to_id(p) for p in RESERVED_PIECES} | {0, 1, 2}
    rng = random.Random(9)
    alphabet = list("ab 你好.,!?\n") + ORDINARY_PIECES + RESERVED_PIECES + ["<s>", "</s>", "<p", "１２"]
    texts = CHECK_TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(500)]
    emitted: set[int] = set()
    for text in texts:
        ids = encode_plain(tokenizer, text)
        assert ids == plain.encode(text), repr(text)
        assert not reserved_ids.intersection(ids), repr(text)
        if not any(p in text for p in RESERVED_PIECES):
            assert ids == sp.encode(text), repr(text)
        emitted.update(ids)
    assert ordinary_ids <= emitted  # "\n", "?", "..." come out as sentencepiece's own pieces
