"""Every seed family end to end on tiny random checkpoints in the original layouts: converted without remote code,
equal to a reference forward written from model-facts (fp32, ≤ 1e-4), with and without the KV cache, and usable by
the engine, the Compare flow and the Internals tab."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from qdemo.core.engine import collect, generate
from qdemo.core.runs import RunRecord
from qdemo.errors import SourceError
from qdemo.forwards.gate import StepGate
from qdemo.models import sources
from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry
from qdemo.probes.introspect import attention_map, model_card, rope_info
from qdemo.sampling import SamplingParams
from qdemo.services import compare, internals
from qdemo.serving.local import LocalBackend
from tests.family_checkpoints import (
    LAYOUTS,
    heads_for,
    read_state,
    ref_alibi_slopes,
    reference_logits,
    registry_entry,
    write_checkpoint,
    write_family_registry,
)

FAMILIES = list(LAYOUTS)
IDS = [5, 17, 42, 99, 7, 250, 3, 64, 120, 33, 8, 77]


@pytest.fixture(scope="module")
def family_env(tmp_path_factory):
    """All five families: original checkpoints, one registry, a private cache; models loaded once each."""
    root = tmp_path_factory.mktemp("families")
    registry_path = write_family_registry(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QDEMO_CACHE", str(root / "cache"))
        registry = load_registry(registry_path)
        models = {f: load_model(registry.get(f"tiny-{f}"), device="cpu") for f in FAMILIES}
    return {"root": root, "registry": registry, "models": models, "cache": root / "cache"}


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_equals_reference_forward(family_env, family):
    lm = family_env["models"][family]
    ids = IDS
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = reference_logits(read_state(family_env["root"] / family), family, ids)
    assert (logits - expected).abs().max().item() <= 1e-4
    expected_class = {"qwen": "Qwen2ForCausalLM", "baichuan": "LlamaForCausalLM", "baichuan2": "LlamaForCausalLM"}
    assert type(lm.model).__name__ == expected_class.get(family, "BaichuanAlibiForCausalLM")


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_kv_cache_steps_equal_reference(family_env, family):
    """The engine's prefill + cached single-token steps pick, at every step, the reference's argmax over the whole
    sequence so far, and report the reference's probability for it (raw stage)."""
    lm = family_env["models"][family]
    state = read_state(family_env["root"] / family)
    prompt = IDS[:6]
    out = collect(generate(lm, input_ids=prompt, params=SamplingParams(max_new_tokens=6), top_n=5, ignore_eos=True))
    seq = list(prompt)
    for event in out["tokens"]:
        ref = reference_logits(state, family, seq)[-1]
        assert event.token_id == int(ref.argmax())
        raw = event.stages[0]
        assert raw.name == "raw"
        assert raw.chosen_prob == pytest.approx(torch.softmax(ref.double(), -1)[event.token_id].item(), abs=1e-5)
        seq.append(event.token_id)
    assert len(out["tokens"]) == 6 and out["done"].reason == "max_tokens"


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_is_cached_once_and_runs_no_remote_code(family_env, family):
    spec = family_env["registry"].get(f"tiny-{family}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QDEMO_CACHE", str(family_env["cache"]))
        converted = sources.resolve(spec)
        before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
        assert sources.resolve(spec) == converted
        assert sources.cache_state(spec) == "converted"
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before
    assert not list(converted.glob("*.py"))  # nothing of the remote code travels
    config = json.loads((converted / "config.json").read_text())
    assert "auto_map" not in config
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config
    assert json.loads((converted / sources.MARKER).read_text())["family"] == family


def test_a_changed_checkpoint_converts_again(tmp_path, monkeypatch):
    monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "cache"))
    src = write_checkpoint(tmp_path / "b2", "baichuan2")
    registry_path = tmp_path / "models.yaml"
    registry_path.write_text("models:\n" + registry_entry("b2", "baichuan2", src), encoding="utf-8")
    spec = load_registry(registry_path).get("b2")
    first = sources.resolve(spec)
    write_checkpoint(src, "baichuan2", seed=5)  # new weights, same place
    second = sources.resolve(spec)
    assert second != first and (second / sources.MARKER).is_file()


def test_broken_checkpoint_is_a_clear_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "cache"))
    src = write_checkpoint(tmp_path / "b", "baichuan-13b")
    state = read_state(src)
    del state["model.layers.1.mlp.up_proj.weight"]
    for shard in src.glob("*.safetensors"):
        shard.unlink()
    from safetensors.torch import save_file

    save_file(state, str(src / "model.safetensors"))
    registry_path = tmp_path / "models.yaml"
    registry_path.write_text("models:\n" + registry_entry("broken", "baichuan-13b", src), encoding="utf-8")
    with pytest.raises(SourceError, match=r"broken.*missing.*layers\.1\.mlp\.up_proj"):
        load_model(load_registry(registry_path).get("broken"), device="cpu")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_wrong_family_for_a_checkpoint_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "cache"))
    src = write_checkpoint(tmp_path / "q", "qwen")
    registry_path = tmp_path / "models.yaml"
    registry_path.write_text("models:\n" + registry_entry("mislabelled", "baichuan2", src), encoding="utf-8")
    with pytest.raises(SourceError, match=r"mislabelled.*model_type is 'qwen'.*expected 'baichuan'"):
        load_model(load_registry(registry_path).get("mislabelled"), device="cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_through_the_engine(family_env, family):
    """A Chinese and an English chat stream through the family's own prompt format and stop cleanly."""
    lm = family_env["models"][family]
    for text in ("你好，请介绍一下你自己。", "Hello there!"):
        messages = [{"role": "user", "content": text}]
        out = collect(generate(lm, messages=messages, params=SamplingParams(max_new_tokens=8), top_n=3))
        expected_ids, _ = lm.family.build_prompt(lm.tokenizer, messages, lm.spec.max_context - 8)
        assert list(out["prefill"].prompt_ids) == list(expected_ids)
        assert out["done"].reason in ("eos", "stop_token", "max_tokens") and out["done"].error is None
        assert "".join(t.text for t in out["tokens"]) == out["done"].text


def test_stop_event_and_sampling_work_for_alibi(family_env):
    lm = family_env["models"]["baichuan2-13b"]
    stop = threading.Event()
    events = generate(lm, input_ids=IDS[:4], params=SamplingParams(do_sample=True, temperature=0.9, top_k=20,
                                                                    seed=3, max_new_tokens=50),
                      stop_event=stop, ignore_eos=True)
    seen = 0
    for event in events:
        if type(event).__name__ == "TokenEvent":
            seen += 1
            if seen == 3:
                stop.set()
        if type(event).__name__ == "DoneEvent":
            assert event.reason == "stopped" and len(event.token_ids) == 3


@pytest.mark.parametrize("family", ["qwen", "baichuan2-13b"])
def test_compare_flow_same_model_two_settings(family_env, family):
    lm = family_env["models"][family]
    backend = LocalBackend(lm, StepGate())
    messages = [{"role": "user", "content": "Write one line."}]
    greedy = SamplingParams(max_new_tokens=6)
    hot = SamplingParams(do_sample=True, temperature=50.0, seed=11, max_new_tokens=6)  # near uniform: it diverges
    run_a = RunRecord(run_id=1, model=lm.spec.name, settings=greedy.to_dict(), label="A")
    run_b = RunRecord(run_id=2, model=lm.spec.name, settings=hot.to_dict(), label="B")
    for _ in compare.run_pair(backend, backend, messages, greedy, hot, run_a, run_b):
        pass
    assert run_a.done is not None and run_b.done is not None
    report = compare.divergence_report(backend, backend, run_a, run_b, greedy, hot)
    assert report["level"] == "token" and report["step"] is not None
    step = report["step"]
    context = list(run_a.prefill.prompt_ids) + list(run_a.done.token_ids[:step])
    raw = torch.softmax(next_logits(lm, context), -1)
    assert report["a_raw_prob_of_b"] == pytest.approx(float(raw[report["b_token"]]), rel=1e-5)
    assert report["a_prob_of_b"] == pytest.approx(report["a_raw_prob_of_b"], rel=1e-5)  # greedy: no other stage


def next_logits(lm, ids):
    from qdemo.probes.introspect import next_token_logits

    return next_token_logits(lm, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_internals_attention_position_encoding_and_card(family_env, family):
    lm = family_env["models"][family]
    backend = LocalBackend(lm, StepGate())
    history = [{"role": "user", "content": "你好 hello"}, {"role": "assistant", "content": "hi 你好"}]
    ids, _ = internals.conversation_ids(backend, history)
    maps = backend.attention(ids)
    weights = attention_map(lm, ids, 1)
    assert weights.shape == (heads_for(LAYOUTS[family]), len(ids), len(ids))
    np.testing.assert_allclose(maps[1].astype(np.float32), weights, atol=1e-3)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.triu(weights, 1).max() == 0.0
    card = model_card(lm)
    assert card["layers"] == 2 and card["attention_heads"] == heads_for(LAYOUTS[family])
    position = internals.position_view(backend)
    if LAYOUTS[family].alibi:
        assert card["position_encoding"] == "alibi" and card["rope_theta"] is None
        assert "ALiBi" in position.summary
        slopes = np.asarray(position.frequencies.data[0].y, dtype=float)
        np.testing.assert_allclose(slopes, ref_alibi_slopes(heads_for(LAYOUTS[family])), rtol=1e-6)
        with pytest.raises(ValueError, match="no RoPE"):
            rope_info(lm)
    else:
        info = rope_info(lm)
        d = 48 // heads_for(LAYOUTS[family])
        np.testing.assert_allclose(info.inv_freq, 1.0 / 10000.0 ** (np.arange(0, d, 2) / d), rtol=1e-6)
        assert card["position_encoding"] == "rope" and card["rope_theta"] == 10000.0
        assert ("seq_length" in position.summary) == (family == "qwen")


def test_attention_maps_match_the_reference_probabilities(family_env):
    """ALiBi attention weights from the Internals path equal the reference's softmax for layer 0."""
    import math

    lm = family_env["models"]["baichuan-13b"]
    state = read_state(family_env["root"] / "baichuan-13b")
    ids = IDS[:7]
    weights = attention_map(lm, ids, 0)
    x = state["model.embed_tokens.weight"][ids]
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * state["model.layers.0.input_layernorm.weight"]
    heads, d, n = 6, 8, len(ids)
    q, k, _ = (t.view(n, heads, d).transpose(0, 1) for t in (h @ state["model.layers.0.self_attn.W_pack.weight"].T)
               .split(48, -1))
    slopes = torch.tensor(ref_alibi_slopes(heads))
    scores = q @ k.transpose(1, 2) / math.sqrt(d) + slopes[:, None, None] * (
        torch.arange(n)[None, :] - torch.arange(n)[:, None]).float()
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    np.testing.assert_allclose(weights, torch.softmax(scores, -1).numpy(), atol=1e-5)


def test_qwen_v1_context_is_capped_at_the_checkpoints_seq_length(tmp_path):
    """Bug 14: an entry with max_context above the checkpoint's seq_length was accepted; past seq_length the
    original model switches on dynamic NTK and logn scaling, which qdemo does not compute."""
    write_checkpoint(tmp_path / "qwen", "qwen", seed=0)
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + registry_entry("greedy-qwen", "qwen", tmp_path / "qwen", max_context=8192),
                    encoding="utf-8")
    lm = load_model(load_registry(path).get("greedy-qwen"), device="cpu")
    assert lm.spec.max_context == 8192 and lm.max_context == 256  # seq_length of the tiny checkpoint
    assert "greedy-qwen" in lm.context_note and "seq_length" in lm.context_note and "8,192" in lm.context_note
    card = LocalBackend(lm, StepGate()).model_card()
    assert card["context"].startswith("256")
    with pytest.raises(ValueError, match="exceed the 246 that fit"):
        collect(generate(lm, input_ids=list(range(5, 255)), params=SamplingParams(max_new_tokens=10)))


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_forward_on_every_family(family_env, family):
    lm = family_env["models"][family]
    params = SamplingParams(max_new_tokens=6)
    whole = collect(generate(lm, input_ids=IDS, params=params, prefill_chunk=1000, ignore_eos=True))
    chunked = collect(generate(lm, input_ids=IDS, params=params, prefill_chunk=5, ignore_eos=True))
    assert [t.token_id for t in chunked["tokens"]] == [t.token_id for t in whole["tokens"]]
    for a, b in zip(chunked["tokens"], whole["tokens"]):
        assert a.stages[0].probs == pytest.approx(b.stages[0].probs, abs=1e-5)
