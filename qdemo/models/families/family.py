"""The facts every model family states (one `Family` per family module)."""

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
