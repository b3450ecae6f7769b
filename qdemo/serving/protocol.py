"""What the services may ask of a model: the `Backend` protocol and the `Capabilities` that say what it can feed.

Two backends implement it: `LocalBackend` (a pooled model of this process, every forward through its step gate)
and `RemoteBackend` (a model on an OpenAI-compatible server, which streams tokens with their top log-probabilities
and nothing that needs the weights). Services and the UI read `capabilities` to decide what to offer and to refuse
with a message naming the model; they never probe a backend's type or attributes. A remote backend answers the
methods it cannot serve with `NeedsLocalModel`, which says what a local model would give.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from qdemo.core.decode import DecodeState, ShouldStop
from qdemo.core.events import Event
from qdemo.models.prompting import Message, Prompt
from qdemo.models.registry import ModelSpec
from qdemo.probes import attribution, introspect, lens, scoring
from qdemo.sampling import SamplingParams


@dataclass(frozen=True)
class Capabilities:
    """What a backend can show."""

    stage_chain: bool = True  # full logits at every step: per-stage distributions, the sampling lab
    attention: bool = True  # attention weights (needs the weights and activations)
    positions: bool = True  # RoPE / ALiBi figures read from the model's own modules
    model_card: bool = True
    rows: bool = True  # decodes several rows in one batch and keeps a decode state between turns
    where: str = "this server"  # where it runs, for messages ("a remote server (host:8080)")
    local_twin: str | None = None  # a registry entry of the same model that runs here, for messages


class NeedsLocalModel(ValueError):
    """A backend was asked for something only a local model computes (full logits, weights, activations)."""


def needs_local(backend: "Backend", what: str, needs: str = "full logits") -> NeedsLocalModel:
    """The refusal for `what` on `backend`: names the model, where it runs, and the local twin when there is one."""
    caps = backend.capabilities
    also = f"; {caps.local_twin} is this model locally" if caps.local_twin else ""
    return NeedsLocalModel(f"{backend.name} runs on {caps.where}, which reports only its top tokens: {what} needs "
                           f"{needs}, which needs a local model{also}")


class Backend(Protocol):
    """A model leased for one request. Its facts are plain attributes, set once when it is made."""

    name: str
    key: str  # its copy's name: "name" on torch, "name [llama.cpp]", "name [remote]"
    forward: str  # "torch", "llama.cpp" or "remote"
    forward_label: str  # how it runs, in a few words: "llama.cpp Q4_K_M", "torch fp32", "remote host:8080"
    spec: ModelSpec
    max_context: int  # tokens it may see (models.yaml's, capped by the checkpoint)
    context_note: str  # why max_context is below what models.yaml asks, when it is
    capabilities: Capabilities
    position_encoding: str  # "rope" or "alibi"
    position_note: str

    # --- text and tokens (no forward) ---------------------------------------------------------------------------
    def vocabulary(self) -> str | None:
        """A digest of its token → id table (None: unknown), equal for backends that read ids the same way."""
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def token_texts(self, ids: Sequence[int]) -> dict[int, str]:
        """Each id decoded on its own."""
    def text_decoder(self) -> Callable[[Sequence[int]], dict[int, str]]:
        """`token_texts` that outlives the lease (it holds the tokenizer, never the weights)."""
    def token_pieces(self, ids: Sequence[int]) -> list[str]: ...
    def special_ids(self) -> set[int]: ...
    def prompt_pieces(self, ids: Sequence[int]) -> list[tuple[int, str, bool]]: ...
    def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` as plain text (None: no tokenizer here to count with)."""
    def chat_prompt(self, messages: Sequence[Message], max_new_tokens: int, system: str | None = None,
                    max_prompt_tokens: int | None = None) -> Prompt: ...
    def raw_text_ids(self, text: str) -> list[int]: ...
    def conversation_ids(self, messages: Sequence[Message]) -> list[int]: ...
    def shape(self) -> tuple[int, int]: ...

    # --- streams ------------------------------------------------------------------------------------------------
    def batch_pays(self, rows: int = 2) -> bool:
        """Whether `rows` rows decode faster in one batch than one after the other here."""
    def new_state(self) -> DecodeState | None:
        """An empty decode state a chat keeps between turns (None: the server keeps its own cache)."""
    def chat(self, messages: Sequence[Message], prompt: Prompt, params: SamplingParams,
             stop_event: threading.Event | None = None, top_n: int = 20, time_limit_s: float | None = None,
             state: DecodeState | None = None) -> Iterator[Event]:
        """The answer to `messages`, whose prompt `chat_prompt` built (its dropped turns are left out)."""
    def complete(self, text: str, params: SamplingParams, stop_event: threading.Event | None = None,
                 top_n: int = 20, time_limit_s: float | None = None) -> Iterator[Event]:
        """A continuation of raw text."""
    def generate(self, *, messages: Sequence[Message] | None = None, input_ids: Sequence[int] | None = None,
                 params: SamplingParams | None = None, stop_event: threading.Event | None = None, top_n: int = 20,
                 dropped_turns: Sequence[int] = (), time_limit_s: float | None = None, ignore_eos: bool = False,
                 state: DecodeState | None = None) -> Iterator[Event]: ...
    def generate_assisted(self, draft: "Backend", input_ids: Sequence[int], params: SamplingParams,
                          stop_event: threading.Event | None = None, top_n: int = 20,
                          dropped_turns: Sequence[int] = (), time_limit_s: float | None = None) -> Iterator[Event]: ...
    def generate_rows(self, input_ids: Sequence[int], params: Sequence[SamplingParams],
                      stop_event: threading.Event | None = None, top_n: int = 20, dropped_turns: Sequence[int] = (),
                      time_limit_s: float | None = None, state: DecodeState | None = None) -> Iterator[Event]: ...
    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                       stop_event: threading.Event | None = None, top_n: int = 0,
                       time_limit_s: float | None = None, state: DecodeState | None = None) -> Iterator[Event]: ...

    # --- full logits and weights (capabilities say which) --------------------------------------------------------
    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[list[float]]: ...
    def next_token_logits(self, ids: Sequence[int], state: DecodeState | None = None) -> torch.Tensor: ...
    # Probes take `should_stop` (the service's clock: Stop, the time limit, a caller gone), read between chunks,
    # units or layers; a cut probe returns what it finished (its `cut` says how far) or raises Interrupted.
    def logit_lens(self, ids: Sequence[int], positions: Sequence[int], sublayers: bool = False, top: int = 10, *,
                   should_stop: ShouldStop | None = None, state: DecodeState | None = None) -> lens.LensGrid: ...
    def gradient_x_input(self, context: Sequence[int], target: int, *, should_stop: ShouldStop | None = None
                         ) -> attribution.Attribution: ...
    def occlusion(self, context: Sequence[int], target: int, units: Sequence[attribution.Unit], *,
                  should_stop: ShouldStop | None = None) -> attribution.Attribution: ...
    def score(self, ids: Sequence[int], first: int = 1, *, should_stop: ShouldStop | None = None,
              state: DecodeState | None = None) -> scoring.TextScore: ...
    def divergence(self, other: "Backend", ids: Sequence[int], first: int = 1, *,
                   should_stop: ShouldStop | None = None) -> scoring.Divergence: ...
    def attention(self, ids: Sequence[int], *, should_stop: ShouldStop | None = None) -> np.ndarray: ...
    def rope_info(self) -> introspect.RopeInfo: ...
    def rope_angles(self, positions: int) -> np.ndarray: ...
    def rope_decay(self, max_distance: int) -> tuple[np.ndarray, np.ndarray]: ...
    def alibi_info(self, positions: int) -> introspect.AlibiInfo: ...
    def model_card(self) -> dict[str, Any]: ...


def same_tokenizer(a: Backend, b: Backend) -> bool:
    """True when the two read token ids the same way (drafting, divergence, cross-probabilities need it)."""
    key = a.vocabulary()
    return key is not None and key == b.vocabulary()
