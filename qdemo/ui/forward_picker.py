"""The forward picker beside a model dropdown: auto / llama.cpp / torch, shown where the model has a choice."""

from __future__ import annotations

from typing import Any

import gradio as gr

from qdemo.forwards.choice import ref
from qdemo.services.admission import Services

INFO = "auto: llama.cpp on a CPU when installed · torch: the dequantized checkpoint (exactness oracles)"


def build(services: Services, name: str, elem_id: str, scale: int | None = None) -> gr.Radio:
    """The picker; `scale` shares a row's width with the model dropdown beside it."""
    options = services.forward_choices(name)
    return gr.Radio(options or ["auto"], value="auto", label="forward", info=INFO, visible=bool(options),
                    elem_id=elem_id, min_width=200, scale=scale)


def reset(services: Services, name: str) -> Any:
    """The picker for a newly chosen model: back to auto, shown only where there is a choice."""
    options = services.forward_choices(name)
    return gr.Radio(choices=options or ["auto"], value="auto", visible=bool(options))


def model_ref(name: str, choice: str | None) -> str:
    """What the services take: the registry name, with the forward when the user picked one."""
    return ref(name, choice or "auto")
