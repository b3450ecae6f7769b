"""The one path from the services to a model.

A `LocalBackend` is a pooled model leased for one request. Every forward it runs — a generation step, the
next-token logits of the lab and of Compare, attention maps — goes through that model's step gate, so concurrent
users take turns step by step and one model never runs two steps at once (the pool's guard refuses any forward
that does not hold the gate). Services and the UI reach models only through a backend: they never touch
`lm.model` or `lm.tokenizer`. Capabilities say which panels a backend can feed, so the UI asks them instead of
checking model families or types.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from qdemo.core.decode import DecodeState, ShouldStop, last_logits, new_state
from qdemo.core.engine import generate, generate_assisted, generate_batch, generate_rows
from qdemo.core.events import Event
from qdemo.forwards.gate import StepGate
from qdemo.forwards.torch_runner import runner_for
from qdemo.models.loader import LoadedModel, pick_device, vocabulary_key
from qdemo.models.prompting import (
    Message,
    Prompt,
    build_prompt,
    control_token_ids,
    conversation_prompt_ids,
    raw_text_ids,
)
from qdemo.models.sources import ProgressFn
from qdemo.probes import attribution, introspect, lens, scoring
from qdemo.sampling import SamplingParams
from qdemo.serving.pool import ModelPool
from qdemo.serving.protocol import Backend, Capabilities, needs_local


def drafting_pays(device: str | None) -> bool:
    """Whether speculative decoding is on by default: where a k-token verification costs about one step (a GPU).
    On a CPU's torch path it costs several (`python -m qdemo bench NAME --scenario assisted` measures it), so it is
    off there unless QDEMO_SPECULATIVE=on (QDEMO_SPECULATIVE=off turns it off everywhere)."""
    choice = os.environ.get("QDEMO_SPECULATIVE", "auto").strip().lower()
    if choice in ("on", "1", "true"):
        return True
    if choice in ("off", "0", "false"):
        return False
    return pick_device(device).type == "cuda"


# The llama.cpp forward hands over full logits but no torch modules: weight panels use the torch copy.
_WEIGHTLESS = Capabilities(attention=False, positions=False, model_card=False)


@contextlib.contextmanager
def leased(pool: ModelPool, name: str, progress: ProgressFn | None = None, forward: str = "torch"
           ) -> Iterator["LocalBackend"]:
    """The pool's model leased for one request, behind its gated path."""
    with pool.lease(name, progress, forward) as lm:
        yield LocalBackend(lm, pool.gate(lm.key))


class LocalBackend:
    """A leased model of this process's pool and its step gate."""

    def __init__(self, lm: LoadedModel, gate: StepGate) -> None:
        self._lm, self._gate = lm, gate
        self.name, self.key, self.spec = lm.spec.name, lm.key, lm.spec
        self.forward, self.forward_label = lm.forward, lm.forward_label
        self.max_context, self.context_note = lm.max_context, lm.context_note
        self.position_encoding, self.position_note = lm.family.position_encoding, lm.family.position_note
        self.capabilities = Capabilities() if lm.model is not None else _WEIGHTLESS

    def kv_bytes_per_token(self) -> int:
        """Keys and values one token of one row holds (a sweep sizes its chunks of rows by it): float16 on
        llama.cpp, the model's dtype on torch."""
        config = self._lm.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        half = self.forward == "llama.cpp" or getattr(self._lm, "dtype", None) in (torch.bfloat16, torch.float16)
        return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * (2 if half else 4)

    def exact_rows(self, wanted: int) -> int:
        """At most `wanted` rows per step, fewer where more rows in one call would round differently from each row
        alone (the llama.cpp forward's kernels, qdemo.forwards.llama_cpp.SOLO_EXACT_ROWS)."""
        cap = runner_for(self._lm).solo_exact_rows
        return min(wanted, cap) if cap else wanted

    def batch_note(self) -> str | None:
        """What a user should know when a batch's rows may part from their solo runs (torch half precision)."""
        return runner_for(self._lm).batch_note

    def shape(self) -> tuple[int, int]:
        """(decoder layers, attention heads)."""
        config = self._lm.config
        return int(config.num_hidden_layers), int(config.num_attention_heads)

    # --- text and tokens (no forward) ---------------------------------------------------------------------------
    def vocabulary(self) -> str | None:
        return vocabulary_key(self._lm.tokenizer)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._lm.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> dict[int, str]:
        """Each id decoded on its own."""
        return {int(i): self._lm.tokenizer.decode([int(i)]) for i in set(ids)}

    def text_decoder(self) -> Callable[[Sequence[int]], dict[int, str]]:
        """`token_texts` that outlives the lease: it holds the tokenizer only, never the weights, so a view can
        label tokens later without keeping an unloaded model alive."""
        tokenizer = self._lm.tokenizer

        def texts(ids: Sequence[int]) -> dict[int, str]:
            return {int(i): tokenizer.decode([int(i)]) for i in set(ids)}

        return texts

    def token_pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's share of the decoded text (a character split across tokens counted once)."""
        return attribution.token_pieces(self._lm.tokenizer.decode, ids)

    def special_ids(self) -> set[int]:
        """Special and other control tokens (`<tool_call>` too): what user text can never produce."""
        tokenizer = self._lm.tokenizer
        return set(getattr(tokenizer, "all_special_ids", []) or []) | control_token_ids(tokenizer)

    def prompt_pieces(self, ids: Sequence[int]) -> list[tuple[int, str, bool]]:
        """(id, text, special) per prompt token, for the prompt inspector."""
        special = self.special_ids()
        texts = self.token_texts(ids)
        return [(int(i), texts[int(i)], int(i) in special) for i in ids]

    def chat_prompt(self, messages: Sequence[Message], max_new_tokens: int, system: str | None = None,
                    max_prompt_tokens: int | None = None) -> Prompt:
        """The prompt ids of a chat in this model's format, fitted into its context and the server's prompt limit
        (the oldest turns go first)."""
        return build_prompt(self._lm.tokenizer, messages, self.max_context, max_new_tokens,
                            self.spec.system_prompt if system is None else system, self.name,
                            self._lm.family.build_prompt, max_prompt_tokens)

    def count_tokens(self, text: str) -> int | None:
        return len(self.raw_text_ids(text))

    def raw_text_ids(self, text: str) -> list[int]:
        """Text as typed, tokenized as plain text: it never becomes a special or added token."""
        return raw_text_ids(self._lm.tokenizer, text)

    def conversation_ids(self, messages: Sequence[Message]) -> list[int]:
        """A whole conversation, its last answer included, as the model saw it."""
        return conversation_prompt_ids(self._lm.tokenizer, messages, self._lm.family.build_prompt)

    # --- forwards (each through the step gate) ------------------------------------------------------------------
    def batch_pays(self, rows: int = 2) -> bool:
        """Whether `rows` rows in one batch decode faster than one after the other on this model here, from its
        recent decode steps (until both are known: yes)."""
        return self._lm.step_costs.batch_pays(rows) is not False

    def new_state(self) -> DecodeState:
        """An empty one-row decode state for this model (a chat keeps it between turns)."""
        return new_state(self._lm)

    def chat(self, messages: Sequence[Message], prompt: Prompt, params: SamplingParams,
             stop_event: threading.Event | None = None, top_n: int = 20, time_limit_s: float | None = None,
             state: DecodeState | None = None) -> Iterator[Event]:
        """The engine on the prompt's ids (with a kept `state`, only what is new is prefilled)."""
        return self.generate(input_ids=prompt.ids, dropped_turns=prompt.dropped_turns, params=params,
                             stop_event=stop_event, top_n=top_n, state=state, time_limit_s=time_limit_s)

    def complete(self, text: str, params: SamplingParams, stop_event: threading.Event | None = None,
                 top_n: int = 20, time_limit_s: float | None = None) -> Iterator[Event]:
        return self.generate(input_ids=self.raw_text_ids(text), params=params, stop_event=stop_event, top_n=top_n,
                             time_limit_s=time_limit_s)

    def generate(self, *, messages: Sequence[Message] | None = None, input_ids: Sequence[int] | None = None,
                 params: SamplingParams | None = None, stop_event: threading.Event | None = None,
                 top_n: int = 20, dropped_turns: Sequence[int] = (), time_limit_s: float | None = None,
                 ignore_eos: bool = False, state: DecodeState | None = None) -> Iterator[Event]:
        """The engine's event stream. It takes the gate around every forward — each prefill chunk and each decode
        step — so other users' steps interleave. With a kept `state`, only what is new is prefilled."""
        return generate(self._lm, messages=messages, input_ids=input_ids, params=params, stop_event=stop_event,
                        top_n=top_n, step_lock=self._gate.step, dropped_turns=dropped_turns,
                        time_limit_s=time_limit_s, ignore_eos=ignore_eos, state=state)

    def generate_assisted(self, draft: Backend, input_ids: Sequence[int], params: SamplingParams,
                          stop_event: threading.Event | None = None, top_n: int = 20, dropped_turns: Sequence[int] = (),
                          time_limit_s: float | None = None) -> Iterator[Event]:
        """Speculative decoding with `draft` proposing: each model's forwards go through its own gate."""
        draft = _local(draft, "drafting")
        return generate_assisted(self._lm, draft._lm, input_ids, params, draft_tokens=self.spec.draft_tokens,
                                 stop_event=stop_event, top_n=top_n, target_lock=self._gate.step,
                                 draft_lock=draft._gate.step, dropped_turns=dropped_turns, time_limit_s=time_limit_s)

    def generate_rows(self, input_ids: Sequence[int], params: Sequence[SamplingParams],
                      stop_event: threading.Event | None = None, top_n: int = 20, dropped_turns: Sequence[int] = (),
                      time_limit_s: float | None = None, state: DecodeState | None = None) -> Iterator[Event]:
        """One prompt prefilled once and continued in one row per settings, decoded as one batch (a kept `state`
        supplies its common prefix and ends as one row)."""
        return generate_rows(self._lm, input_ids, params, stop_event=stop_event, top_n=top_n,
                             step_lock=self._gate.step, dropped_turns=dropped_turns, time_limit_s=time_limit_s,
                             state=state)

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                       stop_event: threading.Event | None = None, top_n: int = 0,
                       time_limit_s: float | None = None, state: DecodeState | None = None) -> Iterator[Event]:
        """Different prompts in one padded batch, their shared prefix prefilled once (a kept `state` supplies what
        it holds of it, and holds the prefix afterwards)."""
        return generate_batch(self._lm, prompts, params, stop_event=stop_event, top_n=top_n,
                              step_lock=self._gate.step, time_limit_s=time_limit_s, state=state)

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p of every token after the first of each row, given the tokens before it (teacher-forced)."""
        return [list(scoring.score_ids(self._lm, row, self._gate.step).logprobs) for row in rows]

    def next_token_logits(self, ids: Sequence[int], state: DecodeState | None = None) -> torch.Tensor:
        """fp32 [V] logits after `ids`. A kept `state` of this model supplies its longest common prefix with `ids`
        (only the rest is fed; the state then holds `ids`)."""
        if self._lm.model is None or state is not None:  # decode-state path, prefilled in gated chunks
            return last_logits(self._lm, ids, self._gate.step, state=state)
        with self._gate.step():
            return introspect.next_token_logits(self._lm, ids)

    def logit_lens(self, ids: Sequence[int], positions: Sequence[int], sublayers: bool = False, top: int = 10, *,
                   should_stop: ShouldStop | None = None, state: DecodeState | None = None) -> lens.LensGrid:
        """The lens grid over `ids` at `positions`: chunked forwards, each chunk (and its projection) a turn. A
        kept `state` supplies the context before the first position that it holds."""
        return lens.logit_lens(self._lm, ids, positions, self._gate.step, sublayers=sublayers, top=top,
                               should_stop=should_stop, state=state)

    def gradient_x_input(self, context: Sequence[int], target: int, *, should_stop: ShouldStop | None = None
                         ) -> attribution.Attribution:
        """One forward and backward in one turn at the gate."""
        return attribution.gradient_x_input(self._lm, context, target, self._gate.step, should_stop=should_stop)

    def occlusion(self, context: Sequence[int], target: int, units: Sequence[attribution.Unit], *,
                  should_stop: ShouldStop | None = None) -> attribution.Attribution:
        return attribution.occlusion(self._lm, context, target, units, self._gate.step, should_stop=should_stop)

    def score(self, ids: Sequence[int], first: int = 1, *, should_stop: ShouldStop | None = None,
              state: DecodeState | None = None) -> scoring.TextScore:
        """Teacher-forced per-token scores (any forward: llama.cpp hands over logits at every position). A kept
        `state` supplies the context before `first` that it holds."""
        return scoring.score_ids(self._lm, ids, self._gate.step, first, should_stop=should_stop, state=state)

    def divergence(self, other: Backend, ids: Sequence[int], first: int = 1, *,
                   should_stop: ShouldStop | None = None) -> scoring.Divergence:
        """Both models on the same ids, chunk by chunk, each at its own gate."""
        other = _local(other, "a divergence")
        return scoring.divergence(self._lm, other._lm, ids, self._gate.step, other._gate.step, first,
                                  should_stop=should_stop)

    def attention(self, ids: Sequence[int], *, should_stop: ShouldStop | None = None) -> np.ndarray:
        """float16 [layers, heads, q, k] for `ids`, one forward."""
        return introspect.attention_maps(self._lm, ids, self._gate.step, should_stop=should_stop)

    # --- read from the model's modules (no forward) -------------------------------------------------------------
    def rope_info(self) -> introspect.RopeInfo:
        return introspect.rope_info(self._lm)

    def rope_angles(self, positions: int) -> np.ndarray:
        return introspect.rope_angles(self._lm, positions)

    def rope_decay(self, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        return introspect.rope_decay(self._lm, max_distance)

    def alibi_info(self, positions: int) -> introspect.AlibiInfo:
        return introspect.alibi_info(self._lm, positions)

    def model_card(self) -> dict[str, Any]:
        card = introspect.model_card(self._lm)
        if self.context_note:
            card["context"] = f"{self.max_context} (capped: see the note)"
        return card


def _local(backend: Backend, what: str) -> LocalBackend:
    """The other model of a two-model forward, which must run here (it is read chunk by chunk at its own gate)."""
    if not backend.capabilities.stage_chain:
        raise needs_local(backend, what)
    assert isinstance(backend, LocalBackend)  # the only backend with full logits
    return backend
