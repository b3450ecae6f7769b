"""The one emission path on its own: stop rules and their reason words, which reason a row keeps, the clock read
once for a step's rows, errors, and exactly one DoneEvent per row."""

from __future__ import annotations

import threading
import time

from qdemo.core.emit import Deadline, end_early, fail, finish, new_emitter
from qdemo.core.events import MemorySample

MEM = MemorySample(device="cpu", rss_bytes=1000)


def emitter(lm, max_new_tokens=5, ignore_eos=False):
    return new_emitter(lm, 2, [5, 6, 7], max_new_tokens, None, ignore_eos, prep_s=0.5)


def text_ids(lm, text):
    return lm.tokenizer.encode(text, add_special_tokens=False)


def test_stop_rules_name_their_reason(tiny_lm):
    im_end = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tiny_lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    a = text_ids(tiny_lm, "ok")[0]
    for token, reason in ((im_end, "eos"), (endoftext, "stop_token")):
        out = emitter(tiny_lm)
        assert out.emit(a, (), 0.1, 10, MEM)[1] is False
        event, ended = out.emit(token, (), 0.2, 11, MEM)
        assert ended and event.text == "" and event.step == 1 and event.row == 2 and event.kv_cache_bytes == 11
        assert out.done().reason == reason
    out = emitter(tiny_lm, max_new_tokens=2, ignore_eos=True)
    assert out.emit(im_end, (), 0.1, 10, MEM)[1] is False and out.emit(a, (), 0.1, 10, MEM)[1] is True
    done = out.done()
    assert done.reason == "max_tokens" and done.token_ids == (im_end, a) and done.row == 2


def test_the_first_reason_stays_and_an_error_overrides_it_until_the_row_is_done(tiny_lm):
    im_end = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = emitter(tiny_lm)
    out.end("stopped")
    out.emit(im_end, (), 0.1, 10, MEM, last=True)
    assert out.reason == "stopped"
    fail([out], tiny_lm, RuntimeError("boom"))
    done = out.done()
    assert done.reason == "error" and done.error == "tiny-qwen2: RuntimeError: boom"
    fail([out], tiny_lm, RuntimeError("later"))
    assert list(finish([out])) == [] and out.error == "tiny-qwen2: RuntimeError: boom"


def test_held_back_bytes_go_out_with_the_last_token(tiny_lm):
    ids = text_ids(tiny_lm, "ab🚀")
    out = emitter(tiny_lm, max_new_tokens=50)
    texts = [out.emit(t, (), 0.1, 0, MEM, last=i == len(ids) - 1)[0].text for i, t in enumerate(ids)]
    assert "".join(texts) == "ab🚀" == out.done().text


def test_the_clock_ends_every_running_row_at_once(tiny_lm):
    rows = [emitter(tiny_lm), emitter(tiny_lm)]
    stop = threading.Event()
    clock = Deadline(time.perf_counter(), None, stop)
    assert not end_early(clock, rows) and all(r.reason is None for r in rows)
    stop.set()
    assert end_early(clock, rows) and [r.reason for r in rows] == ["stopped", "stopped"]
    assert Deadline(time.perf_counter(), 0.0, None).reason() == "time_limit"
    assert [d.reason for d in finish(rows)] == ["stopped", "stopped"] and list(finish(rows)) == []


def test_stats_count_the_prefill_in_the_first_step(tiny_lm):
    out = emitter(tiny_lm)
    out.prefill_event(0.3, 100, MEM)
    for seconds in (0.4, 0.1, 0.1):
        out.emit(text_ids(tiny_lm, "a")[0], (), seconds, 100, MEM)
    stats = out.done().stats
    assert stats.ttft_seconds == 0.5 + 0.4 and stats.prefill_seconds == 0.3 and stats.new_tokens == 3
    assert abs(stats.decode_tokens_per_s - 10.0) < 1e-9 and abs(stats.total_seconds - 1.1) < 1e-9
    assert stats.prompt_tokens == 3 and stats.peak_memory_bytes == 1000
