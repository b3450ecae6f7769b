"""What one decode forward of a loaded model costs, by the rows in its batch: whether a batch of two rows pays
against two single-row steps is a property of the forward and the machine (on some CPUs llama.cpp's two-row step
costs more than two one-row steps), so Compare asks the model's own recent steps instead of assuming."""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW = 32  # recent steps remembered per row count
ENOUGH = 4  # steps per row count before a median is trusted
STALE_S = 600.0  # a row count not seen this long is measured again (a busy spell must not decide for good)


@dataclass
class StepCosts:
    """Recent seconds per decode forward (inside the step gate: waits for other users are not counted)."""

    _seen: dict[int, deque] = field(default_factory=dict)
    _at: dict[int, float] = field(default_factory=dict)  # when each row count was last seen
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._seen.setdefault(rows, deque(maxlen=WINDOW)).append(seconds)
            self._at[rows] = time.monotonic()

    def median(self, rows: int) -> float | None:
        """The median of the recent steps of `rows` rows, or None before ENOUGH of them or once they are stale."""
        with self._lock:
            seen = list(self._seen.get(rows, ()))
            fresh = time.monotonic() - self._at.get(rows, 0.0) < STALE_S
        return statistics.median(seen) if len(seen) >= ENOUGH and fresh else None

    def batch_pays(self, rows: int = 2) -> bool | None:
        """Whether one step of `rows` rows has cost less than `rows` single-row steps; None while either is
        unknown (the caller batches, and so measures it)."""
        one, many = self.median(1), self.median(rows)
        if one is None or many is None:
            return None
        return many < rows * one
