"""Sampling settings and the logits-processor chain built from them.

The chain uses transformers' own processor classes in the order `generate` applies them
(repetition penalty → temperature → top-k → top-p → min-p), so every stage the UI shows is
exactly what `generate` would compute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from transformers import (
    LogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

RAW_STAGE = "raw"
MAX_BEAMS = 8
MAX_TOP_K = 1_000_000  # beyond any vocabulary: larger values mean nothing more


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature == 0` or `do_sample=False` means greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    min_p: float = 0.0  # 0.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables
    max_new_tokens: int = 256
    seed: int | None = None
    num_beams: int = 1  # > 1: deterministic beam search (no sampling, no per-step streaming)

    def __post_init__(self) -> None:
        _check_bool("do_sample", self.do_sample)
        _check_number("temperature", self.temperature, low=0.0, high=100.0)
        _check_int("top_k", self.top_k, low=0, high=MAX_TOP_K)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("min_p", self.min_p, low=0.0, high=1.0, high_open=True)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, high=100.0, low_open=True)
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        _check_int("num_beams", self.num_beams, low=1, high=MAX_BEAMS)
        if self.num_beams > 1 and not self.greedy:
            raise ValueError(f"sampling field num_beams is {self.num_beams}: beam search here is deterministic, "
                             "so set do_sample to false (or num_beams to 1 to sample)")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    def replace(self, **changes: Any) -> "SamplingParams":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        return SamplingParams(**{**asdict(self), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_stages(params: SamplingParams) -> list[tuple[str, LogitsProcessor]]:
    """The active processors, named, in transformers' order. Greedy keeps only the repetition penalty,
    as `generate(do_sample=False)` does."""
    stages: list[tuple[str, LogitsProcessor]] = []
    if params.repetition_penalty != 1.0:
        stages.append(("repetition_penalty", RepetitionPenaltyLogitsProcessor(params.repetition_penalty)))
    if params.greedy:
        return stages
    if params.temperature != 1.0:
        stages.append(("temperature", TemperatureLogitsWarper(params.temperature)))
    if params.top_k != 0:
        stages.append(("top_k", TopKLogitsWarper(top_k=params.top_k)))
    if params.top_p < 1.0:
        stages.append(("top_p", TopPLogitsWarper(top_p=params.top_p)))
    if params.min_p > 0.0:
        stages.append(("min_p", MinPLogitsWarper(min_p=params.min_p)))
    return stages


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def _short(value: Any) -> str:
    """A bad value quoted back, never thousands of digits long."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 60 else text[:59] + "…"


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"sampling field {name} must be true or false, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sampling field {name} must be an integer, got {_short(value)}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"sampling field {name} must be {bound}, got {_short(value)}")


def _check_number(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"sampling field {name} must be a finite number, got {_short(value)}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"sampling field {name} must be in {interval}, got {_short(value)}")
