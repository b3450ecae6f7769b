"""Sampling controls shared by the Chat and Compare panes, and their conversion to SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from qdemo.registry import ModelSpec
from qdemo.sampling import MAX_BEAMS, SamplingParams

MODES = ("sample", "greedy", "beam search")


@dataclass
class SamplingControls:
    mode: gr.Radio
    num_beams: gr.Slider
    temperature: gr.Slider
    top_k: gr.Slider
    top_p: gr.Slider
    min_p: gr.Slider
    repetition_penalty: gr.Slider
    max_new_tokens: gr.Slider
    seed: gr.Number

    def components(self) -> list[gr.components.Component]:
        return [self.mode, self.num_beams, self.temperature, self.top_k, self.top_p, self.min_p,
                self.repetition_penalty, self.max_new_tokens, self.seed]


def build_controls(spec: ModelSpec, prefix: str = "", decoding: str | None = None) -> SamplingControls:
    """The accordion's sliders, pre-filled from the model's defaults (`decoding` overrides its mode)."""
    s = spec.sampling
    with gr.Row():
        mode = gr.Radio(list(MODES), value=decoding or _mode(s), label="decoding", elem_id=f"{prefix}mode")
        num_beams = gr.Slider(2, MAX_BEAMS, value=max(2, s.num_beams), step=1, label="num beams",
                              elem_id=f"{prefix}num-beams")
        seed = gr.Number(value=s.seed if s.seed is not None else 1234, precision=0, label="seed",
                         elem_id=f"{prefix}seed")
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=s.temperature, step=0.05, label="temperature")
        top_k = gr.Slider(0, 200, value=s.top_k, step=1, label="top-k (0 = off)")
        top_p = gr.Slider(0.01, 1.0, value=s.top_p, step=0.01, label="top-p (1 = off)")
    with gr.Row():
        min_p = gr.Slider(0.0, 0.99, value=s.min_p, step=0.01, label="min-p (0 = off)")
        repetition_penalty = gr.Slider(0.5, 2.0, value=s.repetition_penalty, step=0.01,
                                       label="repetition penalty (1 = off)")
        max_new_tokens = gr.Slider(1, 2048, value=s.max_new_tokens, step=1, label="max new tokens",
                                   elem_id=f"{prefix}max-new-tokens")
    return SamplingControls(mode, num_beams, temperature, top_k, top_p, min_p, repetition_penalty,
                            max_new_tokens, seed)


def defaults_for(spec: ModelSpec) -> list[Any]:
    """Values for `components()` when the model changes."""
    s = spec.sampling
    return [_mode(s), max(2, s.num_beams), s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
            s.max_new_tokens, s.seed if s.seed is not None else 1234]


def to_params(mode: str, num_beams: Any, temperature: Any, top_k: Any, top_p: Any, min_p: Any,
              repetition_penalty: Any, max_new_tokens: Any, seed: Any) -> SamplingParams:
    """Slider values → SamplingParams; a bad combination raises ValueError with a sentence a user can act on."""
    if mode not in MODES:
        raise ValueError(f"decoding must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        return SamplingParams(
            do_sample=mode == "sample", temperature=float(temperature), top_k=whole_number(top_k, "top-k"),
            top_p=float(top_p), min_p=float(min_p), repetition_penalty=float(repetition_penalty),
            max_new_tokens=whole_number(max_new_tokens, "max new tokens"),
            seed=None if seed in (None, "") else whole_number(seed, "seed"),
            num_beams=whole_number(num_beams, "num beams") if mode == "beam search" else 1)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def whole_number(value: Any, name: str) -> int:
    """A slider/number box value as an int; ValueError names the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(number)


def _mode(s: SamplingParams) -> str:
    return "beam search" if s.beam_search else ("greedy" if s.greedy else "sample")
