"""The native Baichuan-13B / Baichuan2-13B model class (ALiBi, no RoPE) against an oracle written here.

The oracle follows shared/model-facts.md, not the class: slopes from a closed form, and a float64 forward on the
state dict with the ORIGINAL bias form slope·(key − last_pos) over the full square plus a −inf causal mask.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import qdemo.models.families.alibi_model as am

VOCAB, HIDDEN, FFN, LAYERS, HEADS = 97, 48, 80, 3, 6  # 6 heads: not a power of two
EOS = 2


# --- oracle -------------------------------------------------------------------------------------------------

def closed_form_slopes(n: int) -> torch.Tensor:
    """2^(-8i/p) for i = 1..p (p the largest power of two <= n), then the odd powers of 2p's ratio
    2^(-8(2j+1)/(2p)) for the n − p heads left (every other slope of the 2p series)."""
    p = 2 ** int(math.floor(math.log2(n)))
    values = [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)]
    values += [2.0 ** (-8.0 * (2 * j + 1) / (2 * p)) for j in range(n - p)]
    return torch.tensor(values, dtype=torch.float64)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference(state: dict[str, torch.Tensor], ids: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 logits [T, vocab] and per-layer probabilities [heads, T, T] of one unpadded sequence."""
    sd = {k: v.double() for k, v in state.items()}
    eps, n, d = 1e-6, HEADS, HIDDEN // HEADS
    t = len(ids)
    pos = torch.arange(t, dtype=torch.float64)
    # Original form: the same key-position bias on every row, shifted by the last position; causal −inf on top.
    bias = closed_form_slopes(n)[:, None, None] * (pos[None, None, :] - (t - 1))
    causal = torch.triu(torch.full((t, t), float("-inf"), dtype=torch.float64), diagonal=1)
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    probs_per_layer = []
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = ((h @ sd[p + f"self_attn.{name}.weight"].T).view(t, n, d).transpose(0, 1)
                   for name in ("q_proj", "k_proj", "v_proj"))
        scores = q @ k.transpose(1, 2) / math.sqrt(d) + bias + causal
        probs = torch.softmax(scores, dim=-1)
        probs_per_layer.append(probs)
        attn = (probs @ v).transpose(0, 1).reshape(t, n * d)
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], eps)
    return x @ sd["lm_head.weight"].T, probs_per_layer


def reference_greedy(state: dict[str, torch.Tensor], ids: list[int], new_tokens: int) -> list[int]:
    seq = list(ids)
    for _ in range(new_tokens):
        token = int(reference(state, seq)[0][-1].argmax())
        seq.append(token)
        if token == EOS:
            break
    return seq[len(ids):]


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> am.BaichuanAlibiForCausalLM:
    config = am.BaichuanAlibiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    torch.manual_seed(0)
    lm = am.BaichuanAlibiForCausalLM(config).eval()
    with torch.no_grad():
        # Default init gives near-uniform attention and logits: spread them so every term shows in the output.
        for name, param in lm.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name:
                param.mul_(12.0)
            elif name == "lm_head.weight":
                param.mul_(30.0)
    return lm


@pytest.fixture(scope="module")
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


PROMPT = [5, 17, 42, 8, 63, 29, 11, 90, 33, 71, 4, 56]


# --- slopes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 6, 8, 12, 40])
def test_slopes_match_closed_form(heads):
    got = am.alibi_slopes(heads)
    assert got.dtype == torch.float32 and got.shape == (heads,)
    torch.testing.assert_close(got, closed_form_slopes(heads).float(), rtol=1e-6, atol=0)


def test_slopes_for_40_heads_spot_values():
    got = am.alibi_slopes(40)
    # First block: 2^(-i/4); then 64-head slopes 1, 3, 5, … : 2^(-1/8), 2^(-3/8), …
    assert got[0].item() == pytest.approx(2 ** -0.25)
    assert got[31].item() == pytest.approx(2 ** -8)
    assert got[32].item() == pytest.approx(2 ** -0.125)
    assert got[39].item() == pytest.approx(2 ** (-15 / 8))


def test_slopes_reject_bad_head_counts():
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="num_heads"):
            am.alibi_slopes(bad)


def test_model_exposes_slopes(model):
    torch.testing.assert_close(model.alibi_slopes(), closed_form_slopes(HEADS).float(), rtol=1e-6, atol=0)


# --- 1. full forward against the oracle ---------------------------------------------------------------------

def test_llama_like_module_names(state, model):
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    assert set(state) == expected  # no biases, no rotary buffers
    assert len(model.model.layers) == LAYERS


@pytest.mark.parametrize("use_cache", [True, False])
def test_forward_matches_reference(model, state, use_cache):
    want, _ = reference(state, PROMPT)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([PROMPT]), use_cache=use_cache)
    assert (out.cache is not None) == use_cache
    assert (out.logits[0].double() - want).abs().max().item() <= 1e-4
    assert want.std().item() > 1.0  # logits spread enough for the comparison to mean something


def test_logits_to_keep(model, state):
    want, _ = reference(state, PROMPT)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([PROMPT]), use_cache=False, logits_to_keep=3)
    assert out.logits.shape == (1, 3, VOCAB)
    assert (out.logits[0].double() - want[-3:]).abs().max().item() <= 1e-4


def test_shifted_bias_form_is_what_softmax_sees():
    """The class's relative bias and the original's key-position bias differ by one constant per row."""
    slopes = am.alibi_slopes(HEADS)
    bias = am._alibi_bias(slopes, 5, 5, 0, None, torch.float32)[0].double()
    scores = torch.randn(HEADS, 5, 5, dtype=torch.float64)
    original = closed_form_slopes(HEADS)[:, None, None] * torch.arange(5.0, dtype=torch.float64)[None, None, :]
    causal = torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), diagonal=1)
    torch.testing.assert_close(torch.softmax(scores + bias, -1), torch.softmax(scores + original + causal, -1))


# --- 2. KV-cache decoding -----------------------------------------------------------------------------------

def test_cached_decoding_as_the_engine_calls_it(model, state):
    """Prefill in chunks, then 5 single tokens through the engine's own primitives (qdemo.core.decode), left-padded
    batches included: the ALiBi class takes the engine's mask, positions and cache."""
    from types import SimpleNamespace

    from qdemo.core.decode import decode_step, new_state, prefill
    from qdemo.models.step_costs import StepCosts

    lm = SimpleNamespace(model=model, device=torch.device("cpu"), spec=SimpleNamespace(name="alibi"), key="alibi",
                         runner=None, step_costs=StepCosts())
    start = 7
    total = start + 5
    decode = new_state(lm)
    logits, _ = prefill(lm, decode, [PROMPT[:start]], contextlib.nullcontext, chunk=3)
    got = [logits[0]]
    for length in range(start, total - 1):
        got.append(decode_step(lm, decode, [PROMPT[length]], contextlib.nullcontext)[0])
    assert decode.cache.get_seq_length() == total - 1
    want, _ = reference(state, PROMPT[:total])
    for step, logits in enumerate(got):
        assert (logits.double() - want[start - 1 + step]).abs().max().item() <= 1e-4, step
    padded = new_state(lm, rows=2)
    batch, _ = prefill(lm, padded, [PROMPT[:start], PROMPT[2:start]], contextlib.nullcontext, chunk=4)
    assert (batch[0].double() - want[start - 1]).abs().max().item() <= 1e-4
    short, _ = reference(state, PROMPT[2:start])
    assert (batch[1].double() - short[-1]).abs().max().item() <= 1e-4  # the left-padded row sees only its own


def test_cached_decoding_equals_full_forward(model):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0]
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids[:, :6], cache=cache, use_cache=True)
        rows = [out.logits[0, -1]]
        for i in range(6, 11):
            out = model(input_ids=ids[:, i:i + 1], cache=out.cache, use_cache=True)
            rows.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(rows), full[5:11], rtol=0, atol=1e-5)


# --- 3. generate and attention weights ----------------------------------------------------------------------

def test_greedy_generate_equals_reference_argmax_loop(model, state):
    new = 8
    want = reference_greedy(state, PROMPT[:5], new)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT[:5]]), max_new_tokens=new, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0)
    got = out[0, 5:].tolist()
    assert got == want
    assert len(set(got)) > 1  # not a degenerate repeat of one token


def test_sampled_generate_same_with_and_without_cache(model):
    prompt = torch.tensor([PROMPT[:4]])
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=1.5,
                                       use_cache=use_cache, eos_token_id=EOS, pad_token_id=0)[0].tolist())
    assert runs[0] == runs[1]


def test_output_attentions_match_eager_probs_and_reference(model, state):
    ids = torch.tensor([PROMPT])
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: inputs.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    _, want = reference(state, PROMPT)
    t = len(PROMPT)
    above = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    assert len(out.attentions) == LAYERS
    for i, probs in enumerate(out.attentions):
        assert probs.shape == (1, HEADS, t, t) and probs.dtype == torch.float32
        with torch.no_grad():
            eager = model.model.layers[i].self_attn.eager_attention_probs(inputs[i])
        assert eager.dtype == torch.float32
        torch.testing.assert_close(eager, probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, HEADS, t), rtol=0, atol=1e-5)
        assert (probs[0][:, above] == 0).all()
        assert (probs[0].double() - want[i]).abs().max().item() <= 1e-5
    assert (out.logits[0].double() - reference(state, PROMPT)[0]).abs().max().item() <= 1e-4


def test_eager_implementation_matches_sdpa(model, tmp_path):
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


# --- 4. save / Auto* load -----------------------------------------------------------------------------------

def test_save_and_auto_load_round_trip(model, tmp_path):
    am.register()  # a second registration (the module imported again) is harmless
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "baichuan_alibi"
    assert saved["architectures"] == ["BaichuanAlibiForCausalLM"]
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, am.BaichuanAlibiConfig)
    assert (config.rms_norm_eps, config.max_position_embeddings, config.tie_word_embeddings) == (1e-6, 4096, False)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is am.BaichuanAlibiForCausalLM
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded.alibi_slopes(), model.alibi_slopes())


# --- 5. left padding ----------------------------------------------------------------------------------------

def _left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def test_left_padded_batch_matches_each_sequence_alone(model, state):
    seqs = [PROMPT[:9], PROMPT[3:7]]
    ids, mask = _left_padded(seqs)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        for row, seq in enumerate(seqs):
            alone = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(batch[row], alone, rtol=0, atol=1e-5)
            assert (batch[row].double() - reference(state, seq)[0][-1]).abs().max().item() <= 1e-4
    assert torch.isfinite(batch).all()


def test_left_padded_generate_matches_each_sequence_alone(model):
    seqs = [PROMPT[:9], PROMPT[3:7]]
    ids, mask = _left_padded(seqs)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               eos_token_id=EOS, pad_token_id=0)
        for row, seq in enumerate(seqs):
            alone = model.generate(torch.tensor([seq]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=EOS, pad_token_id=0)[0, len(seq):].tolist()
            assert batch[row, ids.shape[1]:ids.shape[1] + len(alone)].tolist() == alone


def test_bad_attention_mask_is_rejected(model):
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=torch.tensor([PROMPT[:4]]), attention_mask=torch.ones(1, 9, dtype=torch.long))
