"""The sampling controls, built once here and reused by Chat, Compare and the Sampling lab.

Each control is keyed by its SamplingParams field name; handlers read them from a set-input `data` dict
(`controls.values(data)`) and services turn the values into SamplingParams. Greedy and beam search hide the
sliders they ignore.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import gradio as gr

from qdemo.models.registry import ModelSpec
from qdemo.sampling import MAX_BEAMS
from qdemo.services.settings import FIELDS, MODES, SAMPLING_ONLY, defaults


@dataclass
class SamplingControls:
    mode: gr.Radio
    by_field: dict[str, gr.components.Component] = field(default_factory=dict)

    def components(self) -> set[gr.components.Component]:
        return set(self.by_field.values())

    def values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        """Field name → value from a handler's set-input dict."""
        return {name: data[c] for name, c in self.by_field.items() if c in data}

    def update(self, values: Mapping[str, Any]) -> dict[gr.components.Component, Any]:
        """A dict return setting these values (and, with a mode, the visibility that goes with it)."""
        if "seed" in values:
            values = {**values, "seed": _seed_text(values["seed"])}
        visible = self._visible(values["mode"]) if "mode" in values else {}
        out: dict[gr.components.Component, Any] = {}
        for name, component in self.by_field.items():
            changes = {}
            if name in values:
                changes["value"] = values[name]
            if name in visible:
                changes["visible"] = visible[name]
            if changes:
                out[component] = gr.update(**changes)
        return out

    def _visible(self, mode: str) -> dict[str, bool]:
        shown = {name: mode == "sample" for name in (*SAMPLING_ONLY, "seed")}
        shown["num_beams"] = mode == "beam search"
        return {name: v for name, v in shown.items() if name in self.by_field}

    def visibility(self, mode: str) -> dict[gr.components.Component, Any]:
        """Show only what the decoding mode uses: greedy and beam search ignore the sampling sliders."""
        return {self.by_field[name]: gr.update(visible=v) for name, v in self._visible(mode).items()}

    def wire_visibility(self, ui: Any, notice: Any) -> None:
        """Greedy and beam search hide what they ignore, as the mode changes (refusals show in `notice`)."""
        ui.on(self.mode.change, functools.partial(show_used, self), {self.mode},
              list(self.visibility("sample").keys()), notice=notice, queue=False, show_progress="hidden")


def show_used(controls: SamplingControls, data: dict) -> dict:
    return controls.visibility(data[controls.mode])


def _seed_text(seed: Any) -> str:
    return "" if seed in (None, "") else str(seed)


def build_controls(spec: ModelSpec, prefix: str = "", modes: Sequence[str] = MODES, decoding: str | None = None,
                   fields: Sequence[str] = FIELDS, temperature_label: str = "temperature") -> SamplingControls:
    """The sliders, pre-filled from the model's defaults (`decoding` overrides the mode). `fields` picks which
    controls exist (the lab has no beams, length or seed; Compare's panes share one seed box). The tab calls
    `wire_visibility` once its notice exists."""
    values = defaults(spec)
    mode_value = decoding or (values["mode"] if values["mode"] in modes else modes[0])
    shows = values["mode"] == "sample" if decoding is None else decoding == "sample"
    by_field: dict[str, gr.components.Component] = {}
    with gr.Row():
        mode = gr.Radio(list(modes), value=mode_value, label="decoding", elem_id=f"{prefix}mode")
        by_field["mode"] = mode
        if "num_beams" in fields:
            by_field["num_beams"] = gr.Slider(2, MAX_BEAMS, value=values["num_beams"], step=1, label="num beams",
                                              visible=mode_value == "beam search", elem_id=f"{prefix}num-beams")
        if "seed" in fields:
            # A text box, not gr.Number: an empty Number reads as 0, and "empty" must mean a fresh seed each run.
            by_field["seed"] = gr.Textbox(value=_seed_text(values["seed"]), label="seed",
                                          placeholder="empty: a fresh seed each run", max_lines=1, visible=shows,
                                          elem_id=f"{prefix}seed")
    with gr.Row():
        if "temperature" in fields:
            by_field["temperature"] = gr.Slider(0.0, 2.0, value=values["temperature"], step=0.05,
                                                label=temperature_label, visible=shows,
                                                elem_id=f"{prefix}temperature")
        if "top_k" in fields:
            by_field["top_k"] = gr.Slider(0, 200, value=values["top_k"], step=1, label="top-k (0 = off)",
                                          visible=shows, elem_id=f"{prefix}top-k")
        if "top_p" in fields:
            by_field["top_p"] = gr.Slider(0.01, 1.0, value=values["top_p"], step=0.01, label="top-p (1 = off)",
                                          visible=shows, elem_id=f"{prefix}top-p")
    with gr.Row():
        if "min_p" in fields:
            by_field["min_p"] = gr.Slider(0.0, 0.99, value=values["min_p"], step=0.01, label="min-p (0 = off)",
                                          visible=shows, elem_id=f"{prefix}min-p")
        if "repetition_penalty" in fields:
            by_field["repetition_penalty"] = gr.Slider(0.5, 2.0, value=values["repetition_penalty"], step=0.01,
                                                       label="repetition penalty (1 = off)",
                                                       elem_id=f"{prefix}repetition-penalty")
        if "max_new_tokens" in fields:
            by_field["max_new_tokens"] = gr.Slider(1, 2048, value=values["max_new_tokens"], step=1,
                                                   label="max new tokens", elem_id=f"{prefix}max-new-tokens")
    return SamplingControls(mode=mode, by_field=by_field)
