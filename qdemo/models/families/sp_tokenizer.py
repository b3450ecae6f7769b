"""SentencePiece BPE `tokenizer.model` → a fast tokenizer (tokenizer.json) that AutoTokenizer loads without remote code.

Baichuan's remote `BaichuanTokenizer` is a thin wrapper around `SentencePieceProcessor.encode` and no longer loads
on transformers ≥ 4.34. `convert_sp_tokenizer` rebuilds the same tokenization as a `tokenizers` pipeline read off
the model proto, so the converted tokenizer encodes and decodes like sentencepiece itself:

- normalizer: the proto's precompiled charsmap (empty for "identity"), extra-space removal when the spec asks
  for it, spaces escaped to "▁";
- dummy prefix (Baichuan 1; Baichuan 2 has none): a Metaspace pre-tokenizer that prepends "▁" to the text's first
  chunk only, as sentencepiece adds one "▁" to the whole text;
- model: BPE over every piece, with one merge per (left, right) split of each normal piece ranked by the piece's
  score, because sentencepiece merges any adjacent pair whose concatenation is a piece, best score first;
- user-defined pieces: non-special added tokens matched on the normalized text, as sentencepiece matches them
  before merging and never merges them further. Baichuan2 has about 1,086: the `<reserved_N>` slots (among them
  the chat role markers 195/196) and ~100 pieces of ordinary text (`\\n`, `+ - =`, `，。`, `. ! ?`, full-width
  digits, `...`, HTML tags);
- control pieces and `<unk>`: special added tokens, but the saved tokenizer has `split_special_tokens=True`, so
  `<s>` typed in text stays plain text, as it does for sentencepiece;
- decoder: "▁" → space, byte pieces fused back into UTF-8, and the dummy prefix's space dropped.

So `tokenizer.encode` is sentencepiece's encode, typed `<reserved_106>` included. Text a user typed goes through
`encode_plain` (qdemo.models.prompting.encode_user_text) instead: the ordinary user-defined pieces, which the saved
tokenizer_config.json lists under `plain_text_added_tokens`, match as in sentencepiece, while `<reserved_N>` and
the control pieces are never matched and encode as the characters they are spelled with.

Known difference: with a dummy prefix (Baichuan 1; not Baichuan 2), a text that starts with a user-defined piece
(`<reserved_102>hi`, or `\\n…` if that is one) encodes without the lone "▁" piece sentencepiece puts first (a
tokenizers added token cannot carry it); `encode_plain` shares it for the ordinary pieces it matches.

The proto is read with a small protobuf wire-format reader, so neither protobuf nor a slow tokenizer is needed.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from qdemo.models.prompting import PLAIN_TEXT_TOKENS_KEY, encode_user_text

SPACE = "▁"
# Reserved slots, among them Baichuan's chat role markers: user-defined pieces that are never text.
RESERVED_PIECE = re.compile(r"<reserved_\d+>")

# SentencePiece.Type values in sentencepiece_model.proto
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2  # TrainerSpec.ModelType.BPE


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: int


@dataclass(frozen=True)
class SpModel:
    """The parts of a sentencepiece ModelProto the conversion needs (proto2 defaults where a field is absent)."""

    pieces: tuple[Piece, ...]
    model_type: int = 1
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""

    def piece_id(self, text: str) -> int | None:
        for i, piece in enumerate(self.pieces):
            if piece.text == text:
                return i
        return None


@dataclass(frozen=True)
class TokenSettings:
    """Special tokens and bos/eos behaviour, from tokenizer_config.json / special_tokens_map.json or the proto."""

    unk: str
    bos: str | None
    eos: str | None
    pad: str | None
    add_bos_token: bool
    add_eos_token: bool
    model_max_length: int | None


# ---- protobuf wire format ----

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in tokenizer.model")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one message: ints for varints, bytes for everything else."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number}) in tokenizer.model")
        if pos > len(buf):
            raise ValueError(f"truncated field {number} in tokenizer.model")
        yield number, value


def _int32(value: int) -> int:
    # negative int32 values (pad_id = -1) are sign-extended to 64 bits on the wire
    return value - (1 << 64) if value >= 1 << 63 else value


def _piece(buf: bytes) -> Piece:
    text, score, kind = "", 0.0, NORMAL
    for number, value in _fields(buf):
        if number == 1:
            text = value.decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            kind = value
    return Piece(text, score, kind)


_TRAINER_FIELDS = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback",
                   40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_NORMALIZER_FIELDS = {2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def parse_model_proto(data: bytes) -> SpModel:
    """Read a serialized sentencepiece ModelProto (the bytes of tokenizer.model)."""
    pieces: list[Piece] = []
    fields: dict[str, Any] = {}
    for number, value in _fields(data):
        if number == 1:
            pieces.append(_piece(value))
        elif number == 2:
            for sub, sub_value in _fields(value):
                if sub in _TRAINER_FIELDS:
                    name = _TRAINER_FIELDS[sub]
                    fields[name] = _int32(sub_value) if name.endswith("_id") else sub_value
        elif number == 3:
            for sub, sub_value in _fields(value):
                if sub in _NORMALIZER_FIELDS:
                    name = _NORMALIZER_FIELDS[sub]
                    fields[name] = sub_value if name == "charsmap" else bool(sub_value)
        elif number == 5:
            for sub, sub_value in _fields(value):
                if sub == 2:
                    fields["denormalizer_charsmap"] = sub_value
    for name in ("byte_fallback", "treat_whitespace_as_suffix"):
        if name in fields:
            fields[name] = bool(fields[name])
    if not pieces:
        raise ValueError("tokenizer.model holds no pieces")
    return SpModel(pieces=tuple(pieces), **fields)


# ---- tokenizers pipeline ----

def _check_supported(model: SpModel) -> None:
    if model.model_type != BPE_MODEL:
        raise ValueError(f"tokenizer.model: model_type {model.model_type} is not BPE (2); only BPE models convert")
    if model.treat_whitespace_as_suffix:
        raise ValueError("tokenizer.model: treat_whitespace_as_suffix=true is not supported")
    if not model.escape_whitespaces:
        raise ValueError("tokenizer.model: escape_whitespaces=false is not supported")
    if model.denormalizer_charsmap:
        raise ValueError("tokenizer.model: a denormalizer charsmap is not supported")
    if not 0 <= model.unk_id < len(model.pieces):
        raise ValueError(f"tokenizer.model: unk_id {model.unk_id} is not a piece id")


def bpe_merges(pieces: tuple[Piece, ...]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best piece score first.

    sentencepiece's BPE merges whichever adjacent pair concatenates to the best-scoring piece, whatever split made
    it during training, so each split gets a merge; splits of one piece keep their piece's rank (by id on ties).
    Only normal pieces take part: user-defined pieces are matched whole, bytes and control pieces never merge."""
    normal = {p.text: (p.score, i) for i, p in enumerate(pieces) if p.kind == NORMAL}
    ranked = []
    for text, (score, index) in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _normalizer(model: SpModel):
    steps = []
    if model.charsmap:
        steps.append(normalizers.Precompiled(model.charsmap))
    if model.remove_extra_whitespaces:
        # sentencepiece trims and squeezes spaces only (after its charsmap); newlines and tabs stay
        steps += [normalizers.Replace(Regex(r" +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        # The Metaspace pre-tokenizer adds the prefix only when the text neither starts with "▁" nor lost its
        # first characters (it checks the original offset). sentencepiece adds it in both cases, so a leading
        # "▁" is doubled here, and leading spaces, which sentencepiece drops, become the prefix themselves.
        steps.append(normalizers.Replace(Regex(rf"\A{SPACE}"), SPACE * 2))
        steps.append(normalizers.Replace(Regex(r"\A "), SPACE if model.remove_extra_whitespaces else SPACE * 2))
    elif model.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(r"\A "), ""))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(model: SpModel):
    steps = [decoders.Replace(SPACE, " ")]
    if model.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if model.add_dummy_prefix or model.remove_extra_whitespaces:
        # sentencepiece drops the leading space of the decoded text in these two modes; Strip works per token,
        # hence after Fuse
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def build_backend(model: SpModel):
    """The `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor.encode` (no bos/eos added)."""
    _check_supported(model)
    vocab = {p.text: i for i, p in enumerate(model.pieces)}
    if len(vocab) != len(model.pieces):
        raise ValueError("tokenizer.model holds duplicate pieces")
    backend = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(model.pieces), unk_token=model.pieces[model.unk_id].text,
                            fuse_unk=True, byte_fallback=model.byte_fallback, dropout=None))
    backend.normalizer = _normalizer(model)
    if model.add_dummy_prefix:
        # "first": only the chunk at the start of the text gets the prefix, not those after an added token
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    backend.decoder = _decoder(model)
    specials = [p.text for p in model.pieces if p.kind in (UNKNOWN, CONTROL)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user_defined = [p.text for p in model.pieces if p.kind == USER_DEFINED]
    # matched on the normalized text like sentencepiece does; a piece the normalizer would change (none in
    # Baichuan's `<reserved_N>`) could never match there, so it is matched on the raw text instead
    backend.add_tokens([AddedToken(t, special=False, normalized=backend.normalizer.normalize_str(t) == t)
                        for t in user_defined])
    return backend


# ---- tokenizer_config.json / special_tokens_map.json ----

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, where: str) -> str | None:
    """A token entry is a string or an AddedToken dict ({"__type": "AddedToken", "content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or an AddedToken object, got {value!r}")


def _proto_piece(model: SpModel, piece_id: int) -> str | None:
    return model.pieces[piece_id].text if 0 <= piece_id < len(model.pieces) else None


def read_token_settings(src_dir: Path, model: SpModel) -> TokenSettings:
    """Special tokens from tokenizer_config.json, else special_tokens_map.json, else the proto's ids.

    add_bos_token / add_eos_token default to false when the config does not say: Baichuan's tokenizers add neither
    (Baichuan-7B, Baichuan2-*-Chat, and the published Baichuan-13B-Chat prompts all start without bos), although
    the remote class's own default is add_bos_token=True. The pad token defaults to `<unk>` (id 0), the pad id of
    Baichuan's generation configs, when neither file nor proto names one."""
    config_path, map_path = src_dir / "tokenizer_config.json", src_dir / "special_tokens_map.json"
    config, token_map = _read_json(config_path), _read_json(map_path)
    proto_ids = {"unk": model.unk_id, "bos": model.bos_id, "eos": model.eos_id, "pad": model.pad_id}
    tokens: dict[str, str | None] = {}
    for name, proto_id in proto_ids.items():
        key = f"{name}_token"
        if key in config:
            tokens[name] = _token_text(config[key], f"{config_path} field {key}")
        elif key in token_map:
            tokens[name] = _token_text(token_map[key], f"{map_path} field {key}")
        else:
            tokens[name] = _proto_piece(model, proto_id)
    if tokens["unk"] is None:
        raise ValueError(f"{src_dir}: no unk token in tokenizer_config.json, special_tokens_map.json or tokenizer.model")
    if tokens["pad"] is None:
        tokens["pad"] = tokens["unk"]
    vocab = {p.text for p in model.pieces}
    for name, text in tokens.items():
        if text is not None and text not in vocab:
            raise ValueError(f"{src_dir}: {name}_token {text!r} is not a piece of tokenizer.model")
    flags = {}
    for key in ("add_bos_token", "add_eos_token"):
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{config_path} field {key}: expected true or false, got {value!r}")
        flags[key] = value
    max_length = config.get("model_max_length")
    if max_length is not None and not isinstance(max_length, int):
        raise ValueError(f"{config_path} field model_max_length: expected an integer, got {max_length!r}")
    return TokenSettings(unk=tokens["unk"], bos=tokens["bos"], eos=tokens["eos"], pad=tokens["pad"],
                         model_max_length=max_length, **flags)


# ---- public API ----

def load_sp_model(path: Path) -> SpModel:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the sentencepiece model ({err})") from err
    try:
        return parse_model_proto(data)
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(f"{path}: not a sentencepiece model ({err})") from err


def build_fast_tokenizer(src_dir: Path):
    """A transformers fast tokenizer (`TokenizersBackend`) for the sentencepiece model in src_dir."""
    model = load_sp_model(src_dir / "tokenizer.model")
    settings = read_token_settings(src_dir, model)

    def special(text: str | None):
        return None if text is None else AddedToken(text, special=True, normalized=False)

    extra = {} if settings.model_max_length is None else {"model_max_length": settings.model_max_length}
    # TokenizersBackend (not LlamaTokenizer) so that loading keeps tokenizer.json as written instead of
    # rebuilding a Llama pipeline from its vocab; split_special_tokens keeps "<s>" typed in text plain, as
    # sentencepiece does. The ordinary-text user-defined pieces are listed for encode_plain (saved in
    # tokenizer_config.json).
    return TokenizersBackend(
        tokenizer_object=build_backend(model), unk_token=special(settings.unk), bos_token=special(settings.bos),
        eos_token=special(settings.eos), pad_token=special(settings.pad), add_bos_token=settings.add_bos_token,
        add_eos_token=settings.add_eos_token, clean_up_tokenization_spaces=False, split_special_tokens=True,
        **{PLAIN_TEXT_TOKENS_KEY: text_pieces(model, settings)}, **extra)


def text_pieces(model: SpModel, settings: TokenSettings) -> list[str]:
    """The user-defined pieces that are ordinary text: all but the `<reserved_N>` slots and any piece the
    tokenizer config names as its unk/bos/eos/pad token."""
    named = {settings.unk, settings.bos, settings.eos, settings.pad}
    return [p.text for p in model.pieces
            if p.kind == USER_DEFINED and not RESERVED_PIECE.fullmatch(p.text) and p.text not in named]


def convert_sp_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json into out_dir for src_dir's tokenizer.model (and its
    tokenizer_config.json / special_tokens_map.json when present); AutoTokenizer loads them without remote code."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not (src_dir / "tokenizer.model").is_file():
        raise ValueError(f"{src_dir}: no tokenizer.model to convert")
    out_dir.mkdir(parents=True, exist_ok=True)
    build_fast_tokenizer(src_dir).save_pretrained(str(out_dir))


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as plain text: no bos/eos, and no reserved or control piece (`<reserved_106>`, the role
    marker; `<s>`, `</s>`) is matched, so what a user types can never become a role or control id; the ordinary
    user-defined pieces (`\\n`, `，`, `?`) encode exactly as sentencepiece encodes them.

    This is qdemo.models.prompting.encode_user_text, the rule for user text in every prompt format: for a converted
    sentencepiece tokenizer it is sentencepiece's encoding with its reserved pieces treated as ordinary text."""
    return encode_user_text(tokenizer, text)
