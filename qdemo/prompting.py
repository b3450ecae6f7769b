"""Chat messages → prompt token ids, fitted into the model's context.

History that does not fit (`max_context − max_new_tokens`) loses its oldest turns whole; the system
message and the newest turn are always kept, and the caller is told which messages were dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from qdemo.errors import PromptTooLongError
from qdemo.families import PromptBuilder

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_turns: tuple[int, ...]  # indices into the caller's messages
    budget: int  # tokens the prompt may use


def validate_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} mappings")
    clean: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a mapping with role and content, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be text, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "user":
        raise ValueError(f"the last message must be the user's, got {clean[-1]['role']!r}")
    return clean


def split_turns(messages: Sequence[Message]) -> tuple[list[int], list[list[int]]]:
    """(system message indices, turns) where a turn is a user message and the replies after it."""
    system = [0] if messages and messages[0]["role"] == "system" else []
    turns: list[list[int]] = []
    for i in range(len(system), len(messages)):
        if messages[i]["role"] == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return system, turns


def fit_messages(
    messages: Sequence[Message], encode: Callable[[list[Message]], list[int]], budget: int, model_name: str = "model"
) -> Prompt:
    """Drop the oldest whole turns until `encode(kept)` fits `budget` tokens."""
    system, turns = split_turns(messages)
    for first in range(len(turns)):
        kept = system + [i for turn in turns[first:] for i in turn]
        ids = encode([messages[i] for i in kept])
        if len(ids) <= budget:
            dropped = tuple(i for turn in turns[:first] for i in turn)
            return Prompt(ids=ids, dropped_turns=dropped, budget=budget)
    raise PromptTooLongError(
        f"{model_name}: the newest message alone needs {len(ids)} prompt tokens but only {budget} fit "
        f"(max_context − max_new_tokens); shorten it or lower max_new_tokens"
    )


def chat_template_encoder(tokenizer) -> Callable[[list[Message]], list[int]]:
    def encode(messages: list[Message]) -> list[int]:
        return template_ids(tokenizer, messages, add_generation_prompt=True)

    return encode


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use marks around a message's slot in the rendered template
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer turns into special (control) tokens when they appear in text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(tok) for tok in added.values() if getattr(tok, "special", False)}
    texts |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return tuple(sorted(t for t in texts if t))


def template_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """The chat template's ids, with message text never parsed as special tokens.

    A user who types `<|im_end|>` must not end their own turn (prompt injection). When no message contains a
    special token's text, this is exactly `apply_chat_template`; otherwise the template is rendered with a marker
    in each message's place, its own text tokenized as usual and each message's text with special tokens split
    into plain pieces."""
    messages = list(messages)
    specials = special_token_texts(tokenizer)
    if not any(text in m["content"] for m in messages for text in specials):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False)
        return [int(i) for i in ids]
    marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids: list[int] = []
    pos = 0
    for match in _SLOT.finditer(rendered):
        ids += _encode(tokenizer, rendered[pos:match.start()], split_special=False)
        ids += _encode(tokenizer, messages[int(match.group(1))]["content"], split_special=True)
        pos = match.end()
    ids += _encode(tokenizer, rendered[pos:], split_special=False)
    return ids


def _encode(tokenizer, text: str, split_special: bool) -> list[int]:
    if not text:
        return []
    return [int(i) for i in tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]]


def build_prompt(
    tokenizer, messages: Any, max_context: int, max_new_tokens: int,
    system_prompt: str | None = None, model_name: str = "model", builder: PromptBuilder | None = None,
) -> Prompt:
    """Validate, add the model's default system prompt when none is given, and fit the context.
    `builder` is the family's own prompt format (Qwen v1 make_context, Baichuan build_chat_input); without
    one the tokenizer's chat template is used."""
    clean = validate_messages(messages)
    if system_prompt and clean[0]["role"] != "system":
        clean = [{"role": "system", "content": system_prompt}] + clean
        offset = 1
    else:
        offset = 0
    budget = max_context - max_new_tokens
    if budget <= 0:
        raise PromptTooLongError(f"{model_name}: max_new_tokens {max_new_tokens} leaves no room in "
                                 f"max_context {max_context}")
    if builder is None:
        prompt = fit_messages(clean, chat_template_encoder(tokenizer), budget, model_name)
    else:
        ids, dropped_turns = builder(tokenizer, clean, budget)
        if len(ids) > budget:
            raise PromptTooLongError(
                f"{model_name}: the newest message alone needs {len(ids)} prompt tokens but only {budget} fit "
                f"(max_context − max_new_tokens); shorten it or lower max_new_tokens")
        prompt = Prompt(ids=list(ids), dropped_turns=tuple(dropped_turns), budget=budget)
    # Report indices in the caller's list, not the one with the added system message.
    dropped = tuple(i - offset for i in prompt.dropped_turns if i >= offset)
    return Prompt(ids=prompt.ids, dropped_turns=dropped, budget=budget)


def conversation_prompt_ids(tokenizer, messages: Sequence[Message], builder: PromptBuilder | None = None) -> list[int]:
    """A whole conversation as the model saw it, its last answer included (for attention maps)."""
    if builder is None:
        return template_ids(tokenizer, messages, add_generation_prompt=False)
    answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    asked = list(messages[:-1]) if answer is not None else list(messages)
    ids, _ = builder(tokenizer, asked, 1 << 30)
    if answer:
        ids = list(ids) + list(tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return [int(i) for i in ids]
