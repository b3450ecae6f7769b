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
    max_prompt_tokens: int = 4096  # the whole prompt, history included; older turns are dropped to fit, with a notice
    max_new_tokens: int = 2048  # a request for more is lowered to this, with a notice
    max_generation_seconds: int = 180  # an answer still running then is cut, with a notice
    requests_per_minute: int = 30  # per session; more are refused until the minute has passed
    requests_per_minute_per_address: int = 120  # per client address, however many sessions it opens
    events_per_minute: int = 600  # page events that run no model (sliders, clicks) per session; 4x per address
    concurrency: int = 4  # generations running at once in the whole app; others wait in the queue
    queue_size: int = 64  # waiting requests beyond this are refused ("queue is full")
    max_upload_kib: int = 1024  # a JSON conversation is a few KiB; larger uploads are refused before they land

    ENV = {"max_input_chars": "QDEMO_MAX_INPUT_CHARS", "max_turns": "QDEMO_MAX_TURNS",
           "max_prompt_tokens": "QDEMO_MAX_PROMPT_TOKENS", "max_new_tokens": "QDEMO_MAX_NEW_TOKENS",
           "max_generation_seconds": "QDEMO_MAX_GENERATION_SECONDS",
           "requests_per_minute": "QDEMO_REQUESTS_PER_MINUTE",
           "requests_per_minute_per_address": "QDEMO_REQUESTS_PER_MINUTE_PER_ADDRESS",
           "events_per_minute": "QDEMO_EVENTS_PER_MINUTE",
           "concurrency": "QDEMO_CONCURRENCY", "queue_size": "QDEMO_QUEUE_SIZE",
           "max_upload_kib": "QDEMO_MAX_UPLOAD_KIB"}

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


@dataclass(frozen=True)
class Client:
    """Who a request comes from, as far as the server can tell: the session Gradio gave the page (a client can mint
    new ones freely) and the network address (it cannot)."""

    session: str | None
    address: str | None
    own_session: bool = True  # False: Gradio named this one call after its event (a REST call without a session)


class RateLimiter:
    """Sliding one-minute windows per session and per client address: a request counts against both, and is
    refused when either is full, so a client that mints a new session id for every call is still limited by its
    address. Holds only timestamps, pruned as it goes."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, per_address: int | None = None, clock=time.monotonic) -> None:
        self.per_minute, self._clock = per_minute, clock
        self.per_address = per_address if per_address is not None else 4 * per_minute
        self._seen: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, client: Client | str | None) -> str | None:
        """None when the request may go ahead (and counts it), else the refusal to show."""
        if not isinstance(client, Client):
            client = Client(session=client, address=None)
        now = self._clock()
        windows = [(("session", client.session or "anonymous"), self.per_minute, "per session")]
        if client.address:
            windows.append((("address", client.address), self.per_address, "per address"))
        with self._lock:
            for other in [k for k, q in self._seen.items() if not q or now - q[-1] > self.WINDOW_S]:
                del self._seen[other]  # quiet sessions and addresses are forgotten
            for key, limit, what in windows:
                window = self._seen.setdefault(key, deque())
                while window and now - window[0] > self.WINDOW_S:
                    window.popleft()
                if len(window) >= limit:
                    wait = self.WINDOW_S - (now - window[0])
                    return (f"Too many requests: this server allows {limit} per minute {what}. "
                            f"Try again in {max(1, round(wait))} s.")
            for key, _, _ in windows:
                self._seen[key].append(now)
            return None


def client_from_headers(session: str | None, peer: str | None, forwarded_for: str | None,
                        trusted_proxies: int = 0, own_session: bool = True) -> Client:
    """The client's address: the socket peer, or — behind `trusted_proxies` proxies that each append the address
    they saw to X-Forwarded-For — the entry that many places from the right. Entries further left were written by
    the client and are not believed."""
    address = peer
    if trusted_proxies > 0 and forwarded_for:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        if len(hops) >= trusted_proxies:
            address = hops[-trusted_proxies]
    return Client(session=session, address=address, own_session=own_session)
