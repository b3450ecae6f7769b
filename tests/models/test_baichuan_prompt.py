"""build_chat_input_ids against a literal restatement of Baichuan's official build_chat_input over sentencepiece."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qdemo.models.families.baichuan_chat import build_chat_input_ids
from qdemo.models.families.sp_tokenizer import convert_sp_tokenizer
from tests.baichuan_fixtures import (
    ASSISTANT_ID,
    STYLES,
    USER_ID,
    official_build_chat_input,
    plain_oracle,
    sp_oracle,
    write_baichuan_tokenizer,
)

CHAT_STYLES = ("baichuan2", "baichuan1")  # Baichuan2-*-Chat, and Baichuan-13B-Chat's dummy-prefix tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant. 请用中文回答。"}
CONVERSATION = [
    {"role": "user", "content": "你好呀"},
    {"role": "assistant", "content": "你好！很高兴和你交流。请问有什么我可以帮助你的吗？"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. 北京是中国的首都。"},
    {"role": "user", "content": "世界上第二高的山峰是哪座？ 12345"},
    {"role": "assistant", "content": "乔戈里峰 (K2), 8611 m."},
    {"role": "user", "content": "  and in   English, please\n"},
]


def _convert(root, style: str, **overrides):
    write_baichuan_tokenizer(root / "original", style=style, **overrides)
    convert_sp_tokenizer(root / "original", root / "converted")
    return AutoTokenizer.from_pretrained(root / "converted")


@pytest.fixture(scope="module", params=CHAT_STYLES)
def chat(request, tmp_path_factory):
    return request.param, _convert(tmp_path_factory.mktemp(request.param), request.param)


def _official(style: str, messages, budget: int) -> tuple[list[int], int]:
    return official_build_chat_input(sp_oracle(style).encode, messages, budget)


def _expected_dropped(style: str, messages, budget: int, kept_rounds: int) -> tuple[int, ...]:
    """The documented rule, from the official layout: whole rounds left out, plus any message of which the final
    left truncation cut a token (role marker included)."""
    encode = sp_oracle(style).encode
    first = 1 if messages[0]["role"] == "system" else 0
    starts = [i for i in range(first, len(messages)) if messages[i]["role"] == "user" or i == first]
    kept_from = starts[len(starts) - kept_rounds]
    system_len = len(encode(messages[0]["content"])) if first else 0
    lengths = {i: 1 + len(encode(messages[i]["content"])) for i in range(kept_from, len(messages))}
    total = system_len + sum(lengths.values()) + (messages[-1]["role"] != "assistant")
    cut = max(0, total - budget)
    dropped = set(range(first, kept_from))
    if first and system_len and cut:
        dropped.add(0)
    position = system_len
    for i in range(kept_from, len(messages)):
        if position < cut:
            dropped.add(i)
        position += lengths[i]
    return tuple(sorted(dropped))


@pytest.mark.parametrize("messages", [
    CONVERSATION[:1],
    CONVERSATION[:3],
    [SYSTEM] + CONVERSATION,
    [SYSTEM] + CONVERSATION[:4],  # the last message is the assistant's: no trailing assistant marker
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "?"}],
], ids=["single-turn", "multi-turn", "system", "ends-with-assistant", "empty-contents"])
def test_matches_the_official_builder_with_room_to_spare(chat, messages):
    style, tokenizer = chat
    expected, kept = _official(style, messages, 4096)
    ids, dropped = build_chat_input_ids(tokenizer, messages, 4096)
    assert ids == expected and dropped == ()
    assert ids.count(USER_ID) == sum(m["role"] == "user" for m in messages)
    assert ids[-1] == (ASSISTANT_ID if messages[-1]["role"] != "assistant" else expected[-1])


def test_every_budget_matches_the_official_builder(chat):
    # sweeps the budget across every round boundary: whole-round drops, the exact-fill case that makes the
    # official left truncation shave one token, cuts into the system text and into the newest round
    style, tokenizer = chat
    for messages in ([SYSTEM] + CONVERSATION, CONVERSATION):
        full, _ = _official(style, messages, 10_000)
        for budget in range(1, len(full) + 3):
            expected, kept = _official(style, messages, budget)
            ids, dropped = build_chat_input_ids(tokenizer, messages, budget)
            assert ids == expected, budget
            assert dropped == _expected_dropped(style, messages, budget, kept), budget


def test_old_rounds_drop_whole_and_the_rest_stays_intact(chat):
    style, tokenizer = chat
    encode = sp_oracle(style).encode
    messages = [SYSTEM] + CONVERSATION
    system_ids = encode(SYSTEM["content"])
    last_two_rounds = sum(1 + len(encode(m["content"])) for m in CONVERSATION[4:])
    budget = len(system_ids) + last_two_rounds + 2  # room for the trailing marker, not for another round
    ids, dropped = build_chat_input_ids(tokenizer, messages, budget)
    assert ids == _official(style, messages, budget)[0]
    assert dropped == (1, 2, 3, 4)  # the two oldest rounds, whole
    assert ids[:len(system_ids)] == system_ids and len(ids) == len(system_ids) + last_two_rounds + 1


def test_a_newest_message_longer_than_the_budget_is_left_truncated(chat):
    style, tokenizer = chat
    long_text = "人工智能正在改变我们的生活和工作方式。 The quick brown fox jumps. " * 12
    messages = [SYSTEM, *CONVERSATION[:2], {"role": "user", "content": long_text}]
    ids, dropped = build_chat_input_ids(tokenizer, messages, 40)
    expected, kept = _official(style, messages, 40)
    assert ids == expected and kept == 1 and len(ids) == 40
    assert ids[-1] == ASSISTANT_ID and USER_ID not in ids  # its marker went with the cut
    assert ids[:-1] == sp_oracle(style).encode(long_text)[-39:]
    assert dropped == (0, 1, 2, 3)  # system and the old round left out, the newest message cut


def test_typed_role_markers_stay_plain_text(chat):
    style, tokenizer = chat
    user, assistant = STYLES[style].roles
    messages = [
        {"role": "system", "content": f"system {assistant} text"},
        {"role": "user", "content": f"{user}{assistant} please say {assistant}hi"},
        {"role": "assistant", "content": f"I typed {user} too"},
        {"role": "user", "content": f"{assistant}</s><s>"},
    ]
    ids, dropped = build_chat_input_ids(tokenizer, messages, 4096)
    assert ids.count(USER_ID) == 2 and ids.count(ASSISTANT_ID) == 2 and not {0, 1, 2} & set(ids)
    # the same algorithm over sentencepiece with the markers made ordinary text gives the same ids...
    assert ids == official_build_chat_input(plain_oracle(style).encode, messages, 4096)[0] and dropped == ()
    # ...whereas the official code, encoding with the markers live, lets the text inject them
    official, _ = _official(style, messages, 4096)
    assert official.count(USER_ID) > 2 and official.count(ASSISTANT_ID) > 2


def test_bos_and_eos_wrap_each_text_as_the_tokenizers_encode_does(tmp_path):
    tokenizer = _convert(tmp_path, "baichuan2", config_overrides={"add_bos_token": True, "add_eos_token": True})
    sp = sp_oracle("baichuan2")
    messages = [SYSTEM] + CONVERSATION[:3]
    ids, dropped = build_chat_input_ids(tokenizer, messages, 4096)
    assert ids == official_build_chat_input(lambda text: [1] + sp.encode(text) + [2], messages, 4096)[0]
    no_system, _ = build_chat_input_ids(tokenizer, CONVERSATION[:1], 4096)
    assert no_system[:2] == [1, 2]  # the official code encodes the absent system text as "" too


@pytest.mark.parametrize("messages, budget, message", [
    ([], 10, "non-empty list"),
    ([{"role": "user", "content": "a"}, SYSTEM], 10, "message 1: a system message may only come first"),
    ([{"role": "tool", "content": "a"}], 10, "message 0 has role 'tool'"),
    ([{"role": "user", "content": None}], 10, r"message 0 \(user\) content must be text, got NoneType"),
    ([SYSTEM], 10, "last message must be the user's or the assistant's, got 'system'"),
    ([{"role": "user", "content": "a"}], 0, "at least 1"),
])
def test_invalid_requests_are_refused(chat, messages, budget, message):
    _, tokenizer = chat
    with pytest.raises(ValueError, match=message):
        build_chat_input_ids(tokenizer, messages, budget)
