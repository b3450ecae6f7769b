"""A second process on one store, for the tests: `python store_child.py GO MODE URL ...` (see each mode).

It prints "ready" once imported, then waits for the file GO to exist, so the test can start several children
and let them write at the same moment (imports take seconds, writes milliseconds). Only qdemo.store is imported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qdemo.store import StoreSettings, open_store


def wait_for(go: Path) -> None:
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the test never said go")
        time.sleep(0.005)


def runs(store, arguments_file: str) -> None:
    """Save runs until killed, printing each id once save_run has returned (committed)."""
    arguments = json.loads(Path(arguments_file).read_text(encoding="utf-8"))
    while True:
        print(store.save_run(**arguments), flush=True)


def arena(store, prefix: str, count: str) -> None:
    """Save COUNT battles of our own and a vote on each; print how many votes were stored."""
    stored = 0
    for i in range(int(count)):
        battle = f"{prefix}-{i}"
        store.save_battle(battle, session=prefix, contender_a="qwen", contender_b="baichuan", prompt=f"问题 {i}",
                          answer_a=json.dumps({"text": "a"}), answer_b=json.dumps({"text": "b"}))
        stored += store.save_vote(battle, session=prefix, outcome=("a", "b", "tie", "both_bad")[i % 4])
    print(json.dumps({"stored": stored}), flush=True)


def race(store, prefix: str, count: str, outcome: str) -> None:
    """Vote OUTCOME on battles PREFIX-0 .. PREFIX-(COUNT-1), which another process votes on too."""
    won = [i for i in range(int(count)) if store.save_vote(f"{prefix}-{i}", session=outcome, outcome=outcome)]
    print(json.dumps({"won": won}), flush=True)


def main(go: str, mode: str, url: str, *rest: str) -> None:
    wait_for(Path(go))
    store = open_store(StoreSettings(url=url))  # after "go": children opening an empty store race on migrating
    {"runs": runs, "arena": arena, "race": race}[mode](store, *rest)
    store.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
