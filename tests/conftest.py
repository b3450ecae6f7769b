"""Tiny random Qwen2 checkpoints built from a config (no downloads), shared by the unit tests."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from qdemo.models.loader import load_model
from qdemo.models.registry import load_registry

# An app the tests start (python app.py in a subprocess included) keeps its run store in a folder of its own, never
# in the user's data folder.
os.environ.setdefault("QDEMO_DATA", tempfile.mkdtemp(prefix="qdemo-test-data-"))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello model!",
    "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))",
    "你好，世界！今天天气很好。我们一起学习语言模型。",
    "emoji 🚀🌍✨ café naïve",
] * 20


def build_tokenizer(vocab_size: int = 400, merges: bool = True):
    """A byte-level BPE tokenizer with Qwen's chatml special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if merges else 259,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def write_tiny_qwen2(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config = Qwen2Config(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Spread the logits so sampling has a shape worth looking at (default init is nearly uniform).
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_registry(path: Path, model_dir: Path, name: str = "tiny-qwen2", max_context: int = 256,
                   cycle_dir: Path | None = None) -> Path:
    """A models.yaml serving the tiny model (and, given `cycle_dir`, the scripted "cycle" model after it)."""
    cycle = "" if cycle_dir is None else textwrap.indent(textwrap.dedent(f"""\
          - name: cycle
            family: qwen2
            source: {{local: {{path: {cycle_dir}}}}}
            dtype: float32
            max_context: {max_context}
            system_prompt: You are a tiny test model.
            sampling: {{do_sample: false, max_new_tokens: {min(2000, max_context // 2)}}}
        """), "  ")
    path.write_text(textwrap.dedent(f"""\
        default: {name}
        models:
          - name: {name}
            family: qwen2
            source:
              local:
                path: {model_dir}
            dtype: float32
            max_context: {max_context}
            system_prompt: You are a tiny test model.
            sampling:
              do_sample: true
              temperature: 0.8
              top_k: 40
              top_p: 0.9
              max_new_tokens: 16
              seed: 7
        """) + cycle, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_registry_path(tmp_path_factory, tiny_dir) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry") / "models.yaml", tiny_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    return load_model(registry.get(registry.default), device="cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Unit tests never touch the user's qdemo cache (the real-model tests opt out)."""
    if "real_model" not in request.keywords:
        monkeypatch.setenv("QDEMO_CACHE", str(tmp_path / "qdemo-cache"))


CYCLE_LINE = "The quick brown fox"  # the scripted model writes this line, a newline, this line… until its limit


def write_cycle_qwen2(path: Path) -> Path:
    """A tiny Qwen2 whose greedy answer is known: after a newline it writes CYCLE_LINE, then a newline again,
    forever (see `write_scripted_qwen2`). Browser tests use it for answers with known line breaks and for long
    streams that only Stop ends."""
    tokenizer = build_tokenizer()
    newline = tokenizer.encode("\n", add_special_tokens=False)
    line = tokenizer.encode(CYCLE_LINE, add_special_tokens=False)
    assert len(newline) == 1, newline
    return write_scripted_qwen2(path, tokenizer, newline + line)


def write_scripted_qwen2(path: Path, tokenizer: Any, cycle: list[int]) -> Path:
    """A tiny Qwen2 that writes the token ids `cycle` round and round: every attention and MLP output is zero, so
    the logits depend on the current token alone, and the embedding / lm_head rows are set so that each token of
    the cycle is followed by the next."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    assert len(set(cycle)) == len(cycle), cycle
    hidden = 64
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.normal_(0, 0.01)
        model.lm_head.weight.zero_()
        for i, token in enumerate(cycle):
            direction = torch.zeros(hidden)
            direction[i] = 1.0
            model.model.embed_tokens.weight[token] = direction
            model.lm_head.weight[cycle[(i + 1) % len(cycle)]] = 30.0 * direction
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cycle_dir(tmp_path_factory) -> Path:
    return write_cycle_qwen2(tmp_path_factory.mktemp("cycle-qwen2"))


def pytest_collection_modifyitems(config, items):
    """The real model is slow to prepare and run: every real_model test is also a slow one."""
    for item in items:
        if "real_model" in item.keywords and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)


def tiny_services(tiny_dir: Path, root: Path, max_context: int = 2048):
    """Services over the tiny model with a generous rate limit (service tests make many requests)."""
    from qdemo.services.admission import Services
    from qdemo.serving.limits import Limits
    from qdemo.serving.pool import ModelPool

    registry = load_registry(write_registry(root / "models.yaml", tiny_dir, max_context=max_context))
    return Services(registry=registry, pool=ModelPool(registry, "cpu"), default_model=registry.default,
                    limits=Limits(requests_per_minute=10_000))


def serve(registry):
    """The app on loopback for gradio_client tests: yields (registry, client), closes the app after."""
    from gradio_client import Client

    from qdemo.ui.app import build_app

    demo = build_app(registry)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield registry, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


@pytest.fixture
def pool_registry(tiny_dir, tmp_path):
    """Three names for the tiny model (each loads its own copy): for the pool's budget and eviction."""
    path = tmp_path / "models.yaml"
    write_registry(path, tiny_dir)
    text = path.read_text(encoding="utf-8")
    body = text[text.index("  - name:"):]
    extra = "".join(body.replace("name: tiny-qwen2", f"name: tiny-{c}", 1) for c in "bc")
    path.write_text(text + extra, encoding="utf-8")
    pool_registry = load_registry(path)
    assert {"tiny-qwen2", "tiny-b", "tiny-c"} <= set(pool_registry.names())
    return pool_registry


@pytest.fixture
def one_model_bytes(pool_registry):
    return load_model(pool_registry.get("tiny-qwen2"), device="cpu").weight_bytes
