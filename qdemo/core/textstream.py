"""Incremental detokenisation that never emits a broken UTF-8 character.

Byte-level BPE (Qwen) and byte-fallback SentencePiece (Baichuan) split one character over several
tokens. Decoding a growing window and emitting only when it no longer ends in U+FFFD holds back the
incomplete bytes until the token that completes them arrives. The two-offset window keeps each step's
decode short and makes leading-space handling of SentencePiece consistent between the two decodes.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # tokens up to here have been emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly complete text (possibly "")."""
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(done) and not now.endswith(REPLACEMENT):
            delta = now[len(done):]
            self._prefix, self._read = self._read, len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end, minus bytes that never formed a character."""
        done = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        delta = now[len(done):].rstrip(REPLACEMENT)
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta
