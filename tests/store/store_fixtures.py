"""What the store tests share: a real RunRecord built by hand, the save_run arguments for it, and a fresh
PostgreSQL database per test when QDEMO_TEST_POSTGRES_URL names a server (.ci/run starts one)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from qdemo.core.events import DoneEvent, GenerationStats, MemorySample, PrefillEvent, StageTopN, TokenEvent
from qdemo.core.runs import RunRecord, run_to_json
from qdemo.store.location import sqlite_url

POSTGRES_ENV = "QDEMO_TEST_POSTGRES_URL"
REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().with_name("store_child.py")
CPU = MemorySample(device="cpu", rss_bytes=900 * 2 ** 20)


def make_record(run_id: int = 1, n_tokens: int = 6) -> RunRecord:
    """A finished chat run with per-stage top-N on every token (Chinese and emoji text: UTF-8 must survive)."""
    run = RunRecord(run_id=run_id, model="tiny-qwen2", settings={"temperature": 0.7, "top_k": 20, "seed": 11},
                    label="chat", forward="torch fp32")
    run.add(PrefillEvent(prompt_ids=(151644, 872, 198, 100, 101), prefill_seconds=0.25, dropped_turns=(), seed=11,
                         kv_cache_bytes=4096, memory=CPU, reused_tokens=0, kv_allocated_bytes=8192))
    texts = ["你", "好", "，", "世界", "🚀", "!"]
    for step in range(n_tokens):
        stages = (StageTopN(name="raw", token_ids=(5, 6, 7), probs=(0.5, 0.3, 0.2), chosen_prob=0.5, removed=0.0,
                            argmax_prob=0.5),
                  StageTopN(name="top_k", token_ids=(5, 6), probs=(0.625, 0.375), chosen_prob=0.625, removed=0.2,
                            argmax_prob=0.625))
        run.add(TokenEvent(step=step, token_id=5 + step, text=texts[step % len(texts)], stages=stages,
                           step_seconds=0.05, kv_cache_bytes=4096 + 64 * step, memory=CPU))
    stats = GenerationStats(prompt_tokens=5, new_tokens=n_tokens, ttft_seconds=0.3, prefill_seconds=0.25,
                            prefill_tokens_per_s=20.0, decode_tokens_per_s=19.5, total_seconds=0.55,
                            peak_memory_bytes=CPU.rss_bytes)
    run.add(DoneEvent(reason="eos", stats=stats, text="".join(t.text for t in run.tokens),
                      token_ids=tuple(t.token_id for t in run.tokens)))
    return run


def run_arguments(record: RunRecord, session: str = "session-1", kind: str = "chat") -> dict:
    """save_run's keyword arguments for a record, as the chat service would pass them."""
    stats = record.done.stats
    return dict(session=session, kind=kind, model=record.model, forward=record.forward, settings=record.settings,
                seed=record.prefill.seed, prompt_ids=list(record.prefill.prompt_ids), record_json=run_to_json(record),
                tokens=len(record.tokens), tok_s=stats.decode_tokens_per_s, ttft_s=stats.ttft_seconds,
                reason=record.done.reason)


def postgres_admin_url() -> str:
    """The server to test against, or a skip; a failure instead when QDEMO_REQUIRE_POSTGRES=1 (CI)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("QDEMO_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"QDEMO_REQUIRE_POSTGRES=1 but {POSTGRES_ENV} is not set")
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a throwaway PostgreSQL and sets it)")
    return url


@contextmanager
def fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server for one test, dropped afterwards (connections and all)."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"qdemo_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with fresh_postgres_database(postgres_admin_url()) as url:
            yield url


def start_child(*args: str) -> subprocess.Popen:
    """tests/store/store_child.py in a fresh interpreter (lines on stdout, errors on stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


class Lines:
    """A child's stdout, line by line, with a time limit (a thread reads, so a hung child fails the test instead
    of hanging it)."""

    def __init__(self, child: subprocess.Popen) -> None:
        self.child = child
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.child.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)  # end of output: the child exited or was killed

    def next(self, timeout: float = 60) -> str | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            self.child.kill()
            raise AssertionError(f"the child said nothing for {timeout} s") from None

    def rest(self, timeout: float = 60) -> list[str]:
        out = []
        while (line := self.next(timeout)) is not None:
            out.append(line)
        return out

    def why(self) -> str:
        """The child's stderr, for an assertion's message (once it has ended)."""
        self.child.wait(timeout=30)
        return self.child.stderr.read()[-3000:]


def start_together(*argument_lists: tuple[str, ...], go: Path) -> list[Lines]:
    """Start children, wait until each has imported qdemo.store, then let them all go at once."""
    children = [Lines(start_child(str(go), *arguments)) for arguments in argument_lists]
    for lines in children:
        assert lines.next() == "ready", lines.why()
    go.touch()
    return children
