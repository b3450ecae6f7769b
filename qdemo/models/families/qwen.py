"""Qwen v1 (Qwen-7B-Chat, Qwen-14B-Chat, Qwen-7B-Chat-Int4): model_type "qwen", loaded as Qwen2ForCausalLM.

Within `seq_length` a Qwen v1 model is a Qwen2 model with renamed tensors: c_attn holds q, k, v (with bias)
stacked, the MLP computes c_proj(w1(x) * silu(w2(x))) so w2 is Qwen2's gate and w1 its up projection, and the
RoPE convention (rotate-half) is the same. Qwen v1's dynamic NTK and logn attention scaling only change anything
past `seq_length`; qdemo's context for these models is `seq_length`, so it never goes there.
The Int4 release keeps its GPTQ tensors: c_attn's packed columns split exactly into q/k/v, and transformers'
own GPTQ path (optimum + gptqmodel) loads the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from qdemo.models.families.checkpoint import (
    convert_tensors,
    layer_index,
    read_json,
    read_optional_json,
    source_dtype,
    split_rows,
)
from qdemo.models.families.family import Family, Progress
from qdemo.models.families.gptq import split_gptq_linear
from qdemo.models.families.qwen_chat import MAX_WINDOW_SIZE, make_context_ids
from qdemo.models.families.qwen_tokenizer import convert_qwen_tokenizer

_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
          "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj", "mlp.c_proj": "mlp.down_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def qwen2_config(config: dict) -> dict:
    """Qwen v1 config.json → the fields of a Qwen2Config."""
    def need(key: str):
        if key not in config:
            raise ValueError(f"Qwen v1 config.json has no '{key}' (is this a Qwen v1 checkpoint?)")
        return config[key]

    if config.get("model_type") != "qwen":
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}, expected 'qwen' (Qwen v1); "
                         "Qwen2/Qwen2.5 checkpoints use family qwen2")
    if float(config.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError(f"Qwen v1 rotary_pct {config['rotary_pct']} is not supported (only 1.0, as released)")
    heads, hidden = int(need("num_attention_heads")), int(need("hidden_size"))
    head_dim = int(config.get("kv_channels") or hidden // heads)
    out = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": int(need("vocab_size")), "hidden_size": hidden,
        "intermediate_size": int(need("intermediate_size")) // 2,  # w1 and w2 each have half of it
        "num_hidden_layers": int(need("num_hidden_layers")), "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": int(config.get("seq_length") or config.get("max_position_embeddings") or 2048),
        "rms_norm_eps": float(config.get("layer_norm_epsilon", 1e-6)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.get("rotary_emb_base", 10000))},
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "use_sliding_window": False, "attention_dropout": 0.0,
        "dtype": str(source_dtype(config)).removeprefix("torch."),
    }
    if config.get("quantization_config"):
        out["quantization_config"] = config["quantization_config"]
    return out


class _TensorMapper:
    """Maps Qwen v1 tensor names to Qwen2 ones; GPTQ pieces of c_attn are held until the set is complete."""

    def __init__(self, projection: int, bits: int | None) -> None:
        self.sizes, self.bits = [projection] * 3, bits
        self._held: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name in _TOP:
            return [(_TOP[name], tensor)]
        found = layer_index(name, "transformer.h.")
        if found is None:
            if name.endswith("rotary_emb.inv_freq"):
                return []  # a buffer the native model recomputes
            raise ValueError(f"unexpected tensor {name} in a Qwen v1 checkpoint")
        i, rest = found
        module, _, part = rest.rpartition(".")
        if module == "attn.rotary_emb":
            return []
        if module == "attn.c_attn":
            return self._qkv(i, part, tensor, name)
        if module not in _LAYER:
            raise ValueError(f"unexpected tensor {name} in a Qwen v1 checkpoint")
        return [(f"model.layers.{i}.{_LAYER[module]}.{part}", tensor)]

    def _qkv(self, i: int, part: str, tensor: torch.Tensor, name: str) -> list[tuple[str, torch.Tensor]]:
        prefix = f"model.layers.{i}.self_attn."
        if self.bits is None:  # dense: weight [3P, H] and bias [3P] split along their rows
            return [(f"{prefix}{proj}.{part}", t) for proj, t in zip(_QKV, split_rows(tensor, self.sizes, name))]
        held = self._held.setdefault(i, {})
        held[part] = tensor
        if not all(p in held for p in _GPTQ_PARTS) or "bias" not in held:
            return []

        del self._held[i]
        pieces = split_gptq_linear(held, self.sizes, bits=self.bits)
        return [(f"{prefix}{proj}.{key}", t) for proj, piece in zip(_QKV, pieces) for key, t in piece.items()]

    def finish(self) -> None:
        if self._held:
            layer, parts = next(iter(self._held.items()))
            raise ValueError(f"layer {layer} c_attn is incomplete: has only {sorted(parts)}")


def convert(src: Path, out: Path, progress: Optional[Progress] = None) -> None:
    """Write a native Qwen2 checkpoint (config, safetensors, fast tokenizer, generation config) for src."""
    from transformers import GenerationConfig, Qwen2Config  # heavy (model classes, ~1.5 s): paid on conversion

    config = read_json(src / "config.json", "the model config")
    if "quantization_config" not in config and (src / "quantize_config.json").is_file():
        # AutoGPTQ-era releases keep the GPTQ settings beside config.json; transformers wants them inside.
        quant = read_json(src / "quantize_config.json", "the GPTQ settings")
        config = {**config, "quantization_config": {"quant_method": "gptq", **quant}}
    fields = qwen2_config(config)
    quant = fields.get("quantization_config")
    bits = int(quant.get("bits", 4)) if quant else None
    if quant and quant.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{src}: quantization {quant.get('quant_method')!r} is not supported (GPTQ only)")
    out.mkdir(parents=True, exist_ok=True)
    convert_qwen_tokenizer(src, out)
    mapper = _TensorMapper(fields["num_attention_heads"] * fields["head_dim"], bits)
    convert_tensors(src, out, mapper, progress)
    mapper.finish()
    Qwen2Config(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")}).save_pretrained(out)
    _fix_architecture(out)
    gen = read_optional_json(src / "generation_config.json")
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    GenerationConfig(eos_token_id=eos, pad_token_id=gen.get("pad_token_id", eos)).save_pretrained(out)


def _fix_architecture(out: Path) -> None:
    path = out / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["architectures"] = ["Qwen2ForCausalLM"]
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def build_prompt(tokenizer, messages: Sequence[dict[str, str]], budget: int) -> tuple[list[int], tuple[int, ...]]:
    """The official make_context (chatml), its history window capped by qdemo's budget as well."""
    return make_context_ids(tokenizer, messages, min(MAX_WINDOW_SIZE, budget))


FAMILY = Family(
    name="qwen",
    stop_tokens=("<|im_end|>", "<|im_start|>"),
    position_encoding="rope",
    convert=convert,
    build_prompt=build_prompt,
    position_note="Qwen v1 also has dynamic-NTK RoPE and logn attention scaling, but both only act on sequences "
                  "longer than its `seq_length` (8192; 2048 in the first release). qdemo caps these models' "
                  "context at `seq_length`, so the plain RoPE shown here is exactly what the model computes.",
)
