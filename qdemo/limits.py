"""Serving limits and input hygiene: what a shared server accepts, and readable refusals for the rest.

Every limit has a default sane for a public Space and an environment variable (also an `app.py` flag).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Mapping

# C0/C1 control characters except tab and newline; DEL. Format characters (ZWJ in emoji, RTL marks) stay.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text as a model should see it: CRLF/CR → LF, control characters dropped, lone surrogates (invalid UTF-8
    that reached us through JSON escapes) replaced by U+FFFD. Everything printable is kept as typed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return _SURROGATE.sub("\ufffd", text)


def cut_text(text: str, max_chars: int, what: str = "message") -> tuple[str, str]:
    """(text cut to max_chars, the notice to show, or "" when nothing was cut)."""
    if len(text) <= max_chars:
        return text, ""
    return text[:max_chars], f"Your {what} had {len(text):,} characters; only the first {max_chars:,} were sent."


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 16_000  # a longer message is cut, with a notice
    max_turns: int = 40  # history turns (a user message and its answer) sent to the model; older ones dropped
    max_new_tokens: int = 2048  # a request for more is lowered to this, with a notice
    requests_per_minute: int = 30  # per session; more are refused until the minute has passed
    concurrency: int = 4  # generations running at once in the whole app; others wait in the queue
    queue_size: int = 64  # waiting requests beyond this are refused ("queue is full")

    ENV = {"max_input_chars": "QDEMO_MAX_INPUT_CHARS", "max_turns": "QDEMO_MAX_TURNS",
           "max_new_tokens": "QDEMO_MAX_NEW_TOKENS", "requests_per_minute": "QDEMO_REQUESTS_PER_MINUTE",
           "concurrency": "QDEMO_CONCURRENCY", "queue_size": "QDEMO_QUEUE_SIZE"}

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {f.name} ({self.ENV[f.name]}) must be a whole number >= 1, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: int | None) -> "Limits":
        """Defaults, then environment variables, then explicit (non-None) overrides such as CLI flags."""
        environ = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for name, var in cls.ENV.items():
            if environ.get(var, "").strip():
                try:
                    values[name] = int(environ[var])
                except ValueError:
                    raise ValueError(f"{var} must be a whole number, got {environ[var]!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class RateLimiter:
    """Sliding one-minute windows, one per session id. Holds only timestamps, pruned as it goes."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute, self._clock = per_minute, clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, session: str | None) -> str | None:
        """None when the request may go ahead (and counts it), else the refusal to show."""
        key = session or "anonymous"
        now = self._clock()
        with self._lock:
            for other in [k for k, q in self._seen.items() if not q or now - q[-1] > self.WINDOW_S]:
                del self._seen[other]  # sessions quiet for a minute are forgotten
            window = self._seen.setdefault(key, deque())
            while window and now - window[0] > self.WINDOW_S:
                window.popleft()
            if len(window) >= self.per_minute:
                wait = self.WINDOW_S - (now - window[0])
                return (f"Too many requests: this server allows {self.per_minute} per minute per session. "
                        f"Try again in {max(1, round(wait))} s.")
            window.append(now)
            return None
