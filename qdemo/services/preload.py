"""The default model loads in the background while the app starts, so the first message does not wait for it.

The page shows the load's progress until it is ready (a first message sent earlier simply waits for the same
load: the pool loads each model once). A one-token warm-up forward through the model's gate pages the weights
in, so the first answer starts at full speed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from qdemo.errors import QdemoError
from qdemo.forwards.choice import pick_forward
from qdemo.models.loader import pick_device
from qdemo.serving.local import leased
from qdemo.serving.pool import ModelPool

log = logging.getLogger("qdemo")


@dataclass
class Preload:
    model: str
    forward: str = ""
    phase: str = "waiting to start"
    fraction: float = 0.0
    ready: bool = False
    error: str | None = None
    seconds: float | None = None
    _started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, pool: ModelPool) -> threading.Thread:
        """Load in a thread (llama.cpp's load runs in C, beside the Python that builds the page)."""
        thread = threading.Thread(target=self._run, args=(pool,), name="qdemo-preload", daemon=True)
        thread.start()
        return thread

    def _progress(self, phase: str, done: float, total: float) -> None:
        with self._lock:
            self.phase, self.fraction = phase, (done / total if total else 0.0)

    def _run(self, pool: ModelPool) -> None:
        name = self.model
        try:
            forward = pick_forward(pool.registry.get(name), pick_device(pool.device).type).forward
            self.forward = forward
            with leased(pool, name, self._progress, forward) as backend:
                self._progress("warm-up forward", 0, 1)
                backend.next_token_logits(backend.raw_text_ids("Hello"))
            with self._lock:
                self.ready, self.seconds = True, time.perf_counter() - self._started
            log.info("preloaded %s on %s in %.1f s", name, forward, self.seconds)
        except (QdemoError, ValueError, OSError, RuntimeError) as exc:
            with self._lock:
                self.error = str(exc)
            log.warning("preload of %s failed: %s", self.model, exc)

    @property
    def finished(self) -> bool:
        return self.ready or self.error is not None

    def line(self) -> str:
        """A line for the page: progress while loading, then how long it took (or why it failed)."""
        with self._lock:
            if self.error is not None:
                return f"⚠️ Could not load {self.model} at start: {self.error}"
            if self.ready:
                return f"✓ {self.model} is loaded ({self.forward}, {self.seconds:.1f} s after start)."
            return f"⏳ Loading {self.model} ({self.forward or 'starting'}): {self.phase} · {self.fraction:.0%}"
