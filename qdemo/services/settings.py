"""Sampling controls as plain values: the slider/box values of the Chat, Compare and Lab controls ↔
SamplingParams, keyed by field name. No Gradio here (the components live in qdemo/ui/controls.py)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from qdemo.models.registry import ModelSpec
from qdemo.sampling import SamplingParams

MODES = ("sample", "greedy", "beam search")
FIELDS = ("mode", "num_beams", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
          "seed")
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")  # what greedy and beam search ignore


def whole_number(value: Any, name: str) -> int:
    """A slider/number box value as an int; ValueError names the field."""
    if isinstance(value, (bool, str)):  # a page's number box sends a number: anything else is not coerced
        raise ValueError(f"{name} must be a whole number, got {repr(value)[:40]}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a whole number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {str(value)[:40]}")
    return int(number)


def seed_value(value: Any, name: str = "seed") -> int | None:
    """A seed box's value: the box is text, so digits are the seed and an empty box means a fresh seed per run;
    anything else (letters, a sign, a fraction) names the field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit():
            raise ValueError(f"{name} must be a whole number of 0 or more, or empty for a fresh seed; got "
                             f"{text[:40]!r}")
        return int(text)
    return whole_number(value, name)


def mode_of(params: SamplingParams) -> str:
    return "beam search" if params.beam_search else ("greedy" if params.greedy else "sample")


def defaults(spec: ModelSpec) -> dict[str, Any]:
    """Control values for a model's defaults. The seed box starts empty (a fresh seed every run) unless the
    registry pins one."""
    return values_of(spec.sampling)


def values_of(params: SamplingParams) -> dict[str, Any]:
    return {"mode": mode_of(params), "num_beams": max(2, params.num_beams), "temperature": params.temperature,
            "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty, "max_new_tokens": params.max_new_tokens,
            "seed": params.seed}


def to_params(values: Mapping[str, Any]) -> SamplingParams:
    """Control values → SamplingParams; a bad value raises ValueError with a sentence naming the field. An empty
    seed means a fresh seed per run."""
    mode = values.get("mode", "sample")
    if mode not in MODES:
        raise ValueError(f"decoding must be one of {', '.join(MODES)}, got {mode!r}")
    seed = seed_value(values.get("seed"))
    try:
        return SamplingParams(
            do_sample=mode == "sample", temperature=_number(values.get("temperature", 1.0), "temperature"),
            top_k=whole_number(values.get("top_k", 0), "top-k"), top_p=_number(values.get("top_p", 1.0), "top-p"),
            min_p=_number(values.get("min_p", 0.0), "min-p"),
            repetition_penalty=_number(values.get("repetition_penalty", 1.0), "repetition penalty"),
            max_new_tokens=whole_number(values.get("max_new_tokens", 256), "max new tokens"),
            seed=seed,
            num_beams=whole_number(values.get("num_beams", 2), "num beams") if mode == "beam search" else 1)
    except (TypeError, OverflowError) as exc:
        raise ValueError(str(exc)) from None


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {str(value)[:40]}")
    return number


def summary(params: SamplingParams) -> str:
    """The decoding in one short line, e.g. "sample · T 0.7 · top-k 20 · top-p 0.8 · rep. penalty 1.05"."""
    parts = [mode_of(params) if not params.beam_search else f"beam search × {params.num_beams}"]
    if not params.greedy:
        parts.append(f"T {params.temperature:g}")
        if params.top_k:
            parts.append(f"top-k {params.top_k}")
        if params.top_p < 1.0:
            parts.append(f"top-p {params.top_p:g}")
        if params.min_p > 0.0:
            parts.append(f"min-p {params.min_p:g}")
    if params.repetition_penalty != 1.0:
        parts.append(f"rep. penalty {params.repetition_penalty:g}")
    parts.append(f"≤ {params.max_new_tokens} tokens")
    return " · ".join(parts)
