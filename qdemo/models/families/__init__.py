"""What differs per model family, one small module each. Of the rest of qdemo, the modules here import only
qdemo.models.prompting, the conversation model every prompt format shares (messages, turns, their validation, and
`encode_user_text` for what a user typed); qdemo.models.prompting imports nothing from here.

A family says how its checkpoints become something transformers loads natively (`convert`, None when the
checkpoint already is), how chat messages become prompt ids (`build_prompt`, None for the tokenizer's chat
template), which tokens stop an answer, and how positions are encoded.
"""

from __future__ import annotations

from qdemo.models.families import baichuan, qwen, qwen2
from qdemo.models.families.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen2.FAMILY, qwen.FAMILY, *baichuan.FAMILIES)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
