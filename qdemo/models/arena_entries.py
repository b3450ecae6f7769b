"""The blind arena's contenders as models.yaml lists them (`arena:`): a name people vote on, a registry model, an
optional forward and a sampling preset over the model's defaults. Read strictly, like the model entries: an unknown
key, model or sampling field fails with the entry's name, so a typo never silently drops a contender."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from qdemo.errors import RegistryError
from qdemo.sampling import SamplingParams

FORWARDS = ("torch", "llama.cpp")
MAX_NAME = 60  # a contender's name is a leaderboard row: short
_KEYS = {"name", "model", "forward", "settings"}
# A battle seeds both sides alike, from its own seed: a fixed seed in a preset would make every battle the same.
_NOT_PRESETS = {"seed"}


@dataclass(frozen=True)
class Contender:
    """One side a battle may draw. `settings` are SamplingParams fields over the model's own defaults (a preset);
    `forward` None runs the model as the server would by default."""

    name: str
    model: str  # a registry name
    forward: str | None = None  # "torch" | "llama.cpp" | None
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """What admission takes: the registry name, with the forward when the contender names one."""
        return self.model if self.forward is None else f"{self.model} [{self.forward}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "forward": self.forward, "settings": dict(self.settings)}


def parse_arena(data: Any, models: Mapping[str, Any], forwards: Mapping[str, tuple[str, ...]],
                where: str) -> tuple[Contender, ...]:
    """The `arena:` section (None: absent, the app builds default contenders). `models`: the registry's specs;
    `forwards`: the forwards each model may name (a GGUF entry both, a checkpoint torch, a remote server none)."""
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) < 2:
        raise RegistryError(f"{where}: 'arena' must be a list of at least two contenders ({{name, model, forward?, "
                            f"settings?}}): a battle draws two")
    contenders: list[Contender] = []
    for index, entry in enumerate(data):
        contender = _parse_contender(entry, index, models, forwards, where)
        if any(c.name == contender.name for c in contenders):
            raise RegistryError(f"{where}: arena entry {index}: duplicate contender name {contender.name!r}")
        contenders.append(contender)
    return tuple(contenders)


def _parse_contender(entry: Any, index: int, models: Mapping[str, Any], forwards: Mapping[str, tuple[str, ...]],
                     where: str) -> Contender:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: arena entry {index} must be a mapping, got {type(entry).__name__}")
    named = entry.get("name")
    label = f"{where}: arena entry " + (repr(named[:MAX_NAME]) if isinstance(named, str) and named else str(index))
    unknown = set(entry) - _KEYS
    if unknown:
        raise RegistryError(f"{label}: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise RegistryError(f"{label}: 'name' must be text of 1 to {MAX_NAME} characters")
    model = entry.get("model")
    if not isinstance(model, str) or model not in models:
        raise RegistryError(f"{label}: 'model' must name a model of this registry ({', '.join(models)}), got "
                            f"{str(model)[:MAX_NAME]!r}")
    forward = _parse_forward(entry.get("forward"), model, forwards.get(model, ()), label)
    settings = _parse_settings(entry.get("settings"), models[model].sampling, label)
    return Contender(name=name.strip(), model=model, forward=forward, settings=settings)


def _parse_forward(forward: Any, model: str, allowed: tuple[str, ...], label: str) -> str | None:
    if forward is None:
        return None
    if forward not in FORWARDS:
        raise RegistryError(f"{label}: 'forward' must be one of {', '.join(FORWARDS)} (or left out: the server's "
                            f"choice), got {str(forward)[:MAX_NAME]!r}")
    if forward not in allowed:
        runs = f"runs only on {', '.join(allowed)}" if allowed else "runs on a remote server"
        raise RegistryError(f"{label}: 'forward' {forward} does not apply to {model}: it {runs}")
    return forward


def _parse_settings(settings: Any, defaults: SamplingParams, label: str) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise RegistryError(f"{label}: 'settings' must be a mapping of sampling fields, got {type(settings).__name__}")
    fixed = _NOT_PRESETS & set(settings)
    if fixed:
        raise RegistryError(f"{label}: 'settings' may not fix {', '.join(sorted(fixed))}: each battle draws its own")
    try:
        defaults.replace(**settings)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{label}: 'settings' is invalid: {exc}") from None
    return dict(settings)
