"""What differs per model family, one small module each. Of the rest of qdemo, the modules here import only
qdemo.models.prompting, the conversation model every prompt format shares (messages, turns, their validation, and
`encode_user_text` for what a user typed); qdemo.models.prompting imports nothing from here.

A family says how its checkpoints become something transformers loads natively (`convert`, None when the
checkpoint already is), how chat messages become prompt ids (`build_prompt`, None for the tokenizer's chat
template), which tokens stop an answer, and how positions are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qdemo.models.prompting import PromptBuilder

# progress(phase, done, total), the same shape as qdemo.models.sources.ProgressFn.
Progress = Callable[[str, float, float], None]
# convert(original checkpoint dir, output dir, progress): writes a native checkpoint (config, safetensors,
# tokenizer files, generation_config) that AutoModelForCausalLM / AutoTokenizer load without remote code.
Converter = Callable[[Path, Path, Optional[Progress]], None]
# build_prompt: qdemo.models.prompting.PromptBuilder, (tokenizer, messages, budget) -> (ids, dropped message indices).
# Messages are validated {role, content} dicts (an optional system message first, the last one the user's);
# budget is the most prompt tokens allowed. The newest user message is always kept, and message text goes through
# qdemo.models.prompting.encode_user_text, so it never produces an added token.


@dataclass(frozen=True)
class Family:
    """Facts the engine, loader and prompt builder need about a model family."""

    name: str
    stop_tokens: tuple[str, ...]  # token strings that end an answer besides the tokenizer's eos
    position_encoding: str  # "rope" or "alibi"
    convert: Converter | None = None
    build_prompt: PromptBuilder | None = None
    position_note: str = ""  # shown beside the position-encoding figures (what qdemo does differently, if anything)


def _families() -> dict[str, Family]:
    from qdemo.models.families import baichuan, qwen, qwen2

    return {f.name: f for f in (qwen2.FAMILY, qwen.FAMILY, *baichuan.FAMILIES)}


FAMILIES: dict[str, Family] = _families()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
