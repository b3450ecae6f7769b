"""Qwen v1 chat prompts, token for token as Qwen's `make_context(..., chat_format="chatml")` builds them.

The official builder (qwen_generation_utils.py) does not tokenize one chatml string. It inserts
<|im_start|>/<|im_end|> by id, encodes the role, "\\n" and the content each on its own with no special tokens
allowed (so text a user types, `<|im_end|>` included, stays plain text), and joins the pieces:

    <|im_start|>system\\n{system}<|im_end|>
    (\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>)*   history, oldest first
    \\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

History is taken newest-first while len(system) + len(this round) + len(rounds kept so far) < max_window_size,
stopping at the first round that does not fit; the current query is not counted and is always kept, so the prompt
can be longer than max_window_size.

Messages are checked by qdemo.models.prompting.validate_messages (the last one the user's). Messages that do not
alternate (the official API only takes (query, response) pairs): the history is cut into rounds by
qdemo.models.prompting.split_turns, a user message with the replies after it (replies before any user message form a
round of their own), and every message of a round is written as the official builder writes one
message. A regular user/assistant round is exactly the official one; a user message left without a reply (two
user messages in a row) stays a lone user message rather than getting an invented empty reply. Rounds drop whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qdemo.models.prompting import encode_user_texts, split_turns, validate_messages

DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_WINDOW_SIZE = 6144  # generation_config.max_window_size of Qwen-7B-Chat
QWEN_V1_STOP_TOKENS = ("<|im_end|>", "<|im_start|>")
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class Round:
    """History messages that are kept or dropped together: their indices into the caller's messages."""

    indices: tuple[int, ...]


@dataclass(frozen=True)
class Conversation:
    system: str
    rounds: tuple[Round, ...]  # oldest first
    query_index: int


def split_conversation(messages: Sequence[dict[str, str]]) -> Conversation:
    """Check the messages' shape and cut the history into rounds (see the module docstring)."""
    messages = validate_messages(messages)
    system_index, turns = split_turns(messages)
    system = messages[0]["content"] if system_index else DEFAULT_SYSTEM
    # the last message is the user's, so it is a turn of its own: the query; the turns before it are the history
    return Conversation(system, tuple(Round(tuple(turn)) for turn in turns[:-1]), len(messages) - 1)


class _Encoder:
    """Plain-text encoding (qdemo.models.prompting.encode_user_text: no added token is ever recognised) and the chatml
    control ids of a fast tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.im_start = _special_id(tokenizer, IM_START)
        self.im_end = _special_id(tokenizer, IM_END)
        self.cache: dict[str, list[int]] = {}

    def prefetch(self, texts: Sequence[str]) -> None:
        # One batched call instead of one per message.
        todo = sorted({t for t in texts if t not in self.cache})
        if todo:
            self.cache.update(zip(todo, encode_user_texts(self.tokenizer, todo)))

    def encode(self, text: str) -> list[int]:
        if text not in self.cache:
            self.prefetch([text])
        return self.cache[text]

    def message(self, role: str, content: str) -> list[int]:
        """<|im_start|>role\\ncontent<|im_end|> with role, "\\n" and content encoded separately."""
        return [self.im_start, *self.encode(role), *self.encode("\n"), *self.encode(content), self.im_end]

    def history_round(self, messages: Sequence[dict[str, str]], turn: Round) -> list[int]:
        """Each message of the round as "\n" then the message, the way make_context writes a history turn."""
        ids: list[int] = []
        for m in turn.indices:
            ids += self.encode("\n") + self.message(messages[m]["role"], messages[m]["content"])
        return ids


def _special_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"Qwen v1 prompt: the tokenizer has no {token} token (got id {token_id!r})")
    return token_id


def make_context_ids(
    tokenizer, messages: Sequence[dict[str, str]], max_window_size: int = MAX_WINDOW_SIZE
) -> tuple[list[int], tuple[int, ...]]:
    """Prompt ids as Qwen's official make_context builds them, and the indices of the history messages dropped."""
    if not isinstance(max_window_size, int) or max_window_size <= 0:
        raise ValueError(f"Qwen v1 prompt: max_window_size must be a positive integer, got {max_window_size!r}")
    messages = validate_messages(messages)
    conversation = split_conversation(messages)
    enc = _Encoder(tokenizer)
    enc.prefetch(["\n", "assistant", conversation.system] + [m["role"] for m in messages]
                 + [m["content"] for m in messages])
    newline = enc.encode("\n")
    system_ids = enc.message("system", conversation.system)
    rounds = conversation.rounds
    history: list[int] = []
    kept = 0
    for turn in reversed(rounds):
        round_ids = enc.history_round(messages, turn)
        if len(system_ids) + len(round_ids) + len(history) >= max_window_size:
            break  # the first round that does not fit ends the history: it and every older round are dropped
        history = round_ids + history
        kept += 1
    dropped = tuple(i for turn in rounds[: len(rounds) - kept] for i in turn.indices)
    query = messages[conversation.query_index]["content"]
    ids = (system_ids + history + newline + enc.message("user", query)
           + newline + [enc.im_start] + enc.encode("assistant") + newline)
    return ids, dropped
