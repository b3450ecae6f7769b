"""What the engine emits: small, plain dataclasses that every tab folds into its own view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

DoneReason = Literal["eos", "stop_token", "max_tokens", "stopped", "time_limit", "error"]


@dataclass(frozen=True)
class StageTopN:
    """The distribution after one stage of the processor chain ("raw" is the model's own softmax).

    `removed` and `argmax_prob` come from the full vocabulary, not the top-N: they answer "what did this stage
    cut" and "did it cut the model's own favourite" even when those tokens are not listed. Whether the stage
    changed the top token is `token_ids[0]` against the previous stage's (see qdemo.probes.decided)."""

    name: str
    token_ids: tuple[int, ...]
    probs: tuple[float, ...]
    chosen_prob: float  # probability of the token finally chosen, at this stage
    # Defaults keep records written before these fields readable (and stages built by hand, e.g. beam search's).
    removed: float = 0.0  # probability, under the previous stage's distribution, of the tokens this stage set to 0
    argmax_prob: float | None = None  # probability this stage leaves on the raw stage's top token (None: not recorded)


@dataclass(frozen=True)
class MemorySample:
    device: str  # "cuda" or "cpu"
    rss_bytes: int | None = None  # process RSS (CPU runs)
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    cuda_peak: int | None = None

    @property
    def used_bytes(self) -> int:
        """The figure charts plot: allocated on CUDA, RSS on CPU."""
        return (self.cuda_allocated if self.device == "cuda" else self.rss_bytes) or 0


@dataclass(frozen=True)
class PrefillEvent:
    prompt_ids: tuple[int, ...]
    prefill_seconds: float
    dropped_turns: tuple[int, ...]  # indices of input messages left out to fit the context
    seed: int | None  # the seed actually used (None for greedy runs)
    kv_cache_bytes: int
    memory: MemorySample
    row: int = 0  # which row of a batched generation (Compare's sides share one prefill)
    reused_tokens: int = 0  # prompt tokens whose KV cache was kept from an earlier turn (not prefilled again)
    kv_allocated_bytes: int = 0  # the cache's memory, in use or not (llama.cpp allocates its context up front)


@dataclass(frozen=True)
class TokenEvent:
    step: int
    token_id: int
    text: str  # what this token adds to the visible text (may be "" while bytes are held back)
    stages: tuple[StageTopN, ...]
    step_seconds: float  # forward that produced this token's logits + processing + sampling
    kv_cache_bytes: int
    memory: MemorySample
    row: int = 0
    drafted: bool = False  # speculative decoding: the draft model proposed it and the target accepted it
    kv_allocated_bytes: int = 0  # the cache's memory, in use or not; kv_cache_bytes is this row's keys and values


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    ttft_seconds: float
    prefill_seconds: float
    prefill_tokens_per_s: float  # the tokens prefilled (not those reused from a kept cache) over prefill_seconds
    decode_tokens_per_s: float  # tokens after the first, over their step time
    total_seconds: float
    peak_memory_bytes: int
    draft_proposed: int = 0  # speculative decoding: tokens the draft model proposed …
    draft_accepted: int = 0  # … and how many the target kept
    reused_tokens: int = 0  # prompt tokens whose cache was kept from an earlier turn: not prefilled, not timed

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens this run computed."""
        return self.prompt_tokens - self.reused_tokens


@dataclass(frozen=True)
class DoneEvent:
    reason: DoneReason
    stats: GenerationStats
    text: str  # the whole visible answer
    token_ids: tuple[int, ...]
    error: str | None = None
    row: int = 0


@dataclass(frozen=True)
class ProgressEvent:
    """Work under way that has no token to show yet (beam search: the best beam can change until the end)."""

    phase: str  # e.g. "beam search"
    step: int  # steps done
    total: int  # most steps it can take
    seconds: float  # since the work started
    kv_cache_bytes: int = 0
    text: str = ""  # the best hypothesis so far (beam search: the best running beam)


Event = Union[PrefillEvent, TokenEvent, DoneEvent, ProgressEvent]
