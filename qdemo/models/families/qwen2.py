"""Qwen2 / Qwen2.5: native in transformers (Qwen2ForCausalLM); chatml prompts via the tokenizer's template."""

from qdemo.models.families.family import Family

FAMILY = Family(
    name="qwen2",
    # <|im_end|> closes an assistant turn; <|endoftext|> is what base models emit.
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    position_encoding="rope",
)
