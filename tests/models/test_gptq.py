"""Qwen v1 Int4 (GPTQ): a tiny checkpoint packed by hand from known integer weights, zeros and scales, in the
layout AutoGPTQ wrote for Qwen-7B-Chat-Int4. The packing and unpacking here are written from the format
description (qweight packed along the input dim, qzeros along the output dim, stored zero − 1), independently of
qdemo, so "dequantize(split tensors) == rows of the known weight" checks the split, not the code against itself.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from qdemo.errors import SourceError
from qdemo.models import sources
from qdemo.models.families.gptq import split_gptq_linear
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from tests.family_checkpoints import INTERMEDIATE, LAYERS, read_state, registry_entry, write_checkpoint

# torch's CPU int4 kernel (what gptqmodel runs here) takes groups of 32, 64, 128 or 256, so the Int4 model is
# 64 wide rather than the other families' 48.
BITS, GROUP, HIDDEN = 4, 32, 64
PER_WORD = 32 // BITS


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[in, out] ints in 0..15 → int32 [in / 8, out]: 8 consecutive input rows per word, lowest bits first."""
    q = q.to(torch.int64).reshape(q.shape[0] // PER_WORD, PER_WORD, q.shape[1])
    return _int32(sum(q[:, j, :] << (BITS * j) for j in range(PER_WORD)))


def pack_cols(z: torch.Tensor) -> torch.Tensor:
    """[groups, out] ints → int32 [groups, out / 8]: 8 consecutive output columns per word."""
    z = z.to(torch.int64).reshape(z.shape[0], z.shape[1] // PER_WORD, PER_WORD)
    return _int32(sum(z[:, :, j] << (BITS * j) for j in range(PER_WORD)))


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) as the int32 tensors the checkpoint stores (two's complement)."""
    return (words - (words >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (BITS * j)) & 0xF for j in range(PER_WORD)]
    return torch.stack(parts, 1).reshape(words.shape[0] * PER_WORD, words.shape[1])


def unpack_cols(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (BITS * j)) & 0xF for j in range(PER_WORD)]
    return torch.stack(parts, 2).reshape(words.shape[0], words.shape[1] * PER_WORD)


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """GPTQ "gptq" format → dense [out, in] as nn.Linear holds it: scale × (q − (stored zero + 1))."""
    q = unpack_rows(t["qweight"])  # [in, out]
    zeros = unpack_cols(t["qzeros"]) + 1  # [groups, out]
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (q - zeros[g]).float()).T


def quantized_linear(out_features: int, in_features: int, gen: torch.Generator, bias: bool = False
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random GPTQ tensors and the dense weight they stand for."""
    groups = in_features // GROUP
    q = torch.randint(0, 16, (in_features, out_features), generator=gen)
    zeros = torch.randint(1, 16, (groups, out_features), generator=gen)  # stored as zero − 1, so zero ≥ 1
    scales = (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(in_features, dtype=torch.int32) // GROUP
    tensors = {"qweight": pack_rows(q), "qzeros": pack_cols(zeros - 1), "scales": scales, "g_idx": g_idx}
    if bias:
        tensors["bias"] = (torch.randn(out_features, generator=gen) * 0.1).half()
    dense = (scales.float()[g_idx.long()] * (q - zeros[g_idx.long()]).float()).T
    return tensors, dense


def test_hand_packing_round_trips():
    gen = torch.Generator().manual_seed(0)
    tensors, dense = quantized_linear(24, 64, gen)
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (8, 24)
    assert tensors["qzeros"].shape == (2, 3)
    torch.testing.assert_close(dequantize(tensors), dense, rtol=0, atol=0)


def test_split_is_exact_on_packed_tensors():
    gen = torch.Generator().manual_seed(1)
    tensors, dense = quantized_linear(3 * 16, 64, gen, bias=True)
    pieces = split_gptq_linear(tensors, [16, 16, 16], bits=4)
    for i, piece in enumerate(pieces):
        assert set(piece) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
        torch.testing.assert_close(dequantize(piece), dense[16 * i:16 * (i + 1)], rtol=0, atol=0)
        assert torch.equal(piece["bias"], tensors["bias"][16 * i:16 * (i + 1)])
        assert torch.equal(piece["g_idx"], tensors["g_idx"])


def test_split_refuses_what_it_cannot_do_exactly():
    gen = torch.Generator().manual_seed(2)
    tensors, _ = quantized_linear(24, 64, gen)
    with pytest.raises(ValueError, match="word boundary"):
        split_gptq_linear(tensors, [12, 12], bits=4)
    with pytest.raises(ValueError, match="bits=3"):
        split_gptq_linear(tensors, [8, 16], bits=3)
    with pytest.raises(ValueError, match="covers 24 output columns, expected 32"):
        split_gptq_linear(tensors, [16, 16], bits=4)
    with pytest.raises(ValueError, match="missing g_idx"):
        split_gptq_linear({k: v for k, v in tensors.items() if k != "g_idx"}, [8, 16], bits=4)


# Qwen v1 module → (Qwen2 module, out, in); c_attn is split into q/k/v below.
_LINEARS = {"attn.c_proj": ("self_attn.o_proj", HIDDEN, HIDDEN), "mlp.w1": ("mlp.up_proj", INTERMEDIATE, HIDDEN),
            "mlp.w2": ("mlp.gate_proj", INTERMEDIATE, HIDDEN), "mlp.c_proj": ("mlp.down_proj", HIDDEN, INTERMEDIATE)}
QUANT_CONFIG = {"bits": BITS, "group_size": GROUP, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
                "sym": False, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}


def write_int4_checkpoint(path, quant_in_config: bool = False):
    """The dense tiny Qwen v1 checkpoint with every block Linear replaced by GPTQ tensors, as in the Int4 release.
    Returns (path, the dense state the GPTQ tensors stand for)."""
    from safetensors.torch import save_file

    write_checkpoint(path, "qwen", hidden=HIDDEN)
    dense = read_state(path)
    for shard in path.glob("*.safetensors"):
        shard.unlink()
    gen = torch.Generator().manual_seed(7)
    packed = {k: v for k, v in dense.items() if ".attn." not in k and ".mlp." not in k}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        tensors, weight = quantized_linear(3 * HIDDEN, HIDDEN, gen, bias=True)
        packed.update({f"{p}attn.c_attn.{k}": v for k, v in tensors.items()})
        dense[f"{p}attn.c_attn.weight"], dense[f"{p}attn.c_attn.bias"] = weight, tensors["bias"].float()
        for module, (_, out_features, in_features) in _LINEARS.items():
            tensors, weight = quantized_linear(out_features, in_features, gen)
            packed.update({f"{p}{module}.{k}": v for k, v in tensors.items()})
            dense[f"{p}{module}.weight"] = weight
    save_file(packed, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config.update(fp16=True, fp32=False)
    if quant_in_config:
        config["quantization_config"] = {**QUANT_CONFIG, "quant_method": "gptq"}
    else:  # as AutoGPTQ saved it: beside config.json
        (path / "quantize_config.json").write_text(json.dumps(QUANT_CONFIG))
    (path / "config.json").write_text(json.dumps(config))
    return path, dense


@pytest.fixture
def int4_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "cache"))
    src, dense = write_int4_checkpoint(tmp_path / "qwen-int4")
    registry_path = tmp_path / "models.yaml"
    registry_path.write_text("models:\n" + registry_entry("tiny-qwen-int4", "qwen", src), encoding="utf-8")
    return load_registry(registry_path).get("tiny-qwen-int4"), dense


def test_int4_checkpoint_converts_with_tensors_still_packed(int4_spec):
    from safetensors.torch import load_file

    spec, dense = int4_spec
    out = sources.resolve(spec)
    state: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        state.update(load_file(str(shard)))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["group_size"] == GROUP
    for i in range(LAYERS):
        new, old = f"model.layers.{i}.", f"transformer.h.{i}."
        fused = dense[f"{old}attn.c_attn.weight"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            piece = {k: state[f"{new}self_attn.{proj}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
            assert piece["qweight"].dtype == torch.int32  # never dequantized
            rows = slice(j * HIDDEN, (j + 1) * HIDDEN)
            torch.testing.assert_close(dequantize(piece), fused[rows], rtol=0, atol=0)
            torch.testing.assert_close(piece["bias"].float(), dense[f"{old}attn.c_attn.bias"][rows], rtol=0, atol=0)
        for module, (target, _, _) in _LINEARS.items():
            piece = {k: state[f"{new}{target}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            torch.testing.assert_close(dequantize(piece), dense[f"{old}{module}.weight"], rtol=0, atol=0)
        assert not any(k.startswith(f"{new}self_attn.q_proj.weight") for k in state)


def test_quantization_config_inside_config_json_is_used_too(tmp_path, monkeypatch):
    monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "cache"))
    src, _ = write_int4_checkpoint(tmp_path / "q", quant_in_config=True)
    registry_path = tmp_path / "models.yaml"
    registry_path.write_text("models:\n" + registry_entry("int4", "qwen", src), encoding="utf-8")
    out = sources.resolve(load_registry(registry_path).get("int4"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is False


def test_loading_without_the_gptq_packages_names_them_and_the_gpu(int4_spec, monkeypatch):
    spec, _ = int4_spec
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("optimum", "gptqmodel") else real_find_spec(name, *a))
    with pytest.raises(SourceError) as info:
        load_model(spec, device="cpu")
    message = str(info.value)
    assert "tiny-qwen-int4" in message and "GPTQ" in message
    assert "optimum and gptqmodel" in message and "requirements-gptq.txt" in message
    assert "CUDA GPU" in message


def test_int4_runs_through_transformers_gptq_path(int4_spec):
    """Where optimum + gptqmodel are installed (requirements-gptq.txt), the converted checkpoint loads through
    transformers' GPTQ support and its logits match the reference forward on the weights the tensors encode."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from tests.family_checkpoints import reference_logits

    spec, dense = int4_spec
    lm = load_model(spec, device="cpu")
    ids = [5, 17, 42, 99, 7, 250, 3, 64]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = reference_logits(dense, "qwen", ids)
    assert (logits - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
