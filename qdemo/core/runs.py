"""A finished (or running) generation as one record: what the Performance and Compare tabs fold over.

Plain data built from engine events; JSON round-trips through `to_dict` / `run_from_dict`, so a session's
runs can be exported and a browser can keep them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from qdemo.core.events import (
    DoneEvent,
    Event,
    GenerationStats,
    MemorySample,
    PrefillEvent,
    ProgressEvent,
    StageTopN,
    TokenEvent,
)


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
    # `removed` and `argmax_prob` arrived later: files written before them read as "nothing removed" and
    # "raw argmax not recorded" (None), which qdemo.probes.decided reports as unknown rather than as zero.
    return tuple(StageTopN(name=s["name"], token_ids=tuple(s["token_ids"]), probs=tuple(s["probs"]),
                           chosen_prob=s["chosen_prob"], removed=s.get("removed", 0.0),
                           argmax_prob=s.get("argmax_prob")) for s in items)


def prefill_from_dict(d: dict[str, Any]) -> PrefillEvent:
    return PrefillEvent(prompt_ids=tuple(d["prompt_ids"]), prefill_seconds=d["prefill_seconds"],
                        dropped_turns=tuple(d["dropped_turns"]), seed=d["seed"],
                        kv_cache_bytes=d["kv_cache_bytes"], memory=_memory(d["memory"]), row=d.get("row", 0),
                        reused_tokens=d.get("reused_tokens", 0), kv_allocated_bytes=d.get("kv_allocated_bytes", 0))


def token_from_dict(d: dict[str, Any]) -> TokenEvent:
    return TokenEvent(step=d["step"], token_id=d["token_id"], text=d["text"], stages=_stages(d["stages"]),
                      step_seconds=d["step_seconds"], kv_cache_bytes=d["kv_cache_bytes"], memory=_memory(d["memory"]),
                      row=d.get("row", 0), drafted=d.get("drafted", False),
                      kv_allocated_bytes=d.get("kv_allocated_bytes", 0))


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


def run_to_json(run: RunRecord) -> str:
    """The run as JSON text (UTF-8 as is: Chinese stays readable). NaN probabilities (beam stages of an
    unfinished search) are written as NaN, which Python's json reads back."""
    return json.dumps(run.to_dict(), ensure_ascii=False)


def _cut_short(text: str, error_at: int) -> bool:
    # An unterminated string reports where the string began, so the end of the text is checked too.
    body = text.rstrip()
    return error_at >= len(body) or not body.endswith(("}", "]"))


def run_from_json(text: str) -> RunRecord:
    """A run from `run_to_json` text (or any JSON object of `RunRecord.to_dict`'s shape). A ValueError names
    what is wrong: not JSON (and where), not an object, or the field that is missing or malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the run is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
                         f"{' (the file looks cut short)' if _cut_short(text, exc.pos) else ''}") from None
    if not isinstance(data, dict):
        raise ValueError(f"a run must be a JSON object, got a JSON {type(data).__name__}")
    try:
        return run_from_dict(data)
    except KeyError as exc:
        raise ValueError(f"the run has no field {exc.args[0]!r}") from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"the run's fields are malformed: {exc}") from None
