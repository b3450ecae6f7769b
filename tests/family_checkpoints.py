"""Tiny random checkpoints in each seed family's ORIGINAL on-disk layout, and a reference forward for them.

The layouts copy what the released repositories hold (config.json with the original model_type, architectures and
field names; original tensor names; the original tokenizer files), so qdemo's conversion is exercised exactly as on
the real models. The reference forward is written here from ../shared/model-facts.md, on the original tensors,
independently of qdemo and of transformers' modeling code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.qwen_v1_fixtures import write_qwen_tiktoken


@dataclass(frozen=True)
class Layout:
    family: str  # qdemo family name
    alibi: bool
    norm_head: bool
    qwen: bool  # Qwen v1 tensor names, c_attn bias, w1/w2 MLP


LAYOUTS = {
    "qwen": Layout("qwen", alibi=False, norm_head=False, qwen=True),
    "baichuan": Layout("baichuan", alibi=False, norm_head=False, qwen=False),
    "baichuan2": Layout("baichuan2", alibi=False, norm_head=True, qwen=False),
    "baichuan-13b": Layout("baichuan-13b", alibi=True, norm_head=False, qwen=False),
    "baichuan2-13b": Layout("baichuan2-13b", alibi=True, norm_head=True, qwen=False),
}
HIDDEN, LAYERS, INTERMEDIATE = 48, 2, 64


def heads_for(layout: Layout) -> int:
    return 6 if layout.alibi else 4  # 6: a non-power-of-2 head count exercises ALiBi's interleave rule


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _random_state(layout: Layout, vocab: int, seed: int, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm_weight() -> torch.Tensor:
        return 1.0 + rand(hidden, scale=0.1)

    state: dict[str, torch.Tensor] = {}
    if layout.qwen:
        state["transformer.wte.weight"] = rand(vocab, hidden, scale=0.5)
        for i in range(LAYERS):
            p = f"transformer.h.{i}."
            state[p + "ln_1.weight"] = norm_weight()
            state[p + "attn.c_attn.weight"] = rand(3 * hidden, hidden, scale=0.2)
            state[p + "attn.c_attn.bias"] = rand(3 * hidden, scale=0.2)
            state[p + "attn.c_proj.weight"] = rand(hidden, hidden)
            state[p + "ln_2.weight"] = norm_weight()
            state[p + "mlp.w1.weight"] = rand(INTERMEDIATE, hidden)
            state[p + "mlp.w2.weight"] = rand(INTERMEDIATE, hidden)
            state[p + "mlp.c_proj.weight"] = rand(hidden, INTERMEDIATE)
        state["transformer.ln_f.weight"] = norm_weight()
    else:
        state["model.embed_tokens.weight"] = rand(vocab, hidden, scale=0.5)
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            state[p + "input_layernorm.weight"] = norm_weight()
            state[p + "self_attn.W_pack.weight"] = rand(3 * hidden, hidden, scale=0.2)
            state[p + "self_attn.o_proj.weight"] = rand(hidden, hidden)
            state[p + "post_attention_layernorm.weight"] = norm_weight()
            state[p + "mlp.gate_proj.weight"] = rand(INTERMEDIATE, hidden)
            state[p + "mlp.up_proj.weight"] = rand(INTERMEDIATE, hidden)
            state[p + "mlp.down_proj.weight"] = rand(hidden, INTERMEDIATE)
        state["model.norm.weight"] = norm_weight()
    # Large enough that greedy answers vary; NormHead models get unnormalised rows, as trained ones have.
    state["lm_head.weight"] = rand(vocab, hidden, scale=3.0)
    return state


def _qwen_config(vocab: int, hidden: int = HIDDEN) -> dict:
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "kv_channels": hidden // 4, "intermediate_size": 2 * INTERMEDIATE, "seq_length": 256,
        "max_position_embeddings": 256, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "layer_norm_epsilon": 1e-6, "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True,
        "scale_attn_weights": True, "bf16": False, "fp16": False, "fp32": True, "tie_word_embeddings": False,
        "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "use_flash_attn": "auto", "tokenizer_class": "QWenTokenizer",
    }


def _baichuan_config(layout: Layout, vocab: int) -> dict:
    config = {
        "architectures": ["BaichuanForCausalLM" if layout.norm_head or layout.alibi else "BaiChuanForCausalLM"],
        "model_type": "baichuan",
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "vocab_size": vocab, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": heads_for(layout), "intermediate_size": INTERMEDIATE, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "initializer_range": 0.02, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    }
    if layout.alibi:
        config["model_max_length"] = 256  # the 13B configs have no max_position_embeddings
    else:
        config["max_position_embeddings"] = 256
        if layout.norm_head:
            config.update(model_max_length=256, z_loss_weight=0)
    return config


def write_checkpoint(path: Path, family: str, seed: int = 0, bin_weights: bool = False, hidden: int = HIDDEN) -> Path:
    """A tiny random checkpoint of `family` in its original layout; returns path. `hidden` other than HIDDEN is
    for Qwen v1 only (the GPTQ test needs 32-wide quantization groups)."""
    layout = LAYOUTS[family]
    path.mkdir(parents=True, exist_ok=True)
    if layout.qwen:
        vocab = write_qwen_tiktoken(path)
        config = _qwen_config(vocab, hidden)
        endoftext = len((path / "qwen.tiktoken").read_bytes().splitlines())  # specials follow the ranks
        _write_json(path / "generation_config.json", {
            "chat_format": "chatml", "eos_token_id": endoftext, "pad_token_id": endoftext, "max_window_size": 6144,
            "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1})
    else:
        from tests.baichuan_fixtures import write_baichuan_tokenizer

        vocab = write_baichuan_tokenizer(path, chat=layout.norm_head or layout.alibi)
        config = _baichuan_config(layout, vocab)
        _write_json(path / "generation_config.json", {
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 195,
            "assistant_token_id": 196, "max_new_tokens": 64})
    _write_json(path / "config.json", config)
    state = _random_state(layout, vocab, seed, hidden)
    if bin_weights:  # the older Baichuan releases ship pytorch_model.bin
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        names = sorted(state)
        half = len(names) // 2  # two shards, as real checkpoints come in several
        save_file({n: state[n] for n in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
        save_file({n: state[n] for n in names[half:]}, str(path / "model-00002-of-00002.safetensors"))
    (path / "modeling_remote.py").write_text("raise RuntimeError('remote code must never run')\n")
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", weights_only=True)
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


# --- reference forward (from model-facts.md, on the original tensors) -----------------------------------------

def ref_alibi_slopes(n: int) -> list[float]:
    def power_of_two(m: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_two(p) + ref_alibi_slopes(2 * p)[0::2][: n - p]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [heads, seq, d]; rotate-half pairing of dim i with i + d/2."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(x.shape[1], dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(state: dict[str, torch.Tensor], family: str, ids: list[int]) -> torch.Tensor:
    """fp32 logits [seq, vocab] of the original model on ids."""
    layout = LAYOUTS[family]
    heads = heads_for(layout)
    embed = state["transformer.wte.weight" if layout.qwen else "model.embed_tokens.weight"]
    hidden = embed.shape[1]
    d = hidden // heads
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if layout.alibi:
        slopes = torch.tensor(ref_alibi_slopes(heads))
        # The original's form: slope × (key position − last position), masked above the diagonal.
        bias = slopes[:, None, None] * (torch.arange(n)[None, None, :] - (n - 1)).float()
    else:
        bias = torch.zeros(heads, 1, 1)
    if layout.qwen:
        x = state["transformer.wte.weight"][ids]
    else:
        x = state["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        if layout.qwen:
            p = f"transformer.h.{i}."
            h = _rms(x, state[p + "ln_1.weight"])
            qkv = h @ state[p + "attn.c_attn.weight"].T + state[p + "attn.c_attn.bias"]
            o_proj = state[p + "attn.c_proj.weight"]
        else:
            p = f"model.layers.{i}."
            h = _rms(x, state[p + "input_layernorm.weight"])
            qkv = h @ state[p + "self_attn.W_pack.weight"].T
            o_proj = state[p + "self_attn.o_proj.weight"]
        q, k, v = (t.view(n, heads, d).transpose(0, 1) for t in qkv.split(hidden, dim=-1))
        if not layout.alibi:
            q, k = _rope(q, 10000.0), _rope(k, 10000.0)
        scores = q @ k.transpose(1, 2) / math.sqrt(d) + bias
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + attn.transpose(0, 1).reshape(n, hidden) @ o_proj.T
        if layout.qwen:
            h = _rms(x, state[p + "ln_2.weight"])
            mlp = (h @ state[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(h @ state[p + "mlp.w2.weight"].T)
            x = x + mlp @ state[p + "mlp.c_proj.weight"].T
        else:
            h = _rms(x, state[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ state[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ state[p + "mlp.up_proj.weight"].T)) @ state[p + "mlp.down_proj.weight"].T
    x = _rms(x, state["transformer.ln_f.weight" if layout.qwen else "model.norm.weight"])
    head = state["lm_head.weight"]
    if layout.norm_head:
        head = head / head.norm(dim=-1, keepdim=True)
    return x @ head.T


def registry_entry(name: str, family: str, path: Path, max_context: int = 256) -> str:
    return (f"  - name: {name}\n    family: {family}\n    source: {{local: {{path: {path}}}}}\n"
            f"    dtype: float32\n    max_context: {max_context}\n"
            f"    sampling: {{do_sample: false, max_new_tokens: 12}}\n")


def write_family_registry(root: Path) -> Path:
    """Every seed family's checkpoint in its original layout under `root` (Baichuan-7B as pytorch_model.bin, the
    rest as safetensors shards) and one models.yaml naming them tiny-<family>; returns the registry's path."""
    entries = []
    for i, family in enumerate(LAYOUTS):
        write_checkpoint(root / family, family, seed=i, bin_weights=family == "baichuan")
        entries.append(registry_entry(f"tiny-{family}", family, root / family))
    registry_path = root / "models.yaml"
    registry_path.write_text("models:\n" + "".join(entries), encoding="utf-8")
    return registry_path


def load_family_models(root: Path) -> dict:
    """Every seed family plus native Qwen2, written in their original layouts under `root`, converted through
    qdemo's loader (a private cache) and loaded on the CPU: {family: LoadedModel}."""
    import pytest

    from qdemo.models.loader import load_model
    from qdemo.models.registry import load_registry
    from tests.conftest import write_registry, write_tiny_qwen2

    registry_path = write_family_registry(root)
    qwen2_registry = write_registry(root / "qwen2.yaml", write_tiny_qwen2(root / "qwen2"), name="tiny-qwen2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QDEMO_CACHE", str(root / "cache"))
        registry = load_registry(registry_path)
        models = {f: load_model(registry.get(f"tiny-{f}"), device="cpu") for f in LAYOUTS}
        models["qwen2"] = load_model(load_registry(qwen2_registry).get("tiny-qwen2"), device="cpu")
    return models
