"""The Performance table and the metrics strip say what a run prefilled and what its cache holds (issue 19, items 6
and 7). Runs are built by hand here, so the expected figures are the ones written into them."""

from __future__ import annotations

from qdemo.core.events import DoneEvent, GenerationStats, MemorySample, PrefillEvent, TokenEvent
from qdemo.core.runs import RunRecord
from qdemo.views.answer import metrics_line
from qdemo.views.perf import TABLE_HEADERS, run_row, runs_table, runs_table_for_people

CPU = MemorySample(device="cpu", rss_bytes=900 * 2 ** 20)
KIB = 1024


def follow_up(kv: int = 40 * 12 * KIB, allocated: int = 0) -> RunRecord:
    """A second chat turn: 1,200 prompt tokens of which 1,150 came from the kept cache, 50 prefilled in 0.5 s."""
    run = RunRecord(run_id=7, model="m", settings={}, label="chat", forward="llama.cpp Q4_K_M")
    run.add(PrefillEvent(prompt_ids=tuple(range(1200)), prefill_seconds=0.5, dropped_turns=(), seed=None,
                         kv_cache_bytes=kv, memory=CPU, reused_tokens=1150, kv_allocated_bytes=allocated))
    run.add(TokenEvent(step=0, token_id=5, text="x", stages=(), step_seconds=0.6, kv_cache_bytes=kv, memory=CPU,
                       kv_allocated_bytes=allocated))
    stats = GenerationStats(prompt_tokens=1200, new_tokens=1, ttft_seconds=0.6, prefill_seconds=0.5,
                            prefill_tokens_per_s=100.0, decode_tokens_per_s=0.0, total_seconds=0.6,
                            peak_memory_bytes=CPU.rss_bytes, reused_tokens=1150)
    run.add(DoneEvent(reason="eos", stats=stats, text="x", token_ids=(5,)))
    return run


def test_the_runs_table_shows_the_tokens_prefilled_and_reused_beside_the_prefill_rate():
    row = run_row(follow_up())
    assert (row["prompt_tokens"], row["prefilled_tokens"], row["reused_tokens"], row["prefill_tok_s"]) == \
        (1200, 50, 1150, 100.0)
    columns = list(runs_table([follow_up()]).columns)
    assert columns.index("prefilled_tokens") + 2 == columns.index("reused_tokens") + 1 == columns.index("prefill_tok_s")
    people = runs_table_for_people([follow_up()])
    assert {"prefilled tokens", "reused tokens", "prefill tok/s"} <= set(people.columns)
    assert TABLE_HEADERS["prefill_tok_s"] == "prefill tok/s"


def test_a_running_run_shows_what_its_prefill_event_says():
    run = follow_up()
    run.done = None
    row = run_row(run)
    assert (row["prefilled_tokens"], row["reused_tokens"]) == (50, 1150)


def test_the_metrics_strip_labels_the_allocated_context_apart_from_the_cache_in_use():
    llama = metrics_line(follow_up(kv=40 * 12 * KIB, allocated=2048 * 12 * KIB))
    assert "KV 480.0 KiB (24.0 MiB allocated)" in llama
    torch = metrics_line(follow_up(kv=40 * 12 * KIB, allocated=40 * 12 * KIB))
    assert "KV 480.0 KiB ·" in torch and "allocated" not in torch
    old = metrics_line(follow_up(kv=40 * 12 * KIB, allocated=0))  # a run saved before the allocation was recorded
    assert "KV 480.0 KiB ·" in old and "allocated" not in old
