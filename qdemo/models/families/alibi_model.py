"""A native transformers model for Baichuan-13B / Baichuan2-13B: a Llama-shaped decoder with ALiBi instead of RoPE.

The checkpoint conversion (W_pack split into q/k/v, NormHead normalised once, config mapping) writes this format;
after `import qdemo.models.families.alibi_model`, AutoConfig / AutoModelForCausalLM load it without remote code.

Module names follow Llama (`model.embed_tokens`, `model.layers[i].self_attn.q_proj`, `.mlp.gate_proj`,
`.input_layernorm`, `model.norm`, `lm_head`) so tooling written for Llama-like models finds them.

Position information is only the ALiBi bias `slope_h × (key_pos − query_pos)` added to the attention scores.
The original code adds `slope_h × key_pos` (a per-row constant away from this); softmax ignores per-row constants,
and the relative form keeps the bias small near the diagonal, where bf16/fp16 rounding would hurt most.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.utils.deprecation import deprecate_kwarg

MODEL_TYPE = "baichuan_alibi"

# Bias rows are built in head chunks whose fp32 scratch stays under this, so a long prefill never holds a second,
# fp32 copy of the [heads, q, k] bias next to the one in the model's dtype.
_BIAS_SCRATCH_BYTES = 64 * 2**20


# --- ALiBi slopes -------------------------------------------------------------------------------------------

def _slope_values(num_heads: int) -> list[float]:
    """ALiBi slopes as Python floats, in the order the heads use them (Baichuan's `_get_interleave`)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be an integer >= 1, got {num_heads!r}")
    if num_heads & (num_heads - 1) == 0:  # a power of two: a geometric series start^1 … start^n
        start = 2.0 ** (-(2.0 ** -(math.log2(num_heads) - 3)))
        return [start * start**i for i in range(num_heads)]
    # Otherwise the closest lower power of two p, then every other slope of 2p for the remaining heads.
    lower = 2 ** math.floor(math.log2(num_heads))
    return _slope_values(lower) + _slope_values(2 * lower)[0::2][: num_heads - lower]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """fp32 [num_heads] ALiBi slopes (on the CPU)."""
    return torch.tensor(_slope_values(num_heads), dtype=torch.float32, device="cpu")


class _SlopeCache:
    """Slopes of one model, kept as Python floats and materialised once per device.

    Not a buffer: transformers builds models on the meta device and would leave a non-persistent buffer empty.
    """

    def __init__(self, num_heads: int) -> None:
        self.values = tuple(_slope_values(num_heads))
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        tensor = self._by_device.get(device)
        if tensor is None:
            # An ordinary tensor even when first asked for under inference_mode, so later autograd use is fine.
            with torch.inference_mode(False):
                tensor = torch.tensor(self.values, dtype=torch.float32, device=device)
            self._by_device[device] = tensor
        return tensor


def _alibi_bias(
    slopes: torch.Tensor, q_len: int, kv_len: int, past_len: int, key_mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive attention bias [batch or 1, heads, q_len, kv_len] in `dtype`.

    Allowed entries hold slope × (key_pos − query_pos), with absolute positions (the queries sit at
    past_len … past_len + q_len − 1), so the bias stays right while decoding with a KV cache. Masked entries hold
    the dtype's most negative finite value rather than −inf: a row with no real key (a left-padding query) then
    stays finite instead of turning into NaN that would leak into later layers. Each query may always see itself,
    which changes nothing for real tokens and gives padding rows one finite entry.
    """
    device = slopes.device
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    distance = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)  # [q, kv], <= 0 where causal
    allowed = (distance <= 0)[None, None]  # [1, 1, q, kv]
    if key_mask is not None:
        allowed = allowed & (key_mask | (distance == 0))
    heads = slopes.shape[0]
    bias = torch.empty((allowed.shape[0], heads, q_len, kv_len), dtype=dtype, device=device)
    floor = torch.finfo(dtype).min
    chunk = max(1, _BIAS_SCRATCH_BYTES // max(1, 4 * q_len * kv_len))
    for h0 in range(0, heads, chunk):
        h1 = min(heads, h0 + chunk)
        # fp32 product, then one rounding to dtype.
        values = (slopes[h0:h1, None, None] * distance[None]).to(dtype)  # [c, q, kv]
        bias[:, h0:h1] = torch.where(allowed, values[None], floor)
    return bias


def _key_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> torch.Tensor | None:
    """The caller's mask as bool, broadcastable to [batch, 1, q_len, kv_len] (True = may attend), or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape[0] != batch or attention_mask.shape[1] > kv_len:
            raise ValueError(f"{MODEL_TYPE}: attention_mask of shape {tuple(attention_mask.shape)} does not fit "
                             f"batch {batch} and {kv_len} key positions (cached + new)")
        mask = attention_mask.bool()
        if mask.shape[1] < kv_len:  # a static cache's unwritten slots: causality masks them anyway
            mask = F.pad(mask, (0, kv_len - mask.shape[1]), value=True)
        return mask[:, None, None, :]
    if attention_mask.dim() == 4:
        if tuple(attention_mask.shape[-2:]) != (q_len, kv_len) or attention_mask.shape[0] not in (1, batch):
            raise ValueError(f"{MODEL_TYPE}: 4D attention_mask of shape {tuple(attention_mask.shape)} does not "
                             f"fit [batch {batch}, 1, {q_len}, {kv_len}]")
        # bool: True attends; float: additive, 0 attends.
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask[:, :1]
    raise ValueError(f"{MODEL_TYPE}: attention_mask must be 2D [batch, keys] or 4D, got {attention_mask.dim()}D")


def _eager_probs(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 attention probabilities [batch, heads, q, kv] from q/k [batch, heads, len, head_dim].

    Scores are computed in fp32 whatever the model dtype: the same numbers serve the forward's eager path and
    `eager_attention_probs`, and small probabilities in a heatmap are not bf16 rounding."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    return torch.softmax(scores + bias.float(), dim=-1, dtype=torch.float32)


# --- config -------------------------------------------------------------------------------------------------

@strict
class BaichuanAlibiConfig(PreTrainedConfig):
    """Baichuan-13B / Baichuan2-13B. Defaults are Baichuan2-13B's (Baichuan-13B: vocab_size 64000)."""

    model_type = MODEL_TYPE

    vocab_size: int = 125696
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096  # the original's model_max_length
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    mlp_bias: bool = False  # read by LlamaMLP; Baichuan's MLP has no bias

    def validate_architecture(self):
        """Part of `@strict` validation."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"{MODEL_TYPE}: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")


# --- modules ------------------------------------------------------------------------------------------------

class BaichuanAlibiAttention(nn.Module):
    """Multi-head attention (no GQA, no bias) with the ALiBi bias given by the model body."""

    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1  # for tools that expect the Llama attribute
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        self._slopes = _SlopeCache(self.num_heads)

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (*hidden_states.shape[:2], self.num_heads, self.head_dim)
        return tuple(proj(hidden_states).view(shape).transpose(1, 2)
                     for proj in (self.q_proj, self.k_proj, self.v_proj))

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor, cache: Cache | None = None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """attention_bias: [batch or 1, heads, q, kv] from `_alibi_bias` (fp32 when eager, else the query dtype).
        Returns the output and, when eager, the fp32 probabilities."""
        batch, q_len = hidden_states.shape[:2]
        query, key, value = self._project(hidden_states)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if key.shape[2] != attention_bias.shape[-1]:
            raise RuntimeError(f"{MODEL_TYPE} layer {self.layer_idx}: the cache holds {key.shape[2]} key positions "
                               f"but the bias covers {attention_bias.shape[-1]} (a cache from another sequence?)")
        if eager:
            probs = _eager_probs(query, key, attention_bias, self.scaling)
            out = torch.matmul(probs.to(value.dtype), value)
        else:
            probs = None
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias.to(query.dtype),
                                                 scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, q_len, -1)
        return self.o_proj(out), probs

    def eager_attention_probs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fp32 [batch, heads, q, q] probabilities over a full, uncached sequence, given this module's input
        (the layer's hidden states after input_layernorm), with the eager path's numbers."""
        q_len = hidden_states.shape[1]
        query, key, _ = self._project(hidden_states)
        bias = _alibi_bias(self._slopes.on(hidden_states.device), q_len, q_len, 0, None, torch.float32)
        return _eager_probs(query, key, bias, self.scaling)

    def alibi_slopes(self) -> torch.Tensor:
        return alibi_slopes(self.num_heads)


class BaichuanAlibiDecoderLayer(nn.Module):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor, cache: Cache | None = None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Keyword call: forward pre-hooks (qdemo.probes.introspect) read kwargs["hidden_states"].
        attn_out, probs = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                         attention_bias=attention_bias, cache=cache, eager=eager)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs


class BaichuanAlibiPreTrainedModel(PreTrainedModel):
    config: BaichuanAlibiConfig
    config_class = BaichuanAlibiConfig
    base_model_prefix = "model"
    _no_split_modules = ["BaichuanAlibiDecoderLayer"]
    _supports_sdpa = True  # the default path; "eager" (or output_attentions) uses the fp32 eager path


class BaichuanAlibiModel(BaichuanAlibiPreTrainedModel):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__(config)
        pad = config.pad_token_id
        self.padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._slopes = _SlopeCache(config.num_attention_heads)
        self.post_init()

    def alibi_slopes(self) -> torch.Tensor:
        """fp32 [heads] slopes, on the CPU."""
        return alibi_slopes(self.config.num_attention_heads)

    def _uses_eager(self, output_attentions: bool) -> bool:
        return output_attentions or getattr(self.config, "_attn_implementation", None) == "eager"

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """position_ids are accepted for API compatibility and not used: ALiBi needs only key − query distances,
        taken from the cache length, and left padding shifts both alike."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{MODEL_TYPE}: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        output_attentions = bool(output_attentions if output_attentions is not None
                                 else self.config.output_attentions)
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        batch, q_len = inputs_embeds.shape[:2]
        past_len, kv_len = 0, q_len
        if cache is not None:
            past_len = cache.get_seq_length()
            kv_len, kv_offset = cache.get_mask_sizes(q_len, 0)
            if kv_offset:
                raise ValueError(f"{MODEL_TYPE}: sliding-window caches are not supported (offset {kv_offset})")
        eager = self._uses_eager(output_attentions)
        bias = _alibi_bias(self._slopes.on(inputs_embeds.device), q_len, kv_len, past_len,
                           _key_mask(attention_mask, batch, q_len, kv_len),
                           torch.float32 if eager else inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, probs = layer(hidden_states, attention_bias=bias, cache=cache, eager=eager)
            if output_attentions:
                all_attn.append(probs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)  # the last entry is after the final norm, as in Llama

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


class BaichuanAlibiForCausalLM(BaichuanAlibiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only when tie_word_embeddings

    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__(config)
        self.model = BaichuanAlibiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def alibi_slopes(self) -> torch.Tensor:
        """fp32 [heads] slopes, on the CPU."""
        return self.model.alibi_slopes()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if use_dict else out.to_tuple()


# --- registration -------------------------------------------------------------------------------------------

def register() -> None:
    """Make AutoConfig / AutoModel / AutoModelForCausalLM know `baichuan_alibi` (safe to call again)."""
    AutoConfig.register(MODEL_TYPE, BaichuanAlibiConfig, exist_ok=True)
    AutoModel.register(BaichuanAlibiConfig, BaichuanAlibiModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanAlibiConfig, BaichuanAlibiForCausalLM, exist_ok=True)


register()
