"""Baichuan-7B, Baichuan2-7B, Baichuan-13B and Baichuan2-13B without their remote code.

All four fuse q, k, v into one `W_pack` [3H, H]; the conversion splits it. The 7B models are LLaMA with RoPE
(LlamaForCausalLM); the 13B models use ALiBi instead, served by qdemo's own small model class
(`alibi_model.py`). Baichuan2's `NormHead` L2-normalises the lm_head rows at every forward; normalising once
at conversion gives the same logits. The SentencePiece tokenizer becomes a fast tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from qdemo.models.families.baichuan_chat import build_chat_input_ids
from qdemo.models.families.checkpoint import (
    convert_tensors,
    layer_index,
    normalise_rows,
    read_json,
    read_optional_json,
    source_dtype,
    split_rows,
)
from qdemo.models.families.family import Family, Progress
from qdemo.models.families.sp_tokenizer import convert_sp_tokenizer, encode_plain

USER_TOKEN_ID, ASSISTANT_TOKEN_ID = 195, 196  # Baichuan-13B-Chat and Baichuan2-*-Chat role markers


@dataclass(frozen=True)
class Variant:
    alibi: bool  # 13B: ALiBi instead of RoPE
    norm_head: bool  # Baichuan2: lm_head rows normalised


def _native_config(config: dict, variant: Variant) -> dict:
    def need(key: str):
        if key not in config:
            raise ValueError(f"Baichuan config.json has no '{key}'")
        return config[key]

    if config.get("model_type") != "baichuan":
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}, expected 'baichuan'")
    heads = int(need("num_attention_heads"))
    context = int(config.get("model_max_length") or config.get("max_position_embeddings") or 4096)
    fields = {
        "vocab_size": int(need("vocab_size")), "hidden_size": int(need("hidden_size")),
        "intermediate_size": int(need("intermediate_size")), "num_hidden_layers": int(need("num_hidden_layers")),
        "num_attention_heads": heads, "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": context, "hidden_act": config.get("hidden_act", "silu"),
        "tie_word_embeddings": False, "pad_token_id": config.get("pad_token_id", 0),
        "bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2),
        "dtype": str(source_dtype(config)).removeprefix("torch."),
    }
    if not variant.alibi:
        fields.update(num_key_value_heads=heads, attention_bias=False, mlp_bias=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return fields


def _tensor_map(hidden: int, variant: Variant):
    def map_tensor(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name == "lm_head.weight":
            return [(name, normalise_rows(tensor) if variant.norm_head else tensor)]
        if name.endswith("rotary_emb.inv_freq") or name.endswith(".future_mask"):
            return []  # buffers the native model computes itself
        found = layer_index(name, "model.layers.")
        if found and found[1] == "self_attn.W_pack.weight":
            parts = split_rows(tensor, [hidden] * 3, name)
            return [(f"model.layers.{found[0]}.self_attn.{p}.weight", t)
                    for p, t in zip(("q_proj", "k_proj", "v_proj"), parts)]
        if name.startswith("model."):
            return [(name, tensor)]
        raise ValueError(f"unexpected tensor {name} in a Baichuan checkpoint")
    return map_tensor


def _expected_names(layers: int) -> set[str]:
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
        f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")] + [
        "input_layernorm.weight", "post_attention_layernorm.weight"]
    return {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{p}" for i in range(layers) for p in per_layer}


def _converter(variant: Variant):
    def convert(src: Path, out: Path, progress: Optional[Progress] = None) -> None:
        # Heavy (transformers' model classes, ~1.5 s to import): paid when a checkpoint converts, not at start.
        from transformers import GenerationConfig, LlamaConfig  # heavy: see above

        from qdemo.models.families.alibi_model import BaichuanAlibiConfig  # heavy: built on transformers' models

        fields = _native_config(read_json(src / "config.json", "the model config"), variant)
        out.mkdir(parents=True, exist_ok=True)
        convert_sp_tokenizer(src, out)
        convert_tensors(src, out, _tensor_map(fields["hidden_size"], variant), progress,
                        expected=_expected_names(fields["num_hidden_layers"]))
        if variant.alibi:
            BaichuanAlibiConfig(**fields).save_pretrained(out)
        else:
            LlamaConfig(**fields).save_pretrained(out)
        gen = read_optional_json(src / "generation_config.json")
        GenerationConfig(eos_token_id=gen.get("eos_token_id", fields["eos_token_id"]),
                         pad_token_id=gen.get("pad_token_id", fields["pad_token_id"]),
                         bos_token_id=gen.get("bos_token_id", fields["bos_token_id"])).save_pretrained(out)
    return convert


def chat_prompt(tokenizer, messages: Sequence[dict[str, str]], budget: int) -> tuple[list[int], tuple[int, ...]]:
    """The official build_chat_input (user 195, assistant 196, newest rounds first within the budget)."""
    return build_chat_input_ids(tokenizer, messages, budget, USER_TOKEN_ID, ASSISTANT_TOKEN_ID)


def base_prompt(tokenizer, messages: Sequence[dict[str, str]], budget: int) -> tuple[list[int], tuple[int, ...]]:
    """Baichuan-7B is a base model with no chat format: the newest message is continued as plain text (the seed
    prompts it with raw text too). Earlier turns are left out and reported as dropped."""
    ids = encode_plain(tokenizer, messages[-1]["content"])
    dropped = tuple(range(len(messages) - 1))
    return ids[-budget:], dropped


def _family(name: str, variant: Variant, chat: bool) -> Family:
    return Family(name=name, stop_tokens=(), position_encoding="alibi" if variant.alibi else "rope",
                  convert=_converter(variant), build_prompt=chat_prompt if chat else base_prompt)


# Baichuan-7B (base): plain-text prompts; the chat models: build_chat_input prompts.
BAICHUAN = _family("baichuan", Variant(alibi=False, norm_head=False), chat=False)
BAICHUAN2 = _family("baichuan2", Variant(alibi=False, norm_head=True), chat=True)
BAICHUAN_13B = _family("baichuan-13b", Variant(alibi=True, norm_head=False), chat=True)
BAICHUAN2_13B = _family("baichuan2-13b", Variant(alibi=True, norm_head=True), chat=True)
FAMILIES = (BAICHUAN, BAICHUAN2, BAICHUAN_13B, BAICHUAN2_13B)
