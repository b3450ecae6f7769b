"""The conversation model (messages, turns, validation), user text as plain token ids, and prompt ids fitted into
the model's context.

Messages are {role, content} dicts: an optional system message first, then user and assistant messages. A turn is
a user message and the replies after it; replies before any user message form a turn of their own. Every prompt
format (the tokenizer's chat template, Qwen v1's make_context, Baichuan's build_chat_input) cuts the conversation
with `split_turns` and checks it with `validate_messages`.

Text a user typed can never produce an added token (special or not: `<|im_end|>`, `<tool_call>`, `<reserved_106>`),
whatever the prompt format: `encode_user_text` encodes it with the tokenizer's own pipeline (normalizer,
pre-tokenizer, model) minus those tokens. The one exception is a tokenizer's ordinary-text added tokens, listed by
its conversion under `PLAIN_TEXT_TOKENS_KEY` in tokenizer_config.json: a converted SentencePiece model's user-defined
pieces other than `<reserved_N>` (Baichuan2's `\\n`, `，`, `?`), which sentencepiece matches in any text.

History that does not fit (`max_context − max_new_tokens`) loses its oldest turns whole; the system message and the
newest turn are always kept, and the caller is told which messages were dropped.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tokenizers import AddedToken, Tokenizer

from qdemo.errors import PromptTooLongError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# build_prompt(tokenizer, messages, budget) -> (ids, dropped message indices): a family's own prompt format
# (qdemo.models.families.Family.build_prompt). Messages are validated; budget is the most prompt tokens allowed.
PromptBuilder = Callable[[Any, Sequence[Message], int], tuple[list[int], tuple[int, ...]]]
# tokenizer_config.json key (kept in `tokenizer.init_kwargs`): the added tokens that are ordinary text.
PLAIN_TEXT_TOKENS_KEY = "plain_text_added_tokens"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_turns: tuple[int, ...]  # indices into the caller's messages
    budget: int  # tokens the prompt may use


# ---------------------------------------------------------------------------------------- conversation model

def validate_messages(messages: Any, allow_assistant_last: bool = False) -> list[Message]:
    """A clean copy of the messages, or ValueError naming the message index and field at fault.

    The last message must be the user's (a prompt asks for the next answer); with `allow_assistant_last` it may
    also be the assistant's (Baichuan's build_chat_input, a saved conversation)."""
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
    last = clean[-1]["role"]
    if allow_assistant_last and last not in ("user", "assistant"):
        raise ValueError(f"the last message must be the user's or the assistant's, got {last!r}")
    if not allow_assistant_last and last != "user":
        raise ValueError(f"the last message must be the user's, got {last!r}")
    return clean


def split_turns(messages: Sequence[Message]) -> tuple[list[int], list[list[int]]]:
    """(system message indices, turns) where a turn is a user message and the replies after it (replies before any
    user message form a turn of their own); indices into `messages`."""
    system = [0] if messages and messages[0]["role"] == "system" else []
    turns: list[list[int]] = []
    for i in range(len(system), len(messages)):
        if messages[i]["role"] == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return system, turns


def keep_last_turns(messages: Sequence[Message], max_turns: int | None) -> tuple[list[Message], int]:
    """The system message and the last `max_turns` turns (a user message and the replies after it), and how many
    messages were left out. Nothing is left out when there are at most `max_turns` user messages (or max_turns is
    None); otherwise replies before the first kept user message go too."""
    messages = list(messages)
    if max_turns is None:
        return messages, 0
    if not isinstance(max_turns, int) or max_turns < 0:
        raise ValueError(f"max_turns must be a non-negative integer or None, got {max_turns!r}")
    system, turns = split_turns(messages)
    user_turns = [turn for turn in turns if messages[turn[0]]["role"] == "user"]
    if len(user_turns) <= max_turns:
        return messages, 0
    first = user_turns[len(user_turns) - max_turns][0] if max_turns else len(messages)
    kept = [messages[i] for i in system] + messages[first:]
    return kept, len(messages) - len(kept)


def fit_messages(
    messages: Sequence[Message], encode: Callable[[list[Message]], list[int]], budget: int, model_name: str = "model",
    why: str = "max_context − max_new_tokens; shorten it or lower max_new_tokens",
) -> Prompt:
    """Drop the oldest whole turns until `encode(kept)` fits `budget` tokens. Dropping a turn never lengthens the
    prompt, so the first turn to keep is found by bisection: a few encodes even for a long history."""
    system, turns = split_turns(messages)
    encoded: dict[int, list[int]] = {}

    def ids_from(first: int) -> list[int]:
        if first not in encoded:
            kept = system + [i for turn in turns[first:] for i in turn]
            encoded[first] = encode([messages[i] for i in kept])
        return encoded[first]

    newest = len(turns) - 1
    if len(ids_from(newest)) > budget:
        raise PromptTooLongError(
            f"{model_name}: the newest message alone needs {len(ids_from(newest))} prompt tokens but only {budget} "
            f"fit ({why})")
    low, high = 0, newest  # ids_from(high) fits; find the smallest `first` that fits
    while low < high:
        middle = (low + high) // 2
        if len(ids_from(middle)) <= budget:
            high = middle
        else:
            low = middle + 1
    dropped = tuple(i for turn in turns[:low] for i in turn)
    return Prompt(ids=ids_from(low), dropped_turns=dropped, budget=budget)


def chat_template_encoder(tokenizer) -> Callable[[list[Message]], list[int]]:
    def encode(messages: list[Message]) -> list[int]:
        return template_ids(tokenizer, messages, add_generation_prompt=True)

    return encode


# ---------------------------------------------------------------------------------------- user text

@dataclass(frozen=True)
class _PlainText:
    """A fast tokenizer's pipeline for text a user typed, built once per tokenizer."""

    encoder: Any  # tokenizers.Tokenizer: the same model, normalizer and pre-tokenizer, only ordinary added tokens
    blocked: dict[int, str]  # id -> text of every added token that user text must never produce
    texts: tuple[str, ...]  # their texts, longest first
    pattern: re.Pattern | None  # leftmost-longest match of any of those texts
    signature: int  # vocabulary size with added tokens when built: rebuilt if tokens are added later


_PLAIN: "weakref.WeakKeyDictionary[Any, _PlainText]" = weakref.WeakKeyDictionary()
_PLAIN_LOCK = threading.Lock()


def _plain_text(tokenizer) -> _PlainText:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"plain-text encoding needs a fast tokenizer, got {type(tokenizer).__name__}")
    signature = backend.get_vocab_size(with_added_tokens=True)
    with _PLAIN_LOCK:
        state = _PLAIN.get(tokenizer)
        if state is None or state.signature != signature:
            state = _PLAIN[tokenizer] = _build_plain_text(tokenizer, backend, signature)
    return state


def _build_plain_text(tokenizer, backend, signature: int) -> _PlainText:
    listed = (getattr(tokenizer, "init_kwargs", None) or {}).get(PLAIN_TEXT_TOKENS_KEY) or ()
    ordinary = set(listed) if isinstance(listed, (list, tuple)) else set()
    added = backend.get_added_tokens_decoder()
    keep = {i: tok for i, tok in added.items() if not tok.special and tok.content in ordinary}
    # Shares the backend's model, normalizer and pre-tokenizer (no copy); no post-processor, so no bos/eos.
    encoder = Tokenizer(backend.model)
    if backend.normalizer is not None:
        encoder.normalizer = backend.normalizer
    if backend.pre_tokenizer is not None:
        encoder.pre_tokenizer = backend.pre_tokenizer
    encoder.add_tokens([AddedToken(tok.content, single_word=tok.single_word, lstrip=tok.lstrip, rstrip=tok.rstrip,
                                   normalized=tok.normalized, special=False) for tok in keep.values()])
    moved = [tok.content for i, tok in keep.items() if encoder.token_to_id(tok.content) != i]
    if moved:
        raise ValueError(f"ordinary-text tokens {moved[:5]} are not in the tokenizer's model vocabulary")
    blocked = {int(i): tok.content for i, tok in added.items() if i not in keep and tok.content}
    texts = sorted(set(blocked.values()), key=lambda t: (-len(t), t))  # longest first: leftmost-longest matches
    pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
    return _PlainText(encoder, blocked, tuple(texts), pattern, signature)


def encode_user_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`encode_user_text` for many texts in one batched call."""
    state = _plain_text(tokenizer)
    encoded = state.encoder.encode_batch(list(texts), add_special_tokens=False) if texts else []
    # The model alone never yields an added token's id (merges make ordinary tokens); checked, not assumed. An
    # unknown token stays allowed: a model without byte fallback encodes unknown characters with it.
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for text, encoding in zip(texts, encoded):
        ids = [int(i) for i in encoding.ids]
        leaked = sorted({i for i in ids if i in state.blocked and i != unk})
        if leaked:
            raise RuntimeError(f"plain-text encoding produced added-token ids {leaked} for {text[:40]!r}")
        out.append(ids)
    return out


def encode_user_text(tokenizer, text: str) -> list[int]:
    """Token ids of text a user typed: no bos/eos, and never an added token (special or not), so typed
    `<|im_end|>`, `<tool_call>` or `<reserved_106>` stays the plain text it is.

    It is the tokenizer's own pipeline (normalizer, pre-tokenizer, model) without its added vocabulary, i.e. the
    ids the model sees for those characters as ordinary text, except that the ordinary-text added tokens the
    tokenizer lists under PLAIN_TEXT_TOKENS_KEY (a converted SentencePiece model's user-defined pieces such as
    Baichuan2's `\\n`, `，`, `?`) are matched as sentencepiece matches them. Cached per tokenizer."""
    return encode_user_texts(tokenizer, [text])[0]


def control_token_ids(tokenizer) -> set[int]:
    """Ids user text can never produce: every added token except a converted SentencePiece model's ordinary
    pieces (the prompt inspector highlights them)."""
    return set(_plain_text(tokenizer).blocked)


def raw_text_ids(tokenizer, text: str) -> list[int]:
    """The sampling lab's "raw text" context: the text as typed, plain-text ids with no bos/eos (as encode_user_text),
    so a typed control token never becomes one."""
    return encode_user_text(tokenizer, text)


# ---------------------------------------------------------------------------------------- chat template

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use marks around a message's slot in the rendered template
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def template_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """The chat template's ids, with message text never producing an added token.

    A user who types `<|im_end|>` must not end their own turn (prompt injection), nor `<tool_call>` start a tool
    call. When no message contains an added token's text, this is exactly `apply_chat_template`; otherwise see
    `_marked_template_ids`."""
    messages = list(messages)
    texts = _plain_text(tokenizer).texts
    if not any(text in m["content"] for m in messages for text in texts):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False)
        return [int(i) for i in ids]
    return _marked_template_ids(tokenizer, messages, add_generation_prompt)


def _marked_template_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """The template rendered with a marker in each message's place: the added tokens the template writes itself
    become their ids, and the text between them, template text and message text together, is encoded by
    `encode_user_text` as one run, so the tokens at a message's edges are those apply_chat_template gives when
    the message holds no added token's text (added tokens' strip flags are not applied here; no tokenizer qdemo
    loads sets them)."""
    state = _plain_text(tokenizer)
    marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    by_text = {text: i for i, text in sorted(state.blocked.items(), reverse=True)}  # the lowest id per text
    pieces: list[str | int] = []  # text runs and control ids, in order

    def template_text(text: str) -> None:
        pos = 0
        for match in state.pattern.finditer(text) if state.pattern else ():
            pieces.append(text[pos:match.start()])
            pieces.append(by_text[match.group()])
            pos = match.end()
        pieces.append(text[pos:])

    pos = 0
    for match in _SLOT.finditer(rendered):
        template_text(rendered[pos:match.start()])
        pieces.append(messages[int(match.group(1))]["content"])
        pos = match.end()
    template_text(rendered[pos:])
    runs: list[str | int] = []
    for piece in pieces:
        if isinstance(piece, str) and runs and isinstance(runs[-1], str):
            runs[-1] += piece
        elif piece != "":
            runs.append(piece)
    texts = [run for run in runs if isinstance(run, str)]
    encoded = iter(encode_user_texts(tokenizer, texts))
    ids: list[int] = []
    for run in runs:
        ids += next(encoded) if isinstance(run, str) else [run]
    return ids


def with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """The messages with the model's default system prompt first when they bring none (as every prompt is built)."""
    messages = list(messages)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def build_prompt(
    tokenizer, messages: Any, max_context: int, max_new_tokens: int,
    system_prompt: str | None = None, model_name: str = "model", builder: PromptBuilder | None = None,
    max_prompt_tokens: int | None = None,
) -> Prompt:
    """Validate, add the model's default system prompt when none is given, and fit the context: at most
    `max_context − max_new_tokens` prompt tokens, and at most `max_prompt_tokens` (a server's limit) when given.
    `builder` is the family's own prompt format (Qwen v1 make_context, Baichuan build_chat_input); without
    one the tokenizer's chat template is used."""
    given = validate_messages(messages)
    clean = with_system(given, system_prompt)
    offset = len(clean) - len(given)  # dropped turns are reported in the caller's indices
    budget = max_context - max_new_tokens
    if budget <= 0:
        raise PromptTooLongError(f"{model_name}: max_new_tokens {max_new_tokens} leaves no room in "
                                 f"max_context {max_context}")
    why = "max_context − max_new_tokens; shorten it or lower max_new_tokens"
    if max_prompt_tokens is not None and max_prompt_tokens < budget:
        budget, why = max_prompt_tokens, "this server's prompt limit; shorten it"
    if builder is None:
        prompt = fit_messages(clean, chat_template_encoder(tokenizer), budget, model_name, why)
    else:
        ids, dropped_turns = builder(tokenizer, clean, budget)
        if len(ids) > budget:
            raise PromptTooLongError(
                f"{model_name}: the newest message alone needs {len(ids)} prompt tokens but only {budget} fit "
                f"({why})")
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
        ids = list(ids) + encode_user_text(tokenizer, answer)
    return [int(i) for i in ids]
