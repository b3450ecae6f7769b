"""What differs per model family, one small module each. Nothing here imports the rest of qdemo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Facts the engine and prompt builder need about a model family."""

    name: str
    stop_tokens: tuple[str, ...]  # token strings that end an answer besides the tokenizer's eos
    default_system_prompt: str | None
    position_encoding: str  # "rope" or "alibi"


def _families() -> dict[str, Family]:
    from qdemo.families import qwen2

    return {f.name: f for f in (qwen2.FAMILY,)}


FAMILIES: dict[str, Family] = _families()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
