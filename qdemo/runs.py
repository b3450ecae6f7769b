"""A finished (or running) generation as one record: what the Performance and Compare tabs fold over.

Plain data built from engine events; JSON round-trips through `to_dict` / `run_from_dict`, so a session's
runs can be exported and a browser can keep them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from qdemo.events import (DoneEvent, Event, GenerationStats, MemorySample, PrefillEvent, ProgressEvent, StageTopN,
                          TokenEvent)


@dataclass
class RunRecord:
    run_id: int
    model: str  # registry name
    settings: dict[str, Any]  # SamplingParams.to_dict() and anything else the UI wants to show
    label: str = ""  # e.g. "A" / "B" in Compare, "chat" in Chat
    forward: str = ""  # how the model ran: "llama.cpp Q4_K_M", "torch fp32"
    prefill: PrefillEvent | None = None
    tokens: list[TokenEvent] = field(default_factory=list)
    done: DoneEvent | None = None
    progress: ProgressEvent | None = None  # the latest, while work without tokens runs (not exported)

    def add(self, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            self.progress = event
        elif isinstance(event, PrefillEvent):
            self.prefill = event
        elif isinstance(event, TokenEvent):
            self.tokens.append(event)
        elif isinstance(event, DoneEvent):
            self.done = event
        else:
            raise TypeError(f"not an engine event: {type(event).__name__}")

    def extend(self, events: Iterable[Event]) -> "RunRecord":
        for event in events:
            self.add(event)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("progress", None)
        return data


def _memory(d: dict[str, Any]) -> MemorySample:
    return MemorySample(**d)


def _stages(items: list[dict[str, Any]]) -> tuple[StageTopN, ...]:
    return tuple(StageTopN(name=s["name"], token_ids=tuple(s["token_ids"]), probs=tuple(s["probs"]),
                           chosen_prob=s["chosen_prob"]) for s in items)


def prefill_from_dict(d: dict[str, Any]) -> PrefillEvent:
    return PrefillEvent(prompt_ids=tuple(d["prompt_ids"]), prefill_seconds=d["prefill_seconds"],
                        dropped_turns=tuple(d["dropped_turns"]), seed=d["seed"],
                        kv_cache_bytes=d["kv_cache_bytes"], memory=_memory(d["memory"]), row=d.get("row", 0),
                        reused_tokens=d.get("reused_tokens", 0))


def token_from_dict(d: dict[str, Any]) -> TokenEvent:
    return TokenEvent(step=d["step"], token_id=d["token_id"], text=d["text"], stages=_stages(d["stages"]),
                      step_seconds=d["step_seconds"], kv_cache_bytes=d["kv_cache_bytes"], memory=_memory(d["memory"]),
                      row=d.get("row", 0), drafted=d.get("drafted", False))


def done_from_dict(d: dict[str, Any]) -> DoneEvent:
    stats = {k: v for k, v in d["stats"].items() if k in GenerationStats.__dataclass_fields__}
    return DoneEvent(reason=d["reason"], stats=GenerationStats(**stats), text=d["text"],
                     token_ids=tuple(d["token_ids"]), error=d.get("error"), row=d.get("row", 0))


def run_from_dict(d: dict[str, Any]) -> RunRecord:
    return RunRecord(run_id=d["run_id"], model=d["model"], settings=dict(d["settings"]), label=d.get("label", ""),
                     forward=d.get("forward", ""),
                     prefill=prefill_from_dict(d["prefill"]) if d.get("prefill") else None,
                     tokens=[token_from_dict(t) for t in d.get("tokens", [])],
                     done=done_from_dict(d["done"]) if d.get("done") else None)
