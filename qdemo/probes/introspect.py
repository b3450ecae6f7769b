"""Look inside a loaded model: one layer's attention weights, its RoPE frequencies, a model card, next-token logits.

Everything is read from the loaded model's own modules and config, not re-derived by hand, so what is shown is
what the model computes. The model keeps running with its fast attention ("sdpa", which returns no weights);
attention weights are recomputed eagerly for one layer on demand instead of switching the implementation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from qdemo.core.decode import ShouldStop, StepLock
from qdemo.errors import Cut
from qdemo.models.loader import LoadedModel
from qdemo.probes.clock import check_clock, layer_clock


class _Captured(Exception):
    """Raised from the pre-hook to stop the forward once the wanted layer's inputs are in hand."""


# --- validation ---------------------------------------------------------------------------------------------

def _vocab_rows(lm: LoadedModel) -> int:
    # The embedding table, not the tokenizer or config, bounds what the forward accepts (they can differ).
    return lm.vocab_size


def _decoder_layers(lm: LoadedModel) -> torch.nn.ModuleList:
    layers = getattr(getattr(lm.model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"model {lm.spec.name}: no decoder layers at model.model.layers (not a Llama-like model)")
    return layers


def _input(lm: LoadedModel, tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=lm.device)


# --- attention ----------------------------------------------------------------------------------------------

def attention_map(lm: LoadedModel, ids: Sequence[int], layer: int) -> np.ndarray:
    """Attention probabilities of decoder layer `layer` over `ids`: float32 [num_heads, q_len, k_len].

    One forward runs up to that layer's attention, where a pre-hook takes its inputs and stops the pass; the
    weights are then recomputed eagerly with the layer's own projections and the modeling module's own
    `apply_rotary_pos_emb` / `repeat_kv`. Covers Llama-like attention (incl. Qwen3's q/k norms and sliding
    windows); logit soft-capping or attention sinks of other families are not modelled.
    """
    tokens = lm.check_ids(ids)
    layers = _decoder_layers(lm)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"model {lm.spec.name}: layer {layer!r} is out of range (0..{len(layers) - 1})")
    attn = layers[layer].self_attn
    captured: dict[str, object] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Decoder layers call self_attn with keywords; positional is a fallback for other code paths.
        captured["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["position_embeddings"] = kwargs.get("position_embeddings")
        raise _Captured

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            lm.model(input_ids=_input(lm, tokens), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden_states" not in captured:
        raise RuntimeError(f"model {lm.spec.name}: layer {layer} attention was never called")
    with torch.inference_mode():
        own = getattr(attn, "eager_attention_probs", None)  # models of qdemo's own (ALiBi) say it themselves
        if own is not None:
            probs = own(captured["hidden_states"])
        else:
            probs = _eager_probs(lm, attn, captured["hidden_states"], captured["position_embeddings"])
    return probs[0].float().cpu().numpy()


def attention_maps(lm: LoadedModel, ids: Sequence[int], lock: StepLock = nullcontext, *,
                   should_stop: ShouldStop | None = None) -> np.ndarray:
    """Attention probabilities of every decoder layer over `ids` from ONE forward: float16
    [layers, num_heads, q_len, k_len]. Pre-hooks take each layer's attention inputs as the pass goes by; the
    weights are then recomputed eagerly per layer exactly as `attention_map` does for one. Cheap to keep for a
    short context (128 tokens × 24 layers × 14 heads ≈ 11 MB), so layer and head changes need no forward.
    `should_stop` is read before the forward and before each layer (of the pass and of the recomputation); a stop
    raises Interrupted (the maps are all or nothing). The forward and the recomputation are one turn at `lock`."""
    tokens = lm.check_ids(ids)
    layers = _decoder_layers(lm)
    what = f"model {lm.spec.name}: attention maps"
    captured: list[dict[str, object]] = [{} for _ in layers]

    def grabber(index: int):
        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured[index]["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[index]["position_embeddings"] = kwargs.get("position_embeddings")
        return grab

    check_clock(should_stop, Cut("", 0, len(layers), "layers"), what)
    with lock():  # the hooks exist only inside this turn: other users' steps on the model never see them
        handles = [layer.self_attn.register_forward_pre_hook(grabber(i), with_kwargs=True)
                   for i, layer in enumerate(layers)]
        try:
            with torch.inference_mode(), layer_clock(layers, should_stop, what):
                lm.model.model(input_ids=_input(lm, tokens), use_cache=False)  # no lm_head: only attention
        finally:
            for handle in handles:
                handle.remove()
        return _recomputed(lm, layers, captured, should_stop, what)


def _recomputed(lm: LoadedModel, layers: torch.nn.ModuleList, captured: list[dict[str, object]],
                should_stop: ShouldStop | None, what: str) -> np.ndarray:
    """Every layer's attention probabilities, recomputed eagerly from the inputs its pre-hook took."""
    maps = []
    with torch.inference_mode():
        for index, layer in enumerate(layers):
            if "hidden_states" not in captured[index]:
                raise RuntimeError(f"model {lm.spec.name}: layer {index} attention was never called")
            check_clock(should_stop, Cut("", index, len(layers), "layers"), what)
            attn = layer.self_attn
            own = getattr(attn, "eager_attention_probs", None)
            if own is not None:
                probs = own(captured[index]["hidden_states"])
            else:
                probs = _eager_probs(lm, attn, captured[index]["hidden_states"],
                                     captured[index]["position_embeddings"])
            maps.append(probs[0].to(torch.float16).cpu().numpy())
    return np.stack(maps)


def _eager_probs(lm: LoadedModel, attn: torch.nn.Module, hidden: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    # The attention class's own module holds the helpers it uses; any Llama-like family defines the same two.
    modeling = sys.modules[type(attn).__module__]
    batch, q_len = hidden.shape[:2]
    shape = (batch, q_len, -1, attn.head_dim)
    query = attn.q_proj(hidden).view(shape)
    key = attn.k_proj(hidden).view(shape)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 / OLMo-style per-head norms before RoPE
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    if position_embeddings is None:  # layers that rotate internally: ask the shared rotary module
        positions = torch.arange(q_len, device=hidden.device)[None]
        position_embeddings = lm.model.model.rotary_emb(hidden, positions)
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    key = modeling.repeat_kv(key, attn.num_key_value_groups)
    # fp32 scores: in bf16 the small probabilities a heatmap shows would be mostly rounding.
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * attn.scaling
    # Our own mask: with sdpa the layer often gets None (causality is a kernel flag), and one unpadded
    # sequence needs nothing beyond causal (+ the layer's sliding window, if any).
    pos = torch.arange(q_len, device=hidden.device)
    allowed = pos[None, :] <= pos[:, None]
    window = getattr(attn, "sliding_window", None)
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def mean_over_heads(weights: np.ndarray) -> np.ndarray:
    """[heads, q, k] → [q, k], the head-averaged map."""
    arr = np.asarray(weights)
    if arr.ndim != 3:
        raise ValueError(f"attention weights must be [heads, q_len, k_len], got shape {arr.shape}")
    return arr.mean(axis=0, dtype=np.float64).astype(np.float32)


# --- RoPE ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RopeInfo:
    theta: float | None
    head_dim: int
    inv_freq: np.ndarray  # [rotary_dim / 2], as the model's rotary module holds it
    wavelengths: np.ndarray  # tokens per full turn of each pair: 2π / inv_freq
    attention_scaling: float  # multiplies cos/sin (YaRN-style); 1.0 for plain RoPE
    rope_type: str
    scaling: dict | None  # the rope parameters beyond theta/type (factor, original length, ...); None if plain


def _rope_params(config: object) -> dict:
    # transformers 5 folds rope_theta and rope_scaling into config.rope_parameters (config.rope_theta is gone);
    # families with per-layer-type RoPE nest one dict per layer type.
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    params = dict(params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta  # older config classes
    return params


def _rotary(lm: LoadedModel) -> torch.nn.Module:
    rotary = getattr(getattr(lm.model, "model", None), "rotary_emb", None)
    if rotary is None or getattr(rotary, "inv_freq", None) is None:
        raise ValueError(f"model {lm.spec.name} uses no RoPE (no rotary embedding module)")
    return rotary


def _head_dim(config: object) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_info(lm: LoadedModel) -> RopeInfo:
    rotary = _rotary(lm)
    params = _rope_params(lm.model.config)
    rope_type = str(getattr(rotary, "rope_type", None) or params.get("rope_type", "default"))
    extra = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy().astype(np.float64)
    theta = params.get("rope_theta")
    return RopeInfo(
        theta=float(theta) if theta is not None else None,
        head_dim=_head_dim(lm.model.config),
        inv_freq=inv_freq,
        wavelengths=2.0 * np.pi / inv_freq,
        attention_scaling=float(rotary.attention_scaling),
        rope_type=rope_type,
        scaling=extra if (rope_type != "default" or extra) else None,
    )


def _angles(rotary: torch.nn.Module, positions: int) -> torch.Tensor:
    # Same fp32 product as the rotary module's forward, so the angles are the ones the model uses. Dynamic
    # RoPE types rescale inv_freq during long forwards; this reads the buffer as it is now, with no forward.
    pos = torch.arange(positions, dtype=torch.float32)
    return pos[:, None] * rotary.inv_freq.detach().float().cpu()[None, :]


def _check_count(lm: LoadedModel, what: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model {lm.spec.name}: {what} must be an integer >= {minimum}, got {value!r}")


def rope_angles(lm: LoadedModel, positions: int) -> np.ndarray:
    """Rotation angle (radians, not wrapped) of each frequency pair at positions 0..positions-1:
    float32 [positions, rotary_dim / 2] = position × inv_freq."""
    _check_count(lm, "positions", positions, 1)
    return _angles(_rotary(lm), positions).numpy()


def rope_decay(lm: LoadedModel, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """RoFormer's long-term decay: for d in 0..max_distance, (1 / (D/2)) Σ_i cos(d · inv_freq_i), i.e. the dot
    product of an all-ones query rotated to position d with an all-ones key at 0, over D; 1 at d = 0.
    attention_scaling would scale every score by its square alike, so it is left out."""
    _check_count(lm, "max_distance", max_distance, 0)
    angles = _angles(_rotary(lm), max_distance + 1).double()
    return np.arange(max_distance + 1), torch.cos(angles).mean(dim=-1).numpy()


# --- ALiBi --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlibiInfo:
    slopes: np.ndarray  # [heads], the per-head slope m_h
    bias: np.ndarray  # [heads, positions, positions]: m_h·(key − query) on and below the diagonal, NaN above


def alibi_info(lm: LoadedModel, positions: int) -> AlibiInfo:
    """ALiBi slopes as the loaded model holds them, and the bias each head adds to its attention scores over
    `positions` tokens (relative form; the original's per-row constant shift changes no probability)."""
    slopes_fn = getattr(lm.model, "alibi_slopes", None)
    if slopes_fn is None:
        raise ValueError(f"model {lm.spec.name} uses no ALiBi (it has no alibi_slopes)")
    _check_count(lm, "positions", positions, 1)
    slopes = slopes_fn().detach().float().cpu().numpy().astype(np.float64)
    pos = np.arange(positions)
    distance = (pos[None, :] - pos[:, None]).astype(np.float64)
    bias = slopes[:, None, None] * distance[None]
    bias[:, distance > 0] = np.nan  # masked: a query never sees later keys
    return AlibiInfo(slopes=slopes, bias=bias)


# --- model card & logits ------------------------------------------------------------------------------------

def model_card(lm: LoadedModel) -> dict[str, object]:
    config = lm.model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    theta = _rope_params(config).get("rope_theta")
    # parameters() yields each Parameter once, so tied embeddings / lm_head count once.
    parameters = sum(p.numel() for p in lm.model.parameters())
    weight_bytes = lm.weight_bytes or sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return {
        "model": lm.spec.name,
        "family": lm.family.name,
        "architecture": type(lm.model).__name__,
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "attention_heads": heads,
        "kv_heads": kv_heads,
        "gqa_ratio": heads // kv_heads,
        "head_dim": _head_dim(config),
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": int(config.max_position_embeddings),
        "position_encoding": lm.family.position_encoding,
        "rope_theta": float(theta) if theta is not None and lm.family.position_encoding == "rope" else None,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "parameters": int(parameters),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "weight_bytes": int(weight_bytes),
        "context": lm.max_context,
    }


def next_token_logits(lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    """fp32 [vocab] logits for the token after `ids`, on the CPU (one forward, only the last position's head)."""
    tokens = lm.check_ids(ids)
    with torch.inference_mode():
        out = lm.model(input_ids=_input(lm, tokens), use_cache=False, logits_to_keep=1)
        logits = out.logits[0, -1].float().cpu()
    # Cloned outside inference mode: callers get an ordinary tensor they may modify in place.
    return logits.clone()
