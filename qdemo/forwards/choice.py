"""Which forward runs a model: llama.cpp's on the GGUF's own blocks, or torch's on the dequantized checkpoint.

The fast path is picked when it can run — a GGUF entry, the optional bindings installed, a CPU device — unless
QDEMO_FORWARD or the user says otherwise. On a GPU torch stays the path (qdemo builds llama.cpp for the CPU).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from qdemo.forwards import llama_cpp
from qdemo.models.registry import GgufPartsSource, ModelSpec

FORWARDS = ("llama.cpp", "torch")
CHOICES = ("auto",) + FORWARDS
_SUFFIX = re.compile(r"^(?P<name>.+?) \[(?P<forward>[^\]]+)\]$")


@dataclass(frozen=True)
class ForwardChoice:
    forward: str  # "llama.cpp" or "torch"
    note: str = ""  # why the fast path does not run, when it could have


def check_choice(value: str | None, where: str = "forward") -> str:
    choice = (value or "auto").strip().lower()
    if choice == "llama-cpp":
        choice = "llama.cpp"
    if choice not in CHOICES:
        raise ValueError(f"{where} must be one of {', '.join(CHOICES)}, got {value!r}")
    return choice


def default_choice() -> str:
    """QDEMO_FORWARD (auto | llama.cpp | torch), else auto."""
    return check_choice(os.environ.get("QDEMO_FORWARD"), "QDEMO_FORWARD")


def pick_forward(spec: ModelSpec, device_type: str, requested: str | None = None) -> ForwardChoice:
    """The forward for `spec` on a `device_type` device; `requested` None means the server's default choice."""
    choice = check_choice(requested) if requested is not None else default_choice()
    gguf = isinstance(spec.source, GgufPartsSource)
    if choice == "torch" or not gguf:
        if choice == "llama.cpp":
            raise ValueError(f"{spec.name} is not a GGUF entry; the llama.cpp forward runs GGUF entries only")
        return ForwardChoice("torch")
    missing = llama_cpp.available()
    if choice == "llama.cpp":
        if missing:
            raise ValueError(f"{spec.name}: {missing}")
        return ForwardChoice("llama.cpp")
    if device_type != "cpu":
        return ForwardChoice("torch")
    if missing:
        return ForwardChoice("torch", f"faster on llama.cpp: {missing}")
    return ForwardChoice("llama.cpp")


def split_ref(model: str) -> tuple[str, str | None]:
    """'name [torch]' → ('name', 'torch'); 'name' → ('name', None). The pool lists a non-default copy that way."""
    found = _SUFFIX.match(model)
    if found and check_choice_or_none(found.group("forward")):
        return found.group("name"), check_choice(found.group("forward"))
    return model, None


def check_choice_or_none(value: str) -> bool:
    try:
        return check_choice(value) in FORWARDS
    except ValueError:
        return False


def ref(name: str, choice: str | None) -> str:
    """What the UI sends for a model and a forward choice (auto: the bare name)."""
    choice = check_choice(choice)
    return name if choice == "auto" else f"{name} [{choice}]"
