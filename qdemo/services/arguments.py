"""Reading a named endpoint's arguments: one typed reader for every field and one validator for every conversation,
so that every endpoint refuses the same wrong value in the same words. No Gradio here: qdemo.ui.api and
qdemo.ui.api_probes read each argument through an `Arguments` at the boundary and call the services with plain,
checked values.

Every refusal is a Refused naming the field (a history message by its index) and quoting at most MAX_ECHO
characters of the value. null means "not given": the field's default. Booleans are JSON booleans only ("false",
"no" and 0 are refused, never read as true); whole numbers are JSON integers in their range. Texts are cleaned
(control characters, invalid UTF-8) and cut to the server's input limit with a notice, as the README promises for
long inputs; `Arguments.notice` says what was cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from qdemo.core.runs import RunRecord
from qdemo.forwards.choice import split_ref
from qdemo.models.loader import entry_key
from qdemo.services.admission import Refused, Services, echo
from qdemo.services.chat import ROLES, message_text
from qdemo.serving.limits import Limits, clean_text, cut_text
from qdemo.views.bundle import MAX_TOKEN_ID, read_bundle, run_ids


def kind(value: Any) -> str:
    """What a caller sent, in words: the JSON kind a Python value came from."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "text",
            list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


@dataclass
class Arguments:
    """One request's arguments, read against the server's limits; `notices` collects what was cut to fit."""

    limits: Limits
    cuts: dict[str, str] = field(default_factory=dict)  # field name → the notice saying how it was cut

    @property
    def notices(self) -> list[str]:
        return list(self.cuts.values())

    @property
    def notice(self) -> str:
        return " ".join(self.notices)

    # --- plain fields ---------------------------------------------------------------------------------------------
    def text(self, value: Any, name: str, *, required: bool = False) -> str:
        """A text: cleaned, and cut to the input limit with a notice. null is ""; `required`: empty is refused."""
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise Refused(f"{name} must be text, got {kind(value)}: {echo(value)}")
        text = clean_text(value)
        if required and not text.strip():
            raise Refused(f"{name} is empty")
        return self._cut(text, name)

    def optional_text(self, value: Any, name: str) -> str | None:
        """A text that may be left out (null: None), such as the system prompt."""
        return None if value is None else self.text(value, name)

    def model(self, value: Any, name: str = "model") -> str:
        """A model reference ("" or null: the server's default); admission checks the name itself."""
        if value is None:
            return ""
        if not isinstance(value, str):
            raise Refused(f"{name} must be a model name (text), got {kind(value)}: {echo(value)}")
        return value

    def flag(self, value: Any, name: str, default: bool = False) -> bool:
        """true or false, nothing else: "false", "no" and 0 are not false and not true either."""
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Refused(f"{name} must be true or false (a JSON boolean), got {kind(value)}: {echo(value)}")
        return value

    def whole(self, value: Any, name: str, low: int, high: int | None = None, default: int | None = None) -> int:
        """A whole number in low..high (a JSON integer: 2.0, "2" and true are refused)."""
        if value is None and default is not None:
            return default
        span = f"from {low:,} to {high:,}" if high is not None else f"of at least {low:,}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise Refused(f"{name} must be a whole number {span}, got {kind(value)}: {echo(value)}")
        if value < low or (high is not None and value > high):
            raise Refused(f"{name} must be a whole number {span}, got {echo(value)}")
        return value

    def choice(self, value: Any, name: str, options: Sequence[str], default: str | None = None) -> str:
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or value not in options:
            raise Refused(f"{name} must be one of {', '.join(options)}, got {echo(value)}")
        return value

    def settings(self, value: Any, name: str = "settings") -> dict[str, Any] | None:
        """Sampling settings: an object of SamplingParams fields (admission checks each), or null."""
        if value is not None and not isinstance(value, Mapping):
            raise Refused(f"{name} must be a JSON object of sampling fields, got {kind(value)}: {echo(value)}")
        return None if value is None else dict(value)

    def texts(self, value: Any, name: str, most: int) -> list[str]:
        """A non-empty list of at most `most` texts, each read as `text` ("name i")."""
        if not isinstance(value, list) or not value:
            raise Refused(f"{name} must be a non-empty list of texts, got {kind(value)}: {echo(value)}")
        if len(value) > most:
            raise Refused(f"at most {most} {name} in one request, got {len(value)}")
        return [self.text(item, f"{name} {i}") for i, item in enumerate(value)]

    # --- tokens -------------------------------------------------------------------------------------------------
    def token_id(self, value: Any, name: str, vocab: int | None = None) -> int:
        """A token id: a whole number below the model's vocabulary size where it is known."""
        top = (vocab or MAX_TOKEN_ID + 1) - 1
        return self.whole(value, f"{name} (a token id)", 0, top)

    def token(self, value: Any, name: str) -> int | str:
        """A token given by its id or by its text (the model decides whether the text is one token)."""
        if isinstance(value, str):
            if not value:
                raise Refused(f"{name} is empty: give a token id or the text of one token")
            return self._cut(clean_text(value), name)
        return self.token_id(value, name)

    # --- conversations ------------------------------------------------------------------------------------------
    def history(self, value: Any, name: str = "history", *, answer: str | None = None) -> list[dict[str, str]]:
        """A conversation: a list of {role, content} messages of the user and the assistant, each content text (or
        a list of text parts, as Gradio's chatbot writes it), cleaned and cut to the input limit with a notice. A
        message of another role (system, tool…) is refused by its index: the system prompt has its own field. With
        `answer` (what the endpoint does with it), the last message must be the assistant's answer."""
        if value is None:
            value = []
        if not isinstance(value, list):
            raise Refused(f"{name} must be a list of {{role, content}} messages, got {kind(value)}: {echo(value)}")
        messages = [self._message(m, f"{name} message {i}") for i, m in enumerate(value)]
        if answer and (not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip()):
            raise Refused(f"{name} must end with the assistant answer {answer}")
        return messages

    def _message(self, message: Any, where: str) -> dict[str, str]:
        if not isinstance(message, Mapping):
            raise Refused(f"{where} must be a {{role, content}} object, got {kind(message)}: {echo(message)}")
        role = message.get("role")
        if role not in ROLES:
            hint = " (put the system prompt in `system`)" if role == "system" else ""
            raise Refused(f"{where} has role {echo(role)}; expected user or assistant{hint}")
        metadata = message.get("metadata")
        if isinstance(metadata, Mapping) and metadata.get("title"):
            raise Refused(f"{where} is a titled note (metadata.title), not a message of the conversation")
        try:
            text = message_text(message, where)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        return {"role": role, "content": self._cut(text, where)}

    # --- runs ---------------------------------------------------------------------------------------------------
    def run(self, value: Any, services: Services, name: str = "run") -> RunRecord:
        """A run's JSON (the `run` field of /decisions) or an evidence bundle's HTML, read back whole: its model a
        name this server serves, its token ids within that model's vocabulary where the model is loaded here."""
        if not isinstance(value, str) or not value.strip():
            raise Refused(f"{name} must be a run's JSON text (the 'run' field of /decisions) or a bundle's HTML, got "
                          f"{kind(value)}: {echo(value)}")
        try:
            record = read_bundle(value)  # not cut to the input limit: a run's JSON is longer, and read whole
        except ValueError as exc:
            raise Refused(f"{name}: {exc}") from None
        vocab = loaded_vocabulary(services, record.model)
        if vocab:
            for where, token in run_ids(record):
                if token >= vocab:
                    raise Refused(f"{name}: {where} is {token}, outside the vocabulary of {record.model} "
                                  f"(0..{vocab - 1})")
        return record

    def _cut(self, text: str, name: str) -> str:
        text, notice = cut_text(text, self.limits.max_input_chars, name)
        if notice:
            self.cuts[name] = notice
        return text


def loaded_vocabulary(services: Services, model: str) -> int | None:
    """The vocabulary size of `model` as this server runs it, where a copy is loaded here (None: not loaded, or a
    remote server's). Reading it never loads a model: that is admission's to do."""
    name, forward = services.model_ref(model)
    key = entry_key(split_ref(name)[0], forward)
    if forward == "remote" or key not in services.pool.loaded():
        return None
    try:
        return services.pool.get(name, forward=forward).vocab_size or None
    except (ValueError, KeyError):
        return None
