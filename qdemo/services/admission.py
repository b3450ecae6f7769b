"""One admission for every request that runs a model: the Chat, Compare, Lab and Internals events and the named
API endpoints all pass the same checks in the same order, and refusals come back in one shape.

rate limit → model name and forward → sampling settings (validated, capped) → load (with progress) → lease, and the
leased backends for the request's duration. Anything the user can act on is a `Refused` with a message that names the
model, field or value; nothing here knows about Gradio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from qdemo.errors import QdemoError
from qdemo.forwards import llama_cpp
from qdemo.forwards.choice import pick_forward, split_ref
from qdemo.models.loader import (
    describe_run,
    entry_key,
    gguf_quant,
    load_tokenizer,
    pick_device,
)
from qdemo.models.registry import GgufPartsSource, OpenAISource, Registry
from qdemo.models.sources import ProgressFn, readiness
from qdemo.sampling import SamplingParams
from qdemo.services.kept_states import KeptStates
from qdemo.serving.limits import Client, Limits, RateLimiter
from qdemo.serving.local import drafting_pays, leased
from qdemo.serving.pool import ModelPool
from qdemo.serving.protocol import Backend, needs_local
from qdemo.serving.remote import RemoteBackend, server_label
from qdemo.store import Store

MAX_ECHO = 60  # characters of a bad value quoted back in a message
# An absolute path (two or more segments) not glued to a word: "Qwen/Qwen2.5-7B" stays, "/home/x/.cache" goes.
_SERVER_PATH = re.compile(r"(?<![\w.@-])(?:/[\w.@+-]+){2,}/?")


class Refused(QdemoError):
    """A request turned away; the message is for the user."""


@dataclass(frozen=True)
class ModelRequest:
    """One model a request needs, and the sampling settings it runs with (None: it samples nothing)."""

    model: str | None  # a registry name, optionally with its forward: "name [torch]", "name [llama.cpp]"
    settings: SamplingParams | Mapping[str, Any] | None = None
    sampling: bool = True
    weights: bool = False  # the panel reads weights and activations: the torch copy, whatever the forward


@dataclass
class Admitted:
    backends: list[Backend]
    params: list[SamplingParams | None]
    notices: list[str] = field(default_factory=list)

    @property
    def backend(self) -> Backend:
        return self.backends[0]

    @property
    def notice(self) -> str:
        return " ".join(dict.fromkeys(n for n in self.notices if n))


def without_paths(text: str) -> str:
    """A message for the page: the server's file system stays private (the operator's log has the details)."""
    return _SERVER_PATH.sub("<server path>", text)


def echo(value: Any) -> str:
    """A value quoted back to the user, never longer than MAX_ECHO characters."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 1] + "…"


@dataclass
class Services:
    """App-wide pieces shared by every session. Nothing here belongs to one user: the pool holds shared models,
    and the rate limiter only timestamps keyed by client."""

    registry: Registry
    pool: ModelPool
    default_model: str
    limits: Limits = field(default_factory=Limits)
    rates: RateLimiter | None = None
    allow_downloads: bool = False  # a request may start a hub download (the operator's choice: --allow-downloads)
    preload: Any = None  # the default model's background load at start (qdemo.services.preload.Preload)
    store: Store | None = None  # the run store (qdemo.store): runs, sweeps and votes that outlast the server
    states: KeptStates | None = None  # decode states sessions keep between turns (made over the pool by default)
    arena: Any = None  # the blind arena's contenders and battles (qdemo.services.arena.Arena), made on first use
    _remotes: dict[str, RemoteBackend] = field(default_factory=dict, repr=False)  # one backend per remote entry
    _remote_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.rates is None:
            self.rates = RateLimiter(self.limits.requests_per_minute, self.limits.requests_per_minute_per_address)
        if self.states is None:
            self.states = KeptStates(self.pool)

    # --- models offered -----------------------------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        """(label, name) for the model dropdowns: each label says whether the model is ready here."""
        out = []
        for name, spec in self.registry.models.items():
            ready = readiness(spec)
            mark = "✓" if ready.ready else "✗"
            out.append((f"{mark} {spec.display_name} · {ready.state}", name))  # the mark first: labels get cut
        return out

    def model_info(self, name: str, choice: str | None = None) -> str:
        """One line under a model dropdown: which forward runs it here, or what it needs."""
        try:
            spec = self.registry.get(name)
            if isinstance(spec.source, OpenAISource):
                local = f"; {spec.source.tokenizer} is it locally" if spec.source.tokenizer else ""
                return (f"runs on a **remote server** ({server_label(spec.source.base_url)}, model "
                        f"{spec.source.model}) · token probabilities as the server reports them · panels that read "
                        f"weights need a local model{local}")
            picked = pick_forward(spec, self.pool_device_type(), choice)
        except (QdemoError, ValueError) as exc:
            return f"⚠️ {exc}"
        ready = readiness(spec)
        if not ready.ready:
            return f"✗ **not ready here**: {ready.hint}"
        if picked.forward == "llama.cpp":
            return (f"runs as **llama.cpp {gguf_quant(spec) or 'GGUF'}** on this CPU "
                    f"({llama_cpp.default_threads()} threads) · "
                    f"{ready.state} · attention and RoPE panels load the torch copy")
        line = f"runs as **{describe_run(spec, self.pool.device)}** · {ready.state}"
        return f"{line} · {picked.note}" if picked.note else line

    def forward_choices(self, name: str) -> list[str]:
        """The forwards the user may pick for `name` here ([] when only one can run: torch)."""
        spec = self.registry.models.get(name)
        if spec is None or not isinstance(spec.source, GgufPartsSource) or llama_cpp.available() is not None:
            return []
        return ["auto", "llama.cpp", "torch"]

    def pool_device_type(self) -> str:
        return pick_device(self.pool.device).type

    def model_ref(self, model: Any, weights: bool = False) -> tuple[str, str]:
        """(registry name, forward) of a request's model: its forward as asked ("name [torch]"), the server's
        choice for a bare name, torch for a panel that reads weights."""
        if model is not None and not isinstance(model, str):
            raise Refused(f"model must be a model name (text), got {type(model).__name__}")
        name, asked = split_ref(model) if model else (model, None)
        name = self.model_name(name)
        source = self.registry.get(name).source
        if isinstance(source, OpenAISource):
            if weights:
                local = (f" {source.tokenizer} is this model locally: pick it for this panel." if source.tokenizer
                         else "")
                raise Refused(f"{name} runs on a remote server ({server_label(source.base_url)}): this panel reads the "
                              f"weights and activations, which need a local model.{local}")
            return name, "remote"
        if weights:
            return name, "torch"
        try:
            return name, pick_forward(self.registry.get(name), self.pool_device_type(), asked).forward
        except ValueError as exc:
            raise Refused(str(exc)) from None

    def remote(self, name: str, progress: ProgressFn | None = None) -> RemoteBackend:
        """The backend of a remote entry (one per entry: it remembers the token texts its server sent). Its local
        tokenizer entry, when it names one, lends its tokenizer only — never its weights."""
        with self._remote_lock:  # two first requests build it once
            return self._remote(name, progress)

    def _remote(self, name: str, progress: ProgressFn | None) -> RemoteBackend:
        backend = self._remotes.get(name)
        if backend is None:
            spec = self.registry.get(name)
            tokenizer = None
            lender = None
            if spec.source.tokenizer:
                lender = self.registry.get(spec.source.tokenizer)
            elif spec.source.tokenizer_source is not None:  # a source named for its tokenizer files only
                lender = dataclasses.replace(spec, name=f"{spec.name}-tokenizer", source=spec.source.tokenizer_source)
            if lender is not None:
                ready = readiness(lender)
                if not ready.ready and not self.allow_downloads:
                    raise Refused(f"{name}: its tokenizer ({lender.name}) is not available on this server: "
                                  f"{ready.hint} This server does not download models; its operator can.")
                try:
                    tokenizer = load_tokenizer(lender, progress)
                except (QdemoError, ValueError, OSError) as exc:
                    raise Refused(f"{name}: could not load the tokenizer of {lender.name}: "
                                  f"{without_paths(str(exc))}") from None
            backend = self._remotes[name] = RemoteBackend(spec, tokenizer)
        return backend

    @staticmethod
    def need_logits(backend: Backend, what: str) -> None:
        """Refuse `what` on a backend without full logits (a remote server reports only its top-N)."""
        if not backend.capabilities.stage_chain:
            raise Refused(str(needs_local(backend, what)))

    def model_name(self, model: Any) -> str:
        """A registry name ('' or None: the default). Never a path or hub id: only what models.yaml lists, and only
        a model that is ready here unless the operator allows downloads."""
        if model is not None and not isinstance(model, str):
            raise Refused(f"model must be a model name (text), got {type(model).__name__}")
        name = model or self.default_model
        if name not in self.registry.models:
            raise Refused(f"unknown model {echo(name)}; this server has: {', '.join(self.registry.names())}")
        if not self.allow_downloads and not any(split_ref(k)[0] == name for k in self.pool.loaded()):
            ready = readiness(self.registry.get(name))
            if not ready.ready:
                raise Refused(f"{name} is not available on this server: {ready.hint} This server does not "
                              "download models on request (its operator can start it with --allow-downloads).")
        return name

    def params(self, name: str, settings: SamplingParams | Mapping[str, Any] | None) -> tuple[SamplingParams, str]:
        """Settings over the model's defaults, validated, with max_new_tokens capped at the server's limit."""
        if isinstance(settings, SamplingParams):
            params = settings
        else:
            if settings is not None and not isinstance(settings, Mapping):
                raise Refused(f"settings must be a JSON object of sampling fields, got {type(settings).__name__}")
            try:
                params = self.registry.get(name).sampling.replace(**dict(settings or {}))
            except (TypeError, ValueError, OverflowError) as exc:
                raise Refused(f"sampling settings: {exc}") from None
        limit = self.limits.max_new_tokens
        if params.max_new_tokens <= limit:
            return params, ""
        return (params.replace(max_new_tokens=limit),
                f"max new tokens lowered from {params.max_new_tokens} to this server's limit of {limit}.")

    def drafting_by_default(self) -> bool:
        """Speculative decoding on unless asked otherwise: where it pays on this server's device."""
        return drafting_pays(self.pool.device)

    # --- admission ----------------------------------------------------------------------------------------------
    def check_rate(self, client: Client | str | None) -> None:
        refusal = self.rates.check(client)
        if refusal:
            raise Refused(refusal)

    @contextlib.contextmanager
    def admit(self, client: Client | str | None, *requests: ModelRequest, progress: ProgressFn | None = None
              ) -> Iterator[Admitted]:
        """The request's models, loaded and leased behind their gated backends, for the block's duration."""
        self.check_rate(client)
        refs = [self.model_ref(r.model, r.weights) for r in requests]
        names = [name for name, _ in refs]
        params: list[SamplingParams | None] = []
        notices: list[str] = []
        for name, request in zip(names, requests):
            if not request.sampling:
                params.append(None)
                continue
            p, notice = self.params(name, request.settings)
            params.append(p)
            notices.append(notice)
        with contextlib.ExitStack() as stack:
            backends = []
            for (name, forward), request in zip(refs, requests):
                if forward == "remote":
                    backends.append(self.remote(name, progress))
                    continue
                if request.weights and progress and entry_key(name, forward) not in self.pool.loaded() and \
                        self.model_ref(name)[1] != forward:
                    progress(f"loading the torch copy of {name} for this panel (chat keeps its own forward)", 0, 1)
                try:
                    backends.append(stack.enter_context(leased(self.pool, name, progress, forward)))
                except Refused:
                    raise
                except (QdemoError, ValueError, OSError, RuntimeError) as exc:
                    raise Refused(f"Could not load {name}: {without_paths(str(exc))}") from None
            yield Admitted(backends=backends, params=params, notices=notices)
