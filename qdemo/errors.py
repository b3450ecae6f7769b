"""Exceptions a user can act on. Each message names the model, field or value at fault; and `Cut`, how far work
ended early by its clock got (the words every view shows)."""

from __future__ import annotations

from dataclasses import dataclass


class QdemoError(Exception):
    """Base class for qdemo errors that carry a user-facing message."""


class RegistryError(QdemoError, ValueError):
    """models.yaml is malformed or names something unknown."""


class SourceError(QdemoError):
    """Weights could not be located, verified or materialised."""


class PromptTooLongError(QdemoError, ValueError):
    """Even the newest turn alone does not fit the model's context."""


@dataclass(frozen=True)
class Cut:
    """How far a piece of work got when its clock ended it: the user's Stop ("stopped", a caller that went away
    reads the same) or the server's time limit ("time_limit"), after `done` of `total` `unit`."""

    reason: str  # "stopped" | "time_limit"
    done: int
    total: int
    unit: str  # what was counted: "units", "columns", "tokens", "layers"

    def words(self, limit_s: float | None = None) -> str:
        """"stopped by you after 3 of 8 units", "cut at this server's time limit (4 s) after 3 of 8 units"."""
        if self.reason == "time_limit":
            what = "cut at this server's time limit" + (f" ({limit_s:g} s)" if limit_s else "")
        else:
            what = "stopped by you" if self.reason == "stopped" else f"ended ({self.reason})"
        return f"{what} after {self.done:,} of {self.total:,} {self.unit}"


class Interrupted(QdemoError, ValueError):
    """Work ended by its clock (Stop, the time limit, a caller gone) before it had anything to show. A ValueError,
    so every layer that turns a bad request into the user's message shows this one too."""

    def __init__(self, cut: Cut, what: str = "") -> None:
        self.cut, self.what = cut, what
        super().__init__(self.words())

    def words(self, limit_s: float | None = None) -> str:
        """The message, naming the time limit when it is known."""
        return f"{self.what + ': ' if self.what else ''}{self.cut.words(limit_s)}, before there was anything to show"
