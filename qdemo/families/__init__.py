"""What differs per model family, one small module each. Nothing here imports the rest of qdemo.

A family says how its checkpoints become something transformers loads natively (`convert`, None when the
checkpoint already is), how chat messages become prompt ids (`build_prompt`, None for the tokenizer's chat
template), which tokens stop an answer, and how positions are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

# progress(phase, done, total), the same shape as qdemo.sources.ProgressFn.
Progress = Callable[[str, float, float], None]
# convert(original checkpoint dir, output dir, progress): writes a native checkpoint (config, safetensors,
# tokenizer files, generation_config) that AutoModelForCausalLM / AutoTokenizer load without remote code.
Converter = Callable[[Path, Path, Optional[Progress]], None]
# build_prompt(tokenizer, messages, budget) -> (ids, dropped message indices). Messages are validated
# {role, content} dicts (an optional system message first, the last one the user's); budget is the most
# prompt tokens allowed. The newest user message is always kept.
PromptBuilder = Callable[[object, Sequence[dict[str, str]], int], tuple[list[int], tuple[int, ...]]]


@dataclass(frozen=True)
class Family:
    """Facts the engine, loader and prompt builder need about a model family."""

    name: str
    stop_tokens: tuple[str, ...]  # token strings that end an answer besides the tokenizer's eos
    default_system_prompt: str | None
    position_encoding: str  # "rope" or "alibi"
    convert: Converter | None = None
    build_prompt: PromptBuilder | None = None
    description: str = ""  # one line for the model card / README: how qdemo loads it
    position_note: str = ""  # shown beside the position-encoding figures (what qdemo does differently, if anything)


def _families() -> dict[str, Family]:
    from qdemo.families import baichuan, qwen, qwen2

    return {f.name: f for f in (qwen2.FAMILY, qwen.FAMILY, *baichuan.FAMILIES)}


FAMILIES: dict[str, Family] = _families()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
