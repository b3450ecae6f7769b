"""Baichuan chat prompts: the official `build_chat_input` of Baichuan2-*-Chat / Baichuan-13B-Chat
(generation_utils.py), on a converted fast tokenizer.

The official algorithm, which this reproduces id for id:
- the system text (the first message when its role is "system", else "") is encoded first, with no marker;
- the other messages are split into rounds, a round starting at each user message;
- each user message is `[user_token_id] + encode(content)`, each assistant message `[assistant_token_id] +
  encode(content)`, with nothing after an assistant turn;
- rounds are added newest first while `len(history) + len(round) <= max_input_tokens - len(system)`; the newest
  round is always added, and the loop stops at the first round that does not fit, or as soon as the history has
  reached that budget;
- `assistant_token_id` is appended when the last message is not the assistant's, and the whole prompt is then
  left-truncated to `max_input_tokens` (which may cut into the system text, or into the newest round when it
  alone is too long, and cuts one token when the history exactly filled its budget).

Messages are checked and cut into rounds by qdemo.models.prompting (validate_messages with the last message the user's
or the assistant's, split_turns), the conversation model every prompt format shares.

Deliberate deviation: the official `tokenizer.encode(content)` matches every user-defined piece, so a user who types
`<reserved_106>` gets a real role marker. Here message text goes through `encode_plain`, which matches the ordinary
user-defined pieces (`\\n`, `，`, `?`: the ids are sentencepiece's) but never a `<reserved_N>` or control piece;
bos/eos are added around each text exactly as the tokenizer's `encode` would (none for Baichuan).

Dropped messages: the indices of every message that does not reach the model intact: the messages of rounds left
out, plus any message (the system message or one of the kept rounds, the newest user message included) of which
the final left truncation cut at least one token, role marker included.
"""

from __future__ import annotations

from typing import Sequence

from qdemo.models.families.sp_tokenizer import encode_plain
from qdemo.models.prompting import split_turns, validate_messages


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids `tokenizer.encode(text)` puts before and after a text's own ids (bos/eos, per its post-processor)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise RuntimeError(f"{type(tokenizer).__name__}: encode('a') with special tokens does not contain it without")


def build_chat_input_ids(tokenizer, messages: Sequence[dict[str, str]], max_input_tokens: int,
                         user_token_id: int = 195, assistant_token_id: int = 196) -> tuple[list[int], tuple[int, ...]]:
    """Prompt ids of the official Baichuan `build_chat_input(model, tokenizer, messages, max_new_tokens)` with
    `max_input_tokens = model_max_length - max_new_tokens`, and the indices of the dropped messages."""
    if max_input_tokens < 1:
        raise ValueError(f"max_input_tokens must be at least 1, got {max_input_tokens}")
    # rounds as the official code groups them: one starts at each user message
    messages = validate_messages(messages, allow_assistant_last=True)
    system_index, rounds = split_turns(messages)
    system = system_index[0] if system_index else None
    prefix, suffix = special_frame(tokenizer)

    def encode(text: str) -> list[int]:
        return prefix + encode_plain(tokenizer, text) + suffix

    system_ids = encode(messages[system]["content"] if system is not None else "")
    max_history_tokens = max_input_tokens - len(system_ids)
    history: list[int] = []
    kept: list[tuple[int, list[int]]] = []  # (message index, its ids with the marker), oldest first
    for round_indices in reversed(rounds):
        round_messages = [(i, [user_token_id if messages[i]["role"] == "user" else assistant_token_id]
                           + encode(messages[i]["content"])) for i in round_indices]
        round_ids = [t for _, ids in round_messages for t in ids]
        if not history or len(history) + len(round_ids) <= max_history_tokens:
            history = round_ids + history
            kept = round_messages + kept
            if len(history) < max_history_tokens:
                continue
        break

    prompt = system_ids + history
    if messages[-1]["role"] != "assistant":
        prompt.append(assistant_token_id)
    cut = max(0, len(prompt) - max_input_tokens)
    return prompt[cut:], _dropped(len(messages), system, len(system_ids), kept, cut)


def _dropped(count: int, system: int | None, system_len: int, kept: list[tuple[int, list[int]]],
             cut: int) -> tuple[int, ...]:
    intact: set[int] = set()
    if system is not None and (system_len == 0 or cut == 0):
        intact.add(system)
    start = system_len
    for index, ids in kept:
        if start >= cut:
            intact.add(index)
        start += len(ids)
    return tuple(i for i in range(count) if i not in intact)
