"""Engine behaviour the oracle cannot show: stop reasons, the stop event, UTF-8 holdback, KV-cache growth,
errors. A scripted wrapper forces chosen tokens while keeping the real tiny model's forward and cache."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from qdemo.core.engine import collect, generate
from qdemo.core.events import DoneEvent, PrefillEvent, TokenEvent
from qdemo.errors import PromptTooLongError
from qdemo.sampling import SamplingParams

GREEDY = SamplingParams(do_sample=False, max_new_tokens=12)
HELLO = [{"role": "user", "content": "hello"}]


class Scripted(torch.nn.Module):
    """Adds a huge logit to script[i] at the i-th forward; optionally fails at one forward."""

    def __init__(self, inner, script, fail_at: int | None = None, failure: Exception | None = None):
        super().__init__()
        self.inner, self.script, self.fail_at, self.calls = inner, list(script), fail_at, 0
        self.failure = failure or RuntimeError("simulated device failure")
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                logits_to_keep=0):
        step, self.calls = self.calls, self.calls + 1
        if step == self.fail_at:
            raise self.failure
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, logits_to_keep=logits_to_keep)
        if step < len(self.script):
            out.logits[..., -1, self.script[step]] += 1e4
        return out


def scripted(lm, script, fail_at=None, failure=None):
    return dataclasses.replace(lm, model=Scripted(lm.model, script, fail_at, failure))


def test_event_sequence_and_stats(tiny_lm):
    events = list(generate(tiny_lm, messages=HELLO, params=GREEDY.replace(max_new_tokens=5), ignore_eos=True))
    assert isinstance(events[0], PrefillEvent) and isinstance(events[-1], DoneEvent)
    tokens = [e for e in events[1:-1] if isinstance(e, TokenEvent)]
    assert [t.step for t in tokens] == list(range(5)) and len(events) == 7
    done = events[-1]
    assert done.reason == "max_tokens" and done.stats.new_tokens == 5
    assert done.stats.ttft_seconds >= events[0].prefill_seconds > 0
    assert done.stats.decode_tokens_per_s > 0 and done.stats.peak_memory_bytes > 0
    assert done.text == "".join(t.text for t in tokens)


def test_kv_cache_grows_by_one_token_per_step(tiny_lm):
    cfg = tiny_lm.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # fp32 keys + values
    run = collect(generate(tiny_lm, messages=HELLO, params=GREEDY.replace(max_new_tokens=6), ignore_eos=True))
    prompt_len = len(run["prefill"].prompt_ids)
    assert run["prefill"].kv_cache_bytes == prompt_len * per_token
    # token i is chosen from logits whose forward cached prompt + i tokens
    assert [t.kv_cache_bytes for t in run["tokens"]] == [(prompt_len + i) * per_token for i in range(6)]


def test_eos_ends_with_reason_eos_and_no_text(tiny_lm):
    tok = tiny_lm.tokenizer
    script = tok.encode("ok") + [tok.convert_tokens_to_ids("<|im_end|>")]
    run = collect(generate(scripted(tiny_lm, script), messages=HELLO, params=GREEDY))
    assert run["done"].reason == "eos"
    assert run["tokens"][-1].token_id == script[-1] and run["tokens"][-1].text == ""
    assert run["done"].text == "ok"


def test_family_stop_token_ends_with_reason_stop_token(tiny_lm):
    endoftext = tiny_lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext in tiny_lm.stop_token_ids and endoftext not in tiny_lm.eos_token_ids
    run = collect(generate(scripted(tiny_lm, [endoftext]), messages=HELLO, params=GREEDY))
    assert run["done"].reason == "stop_token" and len(run["tokens"]) == 1


def test_ignore_eos_keeps_going(tiny_lm):
    im_end = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    run = collect(generate(scripted(tiny_lm, [im_end]), messages=HELLO, params=GREEDY.replace(max_new_tokens=4),
                           ignore_eos=True))
    assert run["done"].reason == "max_tokens" and len(run["tokens"]) == 4


@pytest.mark.parametrize("text", ["你好，世界！", "rocket 🚀 and earth 🌍", "混合 mixed 文本 ✨ done"])
def test_stream_never_emits_broken_utf8(tiny_lm, text):
    ids = tiny_lm.tokenizer.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 4  # characters really are split over tokens
    run = collect(generate(scripted(tiny_lm, ids), messages=HELLO, params=GREEDY.replace(max_new_tokens=len(ids))))
    deltas = [t.text for t in run["tokens"]]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == run["done"].text
    assert "" in deltas  # some bytes were held back for a later token


def test_cut_mid_character_drops_the_partial_bytes(tiny_lm):
    ids = tiny_lm.tokenizer.encode("ab🚀")
    assert tiny_lm.tokenizer.decode(ids[:-1]).endswith("\ufffd")
    run = collect(generate(scripted(tiny_lm, ids[:-1]), messages=HELLO,
                           params=GREEDY.replace(max_new_tokens=len(ids) - 1)))
    assert run["done"].reason == "max_tokens"
    assert run["done"].text == "ab" and "".join(t.text for t in run["tokens"]) == "ab"


def test_stop_event_stops_within_one_step(tiny_lm):
    stop = threading.Event()
    events = generate(tiny_lm, messages=HELLO, params=GREEDY.replace(max_new_tokens=50), stop_event=stop,
                      ignore_eos=True)
    seen = []
    for event in events:
        if isinstance(event, TokenEvent):
            seen.append(event)
            if event.step == 2:
                stop.set()
        elif isinstance(event, DoneEvent):
            done = event
    assert len(seen) == 3 and done.reason == "stopped" and done.stats.new_tokens == 3


def test_stop_event_from_another_thread(tiny_lm):
    stop = threading.Event()
    started = threading.Event()
    result = {}

    def consume():
        for event in generate(tiny_lm, messages=HELLO, params=GREEDY.replace(max_new_tokens=200),
                              stop_event=stop, ignore_eos=True):
            if isinstance(event, TokenEvent) and event.step == 5:
                started.set()
            if isinstance(event, DoneEvent):
                result["done"] = event

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(60)
    stop.set()
    worker.join(60)
    assert result["done"].reason == "stopped" and result["done"].stats.new_tokens < 200


def test_forward_error_becomes_done_event_naming_the_model(tiny_lm):
    run = collect(generate(scripted(tiny_lm, [], fail_at=3), messages=HELLO, params=GREEDY))
    assert run["done"].reason == "error"
    assert "tiny-qwen2" in run["done"].error and "simulated device failure" in run["done"].error
    assert len(run["tokens"]) == 3


def test_out_of_memory_while_generating_is_a_message_and_the_model_keeps_working(tiny_lm):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    run = collect(generate(scripted(tiny_lm, [], fail_at=2, failure=oom), messages=HELLO, params=GREEDY))
    assert run["done"].reason == "error" and len(run["tokens"]) == 2
    assert run["done"].error.startswith("tiny-qwen2: out of memory on cpu; lower max_new_tokens")
    after = collect(generate(tiny_lm, messages=HELLO, params=GREEDY.replace(max_new_tokens=3), ignore_eos=True))
    assert after["done"].reason == "max_tokens" and len(after["tokens"]) == 3


def test_closing_the_stream_early_releases_the_kv_cache(tiny_lm, monkeypatch):
    """A consumer that goes away (a closed tab, a cancelled API call) closes the stream: the KV cache it held is
    released at once, not when the generator object is eventually collected."""
    import gc
    import weakref

    from transformers import DynamicCache

    import qdemo.forwards.torch_runner as decode
    from qdemo.forwards.torch_runner import kv_cache_bytes

    caches = []

    class Tracked(DynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self))

    monkeypatch.setattr(decode, "DynamicCache", Tracked)
    stream = generate(tiny_lm, messages=HELLO, params=GREEDY, ignore_eos=True)
    next(stream), next(stream), next(stream)
    assert len(caches) == 1 and caches[0]() is not None and kv_cache_bytes(caches[0]()) > 0
    stream.close()  # no DoneEvent needed, no exception
    gc.collect()
    assert caches[0]() is None  # while `stream` itself is still referenced here


def test_input_validation(tiny_lm):
    with pytest.raises(ValueError, match="exactly one of messages or input_ids"):
        generate(tiny_lm, messages=HELLO, input_ids=[1, 2])
    with pytest.raises(ValueError, match="token id 1000000 at position 1 is outside its vocabulary"):
        generate(tiny_lm, input_ids=[1, 10**6])
    with pytest.raises(ValueError, match="top_n"):
        generate(tiny_lm, messages=HELLO, top_n=-1)
    with pytest.raises(PromptTooLongError, match="tiny-qwen2"):
        generate(tiny_lm, input_ids=[5] * 300)
    with pytest.raises(ValueError, match="last message must be the user's"):
        generate(tiny_lm, messages=[{"role": "assistant", "content": "hi"}])


def test_stage_capture_off(tiny_lm):
    run = collect(generate(tiny_lm, messages=HELLO, params=GREEDY.replace(max_new_tokens=3), top_n=0))
    assert all(t.stages == () for t in run["tokens"])
