"""What one decode forward of a loaded model costs, by the rows in its batch: whether a batch of two rows pays
against two single-row steps is a property of the forward and the machine (on some CPUs llama.cpp's two-row step
costs more than two one-row steps), so Compare asks the model's own recent steps instead of assuming."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

WINDOW = 32  # recent steps remembered per row count
ENOUGH = 4  # steps per row count before a median is trusted


@dataclass
class StepCosts:
    """Recent seconds per decode forward (inside the step gate: waits for other users are not counted)."""

    _seen: dict[int, deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._seen.setdefault(rows, deque(maxlen=WINDOW)).append(seconds)

    def median(self, rows: int) -> float | None:
        """The median of the recent steps of `rows` rows, or None before ENOUGH of them."""
        with self._lock:
            seen = list(self._seen.get(rows, ()))
        return statistics.median(seen) if len(seen) >= ENOUGH else None

    def batch_pays(self, rows: int = 2) -> bool | None:
        """Whether one step of `rows` rows has cost less than `rows` single-row steps; None while either is
        unknown."""
        one, many = self.median(1), self.median(rows)
        if one is None or many is None:
            return None
        return many < rows * one
