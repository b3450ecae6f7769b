"""A model on an OpenAI-compatible server (llama.cpp's llama-server, vLLM, SGLang) behind the backend seam.

`RemoteBackend.generate` streams `/v1/chat/completions` (or `/v1/completions` for raw text) with `logprobs` and
up to 20 `top_logprobs` per token through the official `openai` client, and folds the stream into the same
events the local engine emits: a prefill event at the first token, one token event per token whose single stage
is the distribution the server reports, and a done event with the same statistics. The token view, metrics and
Compare then work unchanged; the panels that need the weights ask `capabilities` and say they need a local model.

Faults end in one readable message naming the entry and the server: connection errors are retried a bounded
number of times with backoff before the first token (never after: a half-written answer is not sent twice), a
stream that breaks off ends the answer with its reason, and the API key (read from the environment variable the
registry names) never appears in a message, a log line or an export.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from qdemo.core.decode import DecodeState, ShouldStop
from qdemo.core.events import (
    DoneEvent,
    Event,
    GenerationStats,
    MemorySample,
    PrefillEvent,
    StageTopN,
    TokenEvent,
)
from qdemo.models.families import get_family
from qdemo.models.loader import vocabulary_key
from qdemo.models.prompting import (
    Message,
    Prompt,
    build_prompt,
    conversation_prompt_ids,
    raw_text_ids,
    with_system,
)
from qdemo.models.registry import ModelSpec, OpenAISource
from qdemo.probes import attribution, introspect, lens, scoring
from qdemo.sampling import SamplingParams
from qdemo.serving.protocol import Backend, Capabilities, NeedsLocalModel, needs_local

log = logging.getLogger("qdemo.serving.remote")

MAX_TOP_LOGPROBS = 20
CONNECT_RETRIES = 2  # after the first try; connection errors before the first token only
BACKOFF_S = (0.5, 1.5)
TIMEOUT_S = 60.0  # per read: a server that says nothing for this long is given up on
NO_MEMORY = MemorySample(device="remote")


class _Stopped(Exception):
    """Stop (or the time limit) came before the server answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteError(ValueError):
    """A readable failure of a remote entry (names the entry and the server, never the key). A ValueError: the
    services turn it into the message the user sees, as they do for a prompt that does not fit."""


def server_label(base_url: str) -> str:
    """host:port of the server, for messages (no path, no credentials)."""
    parts = urlsplit(base_url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else base_url


def distribution_note() -> str:
    """Which distribution an OpenAI-compatible server's logprobs are, in words for the token view."""
    return ("llama.cpp's server gives the model's own distribution unless post_sampling_probs is set; vLLM follows "
            "its logprobs_mode, raw by default; not qdemo's stage-by-stage chain, which needs the weights here")


class RemoteBackend:
    """One registry entry served by an OpenAI-compatible server."""

    forward = "remote"
    context_note = ""

    def __init__(self, spec: ModelSpec, tokenizer: Any = None, client_factory: Callable[..., Any] | None = None,
                 timeout_s: float | None = None) -> None:
        if not isinstance(spec.source, OpenAISource):
            raise TypeError(f"{spec.name} is not a remote entry")
        self.spec, self.source = spec, spec.source
        self.tokenizer = tokenizer
        self._timeout_s = timeout_s
        self._client_factory = client_factory
        self._texts: dict[int, str] = {}  # ids seen in streams → their text (ids the server did not number too)
        self._synthetic: dict[str, int] = {}
        self._lock = threading.Lock()
        family = get_family(spec.family)
        self.name, self.key, self.max_context = spec.name, f"{spec.name} [remote]", spec.max_context
        self.server = server_label(self.source.base_url)
        self.forward_label = f"remote {self.server}"
        self.position_encoding, self.position_note = family.position_encoding, family.position_note
        # tokens with the server's log-probabilities; nothing that needs the weights or full logits
        self.capabilities = Capabilities(stage_chain=False, attention=False, positions=False, model_card=False,
                                         rows=False, where=f"a remote server ({self.server})",
                                         local_twin=self.source.tokenizer)

    # --- facts -------------------------------------------------------------------------------------------------
    @property
    def timeout_s(self) -> float:
        return self._timeout_s if self._timeout_s is not None else TIMEOUT_S  # read late: tests shorten it

    def batch_pays(self, rows: int = 2) -> bool:
        return False  # the server batches its own slots

    def new_state(self) -> None:
        return None  # the server keeps its own cache (prefix caching)

    def vocabulary(self) -> str | None:
        return vocabulary_key(self.tokenizer) if self.tokenizer is not None else None

    # --- text and tokens ---------------------------------------------------------------------------------------
    def token_texts(self, ids: Sequence[int]) -> dict[int, str]:
        out = {}
        for i in set(int(i) for i in ids):
            if i in self._texts:
                out[i] = self._texts[i]
            elif i >= 0 and self.tokenizer is not None:
                out[i] = self.tokenizer.decode([i])
            else:
                out[i] = f"<{i}>"
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.token_texts(ids)[int(i)] for i in ids)

    def text_decoder(self) -> Callable[[Sequence[int]], dict[int, str]]:
        return self.token_texts  # holds no weights: the texts the server sent and the borrowed tokenizer

    def special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()

    def prompt_pieces(self, ids: Sequence[int]) -> list[tuple[int, str, bool]]:
        if self.tokenizer is None:
            return []
        special = self.special_ids()
        return [(int(i), self.tokenizer.decode([int(i)]), int(i) in special) for i in ids]

    def count_tokens(self, text: str) -> int | None:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer is not None else None

    def chat_prompt(self, messages: Sequence[dict[str, str]], max_new_tokens: int, system: str | None = None,
                    max_prompt_tokens: int | None = None):
        """The prompt as the local tokenizer counts it (fitted into the entry's context, oldest turns dropped
        first); without a tokenizer nothing is counted and every message is sent."""
        system = self.spec.system_prompt if system is None else system
        if self.tokenizer is None:
            return Prompt(ids=[], dropped_turns=(), budget=self.max_context)
        return build_prompt(self.tokenizer, messages, self.max_context, max_new_tokens, system, self.name,
                            get_family(self.spec.family).build_prompt, max_prompt_tokens)

    def raw_text_ids(self, text: str) -> list[int]:
        return raw_text_ids(self._tokenizer_for("token ids of a text"), text)

    def conversation_ids(self, messages: Sequence[Message]) -> list[int]:
        return conversation_prompt_ids(self._tokenizer_for("the ids of a conversation"), messages,
                                       get_family(self.spec.family).build_prompt)

    def token_pieces(self, ids: Sequence[int]) -> list[str]:
        return attribution.token_pieces(self._tokenizer_for("token pieces").decode, ids)

    def _tokenizer_for(self, what: str) -> Any:
        if self.tokenizer is None:
            raise NeedsLocalModel(f"{self.name} runs on {self.capabilities.where} and has no local tokenizer "
                                  f"(source.openai.tokenizer in models.yaml): {what} needs one")
        return self.tokenizer

    # --- what only a local model computes (Backend methods a server cannot serve) ------------------------------
    def shape(self) -> tuple[int, int]:
        raise needs_local(self, "the model's shape", "its config")

    def generate(self, **kwargs: Any) -> Iterator[Event]:
        raise needs_local(self, "generation from token ids")

    def generate_assisted(self, draft: Backend, input_ids: Sequence[int], params: SamplingParams,
                          **kwargs: Any) -> Iterator[Event]:
        raise needs_local(self, "speculative decoding")

    def generate_rows(self, input_ids: Sequence[int], params: Sequence[SamplingParams],
                      **kwargs: Any) -> Iterator[Event]:
        raise needs_local(self, "rows decoded in one batch")

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: Any, **kwargs: Any) -> Iterator[Event]:
        raise needs_local(self, "a left-padded batch")

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[list[float]]:
        raise needs_local(self, "scoring")

    def next_token_logits(self, ids: Sequence[int], state: Any = None) -> torch.Tensor:
        raise needs_local(self, "the next-token distribution")

    def logit_lens(self, ids: Sequence[int], positions: Sequence[int], sublayers: bool = False, top: int = 10, *,
                   should_stop: ShouldStop | None = None, state: Any = None) -> lens.LensGrid:
        raise needs_local(self, "the logit lens", "weights and activations")

    def gradient_x_input(self, context: Sequence[int], target: int, *, should_stop: ShouldStop | None = None
                         ) -> attribution.Attribution:
        raise needs_local(self, "gradient × input", "weights and activations")

    def occlusion(self, context: Sequence[int], target: int, units: Sequence[attribution.Unit], *,
                  should_stop: ShouldStop | None = None) -> attribution.Attribution:
        raise needs_local(self, "occlusion")

    def score(self, ids: Sequence[int], first: int = 1, *, should_stop: ShouldStop | None = None,
              state: Any = None) -> scoring.TextScore:
        raise needs_local(self, "scoring a text")

    def divergence(self, other: Backend, ids: Sequence[int], first: int = 1, *,
                   should_stop: ShouldStop | None = None) -> scoring.Divergence:
        raise needs_local(self, "a divergence")

    def attention(self, ids: Sequence[int], *, should_stop: ShouldStop | None = None) -> np.ndarray:
        raise needs_local(self, "attention maps", "weights and activations")

    def rope_info(self) -> introspect.RopeInfo:
        raise needs_local(self, "RoPE figures", "the model's modules")

    def rope_angles(self, positions: int) -> np.ndarray:
        raise needs_local(self, "RoPE figures", "the model's modules")

    def rope_decay(self, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        raise needs_local(self, "RoPE figures", "the model's modules")

    def alibi_info(self, positions: int) -> introspect.AlibiInfo:
        raise needs_local(self, "ALiBi figures", "the model's modules")

    def model_card(self) -> dict[str, Any]:
        raise needs_local(self, "the model card", "the model's config and weights")

    # --- the stream --------------------------------------------------------------------------------------------
    def _client(self) -> Any:
        env = self.source.api_key_env
        key = os.environ.get(env) if env else None
        if env and not key:
            raise RemoteError(f"{self.name}: the server at {self.server} needs an API key: set the environment "
                              f"variable {env} (models.yaml names it in source.openai.api_key_env)")
        if self._client_factory is not None:
            return self._client_factory(base_url=self.source.base_url, api_key=key or "none")
        import openai  # optional for local-only servers: imported once a remote entry is used

        return openai.OpenAI(base_url=self.source.base_url, api_key=key or "none", max_retries=0,
                             timeout=self.timeout_s)

    def chat(self, messages: Sequence[Message], prompt: Prompt, params: SamplingParams,
             stop_event: threading.Event | None = None, top_n: int = 20, time_limit_s: float | None = None,
             state: DecodeState | None = None) -> Iterator[Event]:
        """The answer to `messages` as qdemo events; the server applies its own chat template (messages in the
        prompt's `dropped_turns` are left out, as the local tokenizer fitted them). No decode state: the server
        keeps its own cache."""
        dropped = set(prompt.dropped_turns)
        sent = with_system([dict(m) for i, m in enumerate(messages) if i not in dropped], self.spec.system_prompt)
        return self._events("chat", sent, params, stop_event, top_n, prompt.ids, prompt.dropped_turns,
                            time_limit_s)

    def complete(self, text: str, params: SamplingParams, stop_event: threading.Event | None = None,
                 top_n: int = 20, time_limit_s: float | None = None) -> Iterator[Event]:
        """A raw-text continuation through /v1/completions."""
        ids = self.tokenizer.encode(text, add_special_tokens=False) if self.tokenizer is not None else ()
        return self._events("text", text, params, stop_event, top_n, ids, (), time_limit_s)

    def _request(self, client: Any, kind: str, payload: Any, params: SamplingParams, top_n: int) -> Any:
        k = max(0, min(int(top_n), MAX_TOP_LOGPROBS))
        extra: dict[str, Any] = {}
        common: dict[str, Any] = {"model": self.source.model, "stream": True, "max_tokens": params.max_new_tokens}
        if params.do_sample:
            common["temperature"] = params.temperature
            if params.top_p is not None and params.top_p < 1.0:
                common["top_p"] = params.top_p
            if params.top_k:
                extra["top_k"] = params.top_k
            if params.min_p:
                extra["min_p"] = params.min_p
        else:
            common["temperature"] = 0.0
            extra["top_k"] = 1  # greedy on servers whose temperature 0 still samples
        if params.seed is not None:
            common["seed"] = params.seed
        if params.repetition_penalty and params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
            extra["repeat_penalty"] = params.repetition_penalty  # llama.cpp's name …
            extra["repeat_last_n"] = -1  # … over the whole context, as transformers applies it (llama.cpp: last 64)
        common["stream_options"] = {"include_usage": True}
        if kind == "chat":
            return client.chat.completions.create(messages=payload, logprobs=k > 0, top_logprobs=k or None,
                                                  extra_body=extra, **common)
        return client.completions.create(prompt=payload, logprobs=k or None, extra_body=extra, **common)

    def _open(self, kind: str, payload: Any, params: SamplingParams, top_n: int,
              stop_event: threading.Event | None = None, deadline: float | None = None) -> Any:
        """The open stream. Connection errors are retried (with backoff) before anything streamed; Stop and the
        deadline end a request the server holds (a long prefill, a wait for a free slot) by closing its client."""
        import openai  # optional for local-only servers (see _client)

        for attempt in range(CONNECT_RETRIES + 1):
            client = self._client()
            try:
                return _interruptible(lambda: self._request(client, kind, payload, params, top_n), stop_event,
                                      deadline)
            except openai.APIError as exc:
                if stop_event is not None and stop_event.is_set():
                    raise _Stopped("stopped") from None
                if deadline is not None and time.perf_counter() > deadline:
                    raise _Stopped("time_limit") from None
                if isinstance(exc, openai.APITimeoutError):
                    raise RemoteError(f"{self.name}: the server at {self.server} did not answer within "
                                      f"{self.timeout_s:.0f} s") from None
                if isinstance(exc, openai.APIStatusError):
                    raise RemoteError(self._status_message(exc)) from None
                if not isinstance(exc, openai.APIConnectionError) or attempt == CONNECT_RETRIES:
                    raise RemoteError(f"{self.name}: cannot reach the server at {self.server} "
                                      f"({_cause(exc)}); is it running? tried {attempt + 1} times") from None
                log.info("%s: connection to %s failed (%s); retrying", self.name, self.server, _cause(exc))
            if stop_event is not None and stop_event.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
                raise _Stopped("stopped")
            if stop_event is None:
                time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        raise AssertionError("unreachable")

    def _status_message(self, exc: Any) -> str:
        said = _server_words(exc)
        status = exc.status_code
        if status in (401, 403):
            env = self.source.api_key_env
            where = f"the key in ${env}" if env else "a missing API key (set source.openai.api_key_env)"
            return f"{self.name}: the server at {self.server} refused {where} (HTTP {status}{said})"
        if status == 404:
            return (f"{self.name}: the server at {self.server} has no model {self.source.model!r} or no such "
                    f"endpoint (HTTP 404{said})")
        return f"{self.name}: the server at {self.server} answered HTTP {status}{said}"

    def _events(self, kind: str, payload: Any, params: SamplingParams, stop_event: threading.Event | None,
                top_n: int, prompt_ids: Sequence[int], dropped_turns: Sequence[int],
                time_limit_s: float | None) -> Iterator[Event]:
        began = time.perf_counter()
        deadline = began + time_limit_s if time_limit_s is not None else None
        try:
            stream = self._open(kind, payload, params, top_n, stop_event, deadline)  # RemoteError: no event yet
        except _Stopped as stopped:
            return self._ended(stopped.reason, tuple(int(i) for i in prompt_ids), tuple(dropped_turns), began)
        return self._fold(stream, kind, params, stop_event, tuple(int(i) for i in prompt_ids),
                          tuple(dropped_turns), time_limit_s, began)

    def _ended(self, reason: str, prompt_ids: tuple[int, ...], dropped_turns: tuple[int, ...], began: float
               ) -> Iterator[Event]:
        """The events of an answer stopped (or timed out) before the server sent anything."""
        seconds = time.perf_counter() - began
        yield PrefillEvent(prompt_ids=prompt_ids, prefill_seconds=seconds, dropped_turns=dropped_turns, seed=None,
                           kv_cache_bytes=0, memory=NO_MEMORY)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), new_tokens=0, ttft_seconds=seconds,
                                prefill_seconds=seconds, prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0,
                                total_seconds=seconds, peak_memory_bytes=0)
        yield DoneEvent(reason=reason, stats=stats, text="", token_ids=())

    def _fold(self, stream: Any, kind: str, params: SamplingParams, stop_event: threading.Event | None,
              prompt_ids: tuple[int, ...], dropped_turns: tuple[int, ...], time_limit_s: float | None,
              began: float) -> Iterator[Event]:
        """The open stream as qdemo events: a prefill event at the first token, one token event per token, and a
        done event whose reason says how the stream ended."""
        fold = _Fold(began=began, prompt_ids=prompt_ids, dropped_turns=dropped_turns,
                     seed=params.seed if params.do_sample else None)
        deadline = began + time_limit_s if time_limit_s is not None else None
        watching = _watch(stream, stop_event, deadline)  # Stop and the time limit also while the server is silent
        try:
            for chunk in stream:
                fold.note_usage(chunk)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                for label, token_id, stage, raw in self._tokens(kind, choice):
                    yield from fold.token(label, token_id, stage, raw)
                fold.note_finish(choice)
                interrupted = _interrupted(stop_event, deadline)
                if interrupted:
                    fold.reason = interrupted
                    break
        except Exception as exc:  # noqa: BLE001 - sorted by _stream_error: the server's faults end the answer
            error = self._stream_error(exc, len(fold.ids))
            if error is None:
                raise
            fold.reason, fold.error = "error", error
        finally:
            watching.set()
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self._settle(fold, stop_event, deadline)
        yield from fold.closing()

    def _stream_error(self, exc: Exception, tokens: int) -> str | None:
        """The message for a stream that failed after `tokens` tokens: a timeout, a broken connection or a
        malformed stream (bad JSON, cut SSE, odd fields). None for an exception that is not the server's doing
        (a bug here: it propagates)."""
        import openai  # optional for local-only servers (see _client)

        if isinstance(exc, openai.APITimeoutError):
            return (f"{self.name}: the server at {self.server} stopped sending for {self.timeout_s:.0f} s after "
                    f"{tokens} tokens")
        if isinstance(exc, (openai.APIConnectionError, openai.APIError)):
            return f"{self.name}: the stream from {self.server} broke off after {tokens} tokens ({_cause(exc)})"
        if type(exc).__module__.startswith(("httpx", "httpcore", "json", "pydantic")) or isinstance(
                exc, (ValueError, KeyError, TypeError, AttributeError)):
            return (f"{self.name}: the server at {self.server} sent a malformed stream after {tokens} tokens "
                    f"({type(exc).__name__})")
        return None

    def _settle(self, fold: _Fold, stop_event: threading.Event | None, deadline: float | None) -> None:
        """The answer's final reason once the stream is closed: Stop and the time limit win over whatever closing
        the stream raised, and a stream that ended without a finish reason is an error (the answer may be cut)."""
        if stop_event is not None and stop_event.is_set():
            fold.reason, fold.error = "stopped", None
        elif deadline is not None and time.perf_counter() > deadline and not fold.finished:
            fold.reason, fold.error = "time_limit", None
        elif fold.error is None and fold.reason == "eos" and not fold.finished:
            fold.reason, fold.error = "error", (f"{self.name}: the stream from {self.server} ended without saying "
                                                f"why after {len(fold.ids)} tokens (no finish reason): the answer may "
                                                f"be cut")

    def _tokens(self, kind: str, choice: Any) -> Iterator[tuple[str, int, StageTopN | None, bytes | None]]:
        """(label, id, stage, raw bytes or None) per token of one streamed chunk."""
        logprobs = getattr(choice, "logprobs", None)
        if kind == "chat":
            content = (getattr(logprobs, "content", None) or []) if logprobs is not None else []
            if content:
                for item in content:
                    yield self._token(item)
                return
            delta = getattr(getattr(choice, "delta", None), "content", None)
        else:
            delta = getattr(choice, "text", None)
            entries = (getattr(logprobs, "content", None) or (getattr(logprobs, "model_extra", None) or {}).get(
                "content")) if logprobs is not None else None
            if entries:  # llama.cpp: chat-style entries with token ids
                for item in entries:
                    yield self._token(item)
                return
            if logprobs is not None and getattr(logprobs, "tokens", None):
                for j, token in enumerate(logprobs.tokens):
                    top = (logprobs.top_logprobs or [None] * len(logprobs.tokens))[j] or {}
                    lp = logprobs.token_logprobs[j]
                    yield (*self._token_from(token, None, lp, [(t, None, v) for t, v in top.items()]), None)
                return
        if delta:  # a server that sends no log-probabilities: the text alone
            yield delta, self._id_for(delta, None), None, None

    def _token(self, item: Any) -> tuple[str, int, StageTopN | None, bytes | None]:
        top = [(_label(t), _id_of(t), _field(t, "logprob")) for t in (_field(item, "top_logprobs") or [])]
        return (*self._token_from(_label(item), _id_of(item), _field(item, "logprob"), top), _bytes_of(item))

    def _token_from(self, text: str, token_id: int | None, logprob: float | None,
                    top: list[tuple[str, int | None, float]]) -> tuple[str, int, StageTopN | None]:
        chosen = self._id_for(text, token_id)
        if logprob is None:
            return text, chosen, None
        ids, probs = [], []
        for t, i, lp in top:
            ids.append(self._id_for(t, i))
            probs.append(math.exp(lp) if lp is not None and lp > -1e30 else 0.0)
        stage = StageTopN(name="raw", token_ids=tuple(ids), probs=tuple(probs),
                          chosen_prob=math.exp(logprob) if logprob > -1e30 else 0.0,
                          argmax_prob=probs[0] if probs else None)
        return text, chosen, stage

    def _id_for(self, text: str, token_id: int | None) -> int:
        """The server's id when it numbers tokens (llama.cpp does), else the local tokenizer's when the text is
        one token there, else a stable negative id for this text (views label it by its text)."""
        with self._lock:
            if isinstance(token_id, int) and token_id >= 0:
                self._texts.setdefault(token_id, text)
                return token_id
            if self.tokenizer is not None and text:
                pieces = self.tokenizer.encode(text, add_special_tokens=False)
                if len(pieces) == 1:
                    self._texts.setdefault(pieces[0], text)
                    return int(pieces[0])
            if text not in self._synthetic:
                self._synthetic[text] = -1 - len(self._synthetic)
                self._texts[self._synthetic[text]] = text
            return self._synthetic[text]


@dataclass
class _Fold:
    """One answer's stream so far (the tokens, their timings, how it ended) and the events it makes."""

    began: float
    prompt_ids: tuple[int, ...]
    dropped_turns: tuple[int, ...]
    seed: int | None  # the prefill event's: the sampling seed, None when greedy
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    first_at: float | None = None
    last_at: float = 0.0
    finished: bool = False  # the server sent a finish reason
    reason: str = "eos"
    error: str | None = None
    usage_prompt: int | None = None  # the server's count of the prompt, when it sends usage
    # a character split across tokens arrives whole in the text
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def __post_init__(self) -> None:
        self.last_at = self.began

    def note_usage(self, chunk: Any) -> None:
        if getattr(chunk, "usage", None) is not None:
            self.usage_prompt = getattr(chunk.usage, "prompt_tokens", None)

    def note_finish(self, choice: Any) -> None:
        finish = getattr(choice, "finish_reason", None)
        if finish:
            self.reason = "max_tokens" if finish == "length" else "eos"
            self.finished = True

    def token(self, label: str, token_id: int, stage: StageTopN | None, raw: bytes | None) -> Iterator[Event]:
        """The events of one streamed token: the prefill event first when it is the answer's first."""
        text = self.utf8.decode(raw) if raw is not None else label
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
            yield PrefillEvent(prompt_ids=self.prompt_ids, prefill_seconds=now - self.began,
                               dropped_turns=self.dropped_turns, seed=self.seed, kv_cache_bytes=0, memory=NO_MEMORY)
        self.step_times.append(now - self.last_at)
        self.last_at = now
        self.ids.append(token_id)
        self.texts.append(text)
        yield TokenEvent(step=len(self.ids) - 1, token_id=token_id, text=text, stages=(stage,) if stage else (),
                         step_seconds=self.step_times[-1], kv_cache_bytes=0, memory=NO_MEMORY)

    def closing(self) -> Iterator[Event]:
        """The events that end the answer: a prefill event if no token came, then the done event."""
        if self.first_at is None:
            yield PrefillEvent(prompt_ids=self.prompt_ids, prefill_seconds=time.perf_counter() - self.began,
                               dropped_turns=self.dropped_turns, seed=None, kv_cache_bytes=0, memory=NO_MEMORY)
        yield DoneEvent(reason=self.reason, stats=self.stats(),
                        text="".join(self.texts) + self.utf8.decode(b"", final=True), token_ids=tuple(self.ids),
                        error=self.error)

    def stats(self) -> GenerationStats:
        total = time.perf_counter() - self.began
        ttft = (self.first_at - self.began) if self.first_at is not None else total
        decode = sum(self.step_times[1:])
        prompt_count = self.usage_prompt if self.usage_prompt is not None else len(self.prompt_ids)
        return GenerationStats(prompt_tokens=prompt_count, new_tokens=len(self.ids), ttft_seconds=ttft,
                               prefill_seconds=ttft, prefill_tokens_per_s=prompt_count / ttft if ttft > 0 else 0.0,
                               decode_tokens_per_s=(len(self.ids) - 1) / decode if decode > 0 else 0.0,
                               total_seconds=total, peak_memory_bytes=0)


def _interrupted(stop_event: threading.Event | None, deadline: float | None) -> str | None:
    """Why the answer must end now: "stopped" (Stop was pressed), "time_limit" (the deadline passed), or None."""
    if stop_event is not None and stop_event.is_set():
        return "stopped"
    if deadline is not None and time.perf_counter() > deadline:
        return "time_limit"
    return None


def _interruptible(open_stream: Callable[[], Any], stop_event: threading.Event | None, deadline: float | None
                   ) -> Any:
    """`open_stream()` (which blocks until the server starts its answer) in a worker thread, so Stop and the
    deadline end the wait at once (_Stopped); a stream opened after that is closed when it arrives."""
    if stop_event is None and deadline is None:
        return open_stream()
    box: dict[str, Any] = {}
    ready = threading.Event()

    def call() -> None:
        try:
            box["stream"] = open_stream()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc
        finally:
            ready.set()

    threading.Thread(target=call, name="qdemo-remote-open", daemon=True).start()
    while not ready.wait(0.1):
        reason = _interrupted(stop_event, deadline)
        if reason:
            def close_late() -> None:
                ready.wait()
                stream = box.get("stream")
                if stream is not None:
                    stream.close()

            threading.Thread(target=close_late, name="qdemo-remote-close", daemon=True).start()
            raise _Stopped(reason)
    if "error" in box:
        raise box["error"]
    return box["stream"]


def _watch(stream: Any, stop_event: threading.Event | None, deadline: float | None) -> threading.Event:
    """Close `stream` when Stop is pressed or the deadline passes, even while the server sends nothing (a long
    prefill, a queue for a free slot). Returns the event that ends the watch."""
    done = threading.Event()
    if stop_event is None and deadline is None:
        return done

    def watch() -> None:
        while not done.wait(0.1):
            if _interrupted(stop_event, deadline):
                close = getattr(stream, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - the reader sees the closed stream either way
                        pass
                return

    threading.Thread(target=watch, name="qdemo-remote-watch", daemon=True).start()
    return done


def _field(item: Any, name: str) -> Any:
    """A field of a logprob entry, whether the client parsed it (chat) or left it a dict (llama.cpp's
    /v1/completions puts chat-style entries in an extra `content` field)."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _label(item: Any) -> str:
    """A token's text for labels: its bytes decoded (a partial character shows as �), else its token string."""
    raw = _bytes_of(item)
    return raw.decode("utf-8", errors="replace") if raw is not None else (_field(item, "token") or "")


def _id_of(item: Any) -> int | None:
    """The server's token id (llama.cpp sends one; the OpenAI schema has none, so the client keeps it extra)."""
    if isinstance(item, dict):
        return item.get("id")
    return (getattr(item, "model_extra", None) or {}).get("id")


def _bytes_of(item: Any) -> bytes | None:
    raw = _field(item, "bytes")
    return bytes(raw) if raw else None


def _cause(exc: BaseException) -> str:
    """The root cause in a few words ("connection refused"), never a URL with credentials or headers."""
    seen = exc
    while getattr(seen, "__cause__", None) is not None:
        seen = seen.__cause__
    words = str(seen).strip() or type(seen).__name__
    if "Connection refused" in words or "ConnectError" in type(seen).__name__:
        return "connection refused"
    return words.splitlines()[0][:120]


def _server_words(exc: Any) -> str:
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else str(inner)
    return f": {str(message)[:200]}" if message else ""
