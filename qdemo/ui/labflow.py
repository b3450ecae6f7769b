"""Sampling-lab context handling: text → context ids (chat template or raw), and the next-token answer."""

from __future__ import annotations

from typing import Any

from qdemo.introspect import next_token_logits
from qdemo.lab import stage_distributions
from qdemo.loader import LoadedModel
from qdemo.prompting import build_prompt
from qdemo.sampling import SamplingParams

CONTEXT_MODES = ("chat", "raw text")


def context_ids(lm: LoadedModel, text: str, mode: str, system: str | None = None) -> list[int]:
    """'chat': the text is a user message in the model's chat template (answer about to start);
    'raw text': the text itself, tokenized as plain text (typed `<|im_end|>` stays text, as everywhere)."""
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context mode must be one of {', '.join(CONTEXT_MODES)}, got {mode!r}")
    if not text or not text.strip():
        raise ValueError("the context is empty: type some text first")
    if mode == "chat":
        return build_prompt(lm.tokenizer, [{"role": "user", "content": text}], lm.spec.max_context, 1,
                            system if system is not None else lm.spec.system_prompt, lm.spec.name,
                            lm.family.build_prompt).ids
    ids = lm.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) >= lm.spec.max_context:
        raise ValueError(f"{lm.spec.name}: the context has {len(ids)} tokens; the model takes {lm.spec.max_context}")
    return list(ids)


def next_token_report(lm: LoadedModel, ids: list[int], params: SamplingParams, top_n: int = 20) -> dict[str, Any]:
    """Each stage's top-N for the token after `ids`, with decoded token texts (the API's answer)."""
    stages = stage_distributions(next_token_logits(lm, ids), ids, params.replace(num_beams=1), top_n=top_n)
    return {"context_tokens": len(ids), "stages": [
        {"stage": s.name, "tokens": [{"id": i, "text": lm.tokenizer.decode([i]), "p": p}
                                     for i, p in zip(s.token_ids, s.probs)]} for s in stages]}
