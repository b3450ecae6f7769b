"""models.yaml → validated ModelSpec objects. Bad entries fail loudly, naming the entry and field."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from qdemo.errors import RegistryError
from qdemo.models.arena_entries import Contender, parse_arena
from qdemo.models.families import FAMILIES
from qdemo.sampling import SamplingParams

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "models.yaml"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSource:
    """A model repository on the Hugging Face hub, pinned to a revision."""

    repo_id: str
    revision: str = "main"

    def describe(self) -> str:
        return f"hub {self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class LocalSource:
    """A transformers checkpoint directory on disk."""

    path: Path

    def describe(self) -> str:
        return f"local {self.path}"


@dataclass(frozen=True)
class GgufPartsSource:
    """A GGUF file cut into parts shipped as data inside Python packages (never imported)."""

    packages: tuple[str, ...]
    file_name: str
    size: int
    sha256: str

    def describe(self) -> str:
        return f"gguf {self.file_name} from {len(self.packages)} package(s)"


@dataclass(frozen=True)
class OpenAISource:
    """A model served by an OpenAI-compatible server (llama.cpp's llama-server, vLLM, SGLang). qdemo sends it chat
    messages and reads back tokens with their log-probabilities; the weights stay on the server."""

    base_url: str  # e.g. http://127.0.0.1:8080/v1
    model: str  # the name the server knows the model by
    api_key_env: str | None = None  # the environment variable that holds the key (never the key itself)
    tokenizer: str | None = None  # a registry entry of the same model: its tokenizer renders tokens, counts the
    # prompt, and the panels that need weights offer it
    tokenizer_source: "HubSource | LocalSource | GgufPartsSource | None" = None  # or a source to take it from

    def describe(self) -> str:
        return f"remote {self.model} at {self.base_url}"


Source = Union[HubSource, LocalSource, GgufPartsSource, OpenAISource]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    display_name: str
    family: str
    source: Source
    sampling: SamplingParams
    max_context: int
    dtype: str = "auto"
    system_prompt: str | None = None
    notes: str = ""
    # Run the checkpoint's own Python code. Only for a hub source pinned to a commit sha, so the code that runs
    # is the code someone reviewed; no bundled entry needs it (qdemo loads every family natively).
    trust_remote_code: bool = False
    draft: str | None = None  # a smaller registry model with the same tokenizer, for speculative decoding
    draft_tokens: int = 4  # tokens the draft proposes per verification


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelSpec] = field(default_factory=dict)
    path: Path | None = None
    arena: tuple[Contender, ...] = ()  # the blind arena's contenders as listed (empty: the app builds defaults)

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models) or "none"
            raise RegistryError(f"unknown model {name!r}; models.yaml defines: {known}") from None

    def names(self) -> list[str]:
        return list(self.models)


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Read and validate a models.yaml (default: $QDEMO_MODELS or the one beside the package)."""
    path = Path(path or os.environ.get("QDEMO_MODELS") or DEFAULT_REGISTRY)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read model registry {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: invalid YAML: {exc}") from None
    return parse_registry(data, base_dir=path.parent, path=path)


_TOP_KEYS = {"default", "models", "arena"}
_ENTRY_KEYS = {"name", "display_name", "family", "source", "sampling", "max_context", "dtype", "system_prompt", "notes",
               "trust_remote_code", "draft", "draft_tokens"}
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_REQUIRED = ("name", "family", "source", "max_context")
_Fail = Callable[[str, str], RegistryError]  # (field, problem) → the error naming the entry and the field


def parse_registry(data: Any, base_dir: Path, path: Path | None = None) -> Registry:
    where = str(path) if path else "registry"
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: top level must be a mapping with 'default' and 'models'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RegistryError(f"{where}: unknown top-level key(s): {', '.join(sorted(map(str, unknown)))}")
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise RegistryError(f"{where}: 'models' must be a non-empty list")
    models: dict[str, ModelSpec] = {}
    for index, entry in enumerate(entries):
        spec = _parse_entry(entry, index, base_dir)
        if spec.name in models:
            raise RegistryError(f"{where}: duplicate model name {spec.name!r} (entry {index})")
        models[spec.name] = spec
    for spec in models.values():
        local = getattr(spec.source, "tokenizer", None)
        if local is not None and (local not in models or isinstance(models[local].source, OpenAISource)):
            raise RegistryError(f"{where}: entry {spec.name!r}: field 'source.openai.tokenizer' must name a local model "
                                f"of this registry (the same model, for its tokenizer), got {local!r}")
        if spec.draft is not None and (spec.draft not in models or spec.draft == spec.name):
            raise RegistryError(f"{where}: entry {spec.name!r}: field 'draft' must name another model of this "
                                f"registry, got {spec.draft!r}")
    default = data.get("default", next(iter(models)))
    if default not in models:
        raise RegistryError(f"{where}: default {default!r} is not a model name; names: {', '.join(models)}")
    arena = parse_arena(data.get("arena"), models, {name: _forwards(spec) for name, spec in models.items()}, where)
    return Registry(default=default, models=models, path=path, arena=arena)


def _forwards(spec: ModelSpec) -> tuple[str, ...]:
    """The forwards an arena contender may name for `spec` (whether llama.cpp is installed is the server's to say)."""
    if isinstance(spec.source, OpenAISource):
        return ()
    return ("torch", "llama.cpp") if isinstance(spec.source, GgufPartsSource) else ("torch",)


def _parse_entry(entry: Any, index: int, base_dir: Path) -> ModelSpec:
    if not isinstance(entry, dict):
        raise RegistryError(f"models.yaml entry {index}: must be a mapping, got {type(entry).__name__}")
    label = f"models.yaml entry {entry.get('name', index)!r}"

    def fail(field_name: str, problem: str) -> RegistryError:
        return RegistryError(f"{label}: field '{field_name}' {problem}")

    _check_entry_keys(entry, label, fail)
    name = _parse_name(entry["name"], fail)
    family = entry["family"]
    if family not in FAMILIES:
        raise fail("family", f"names unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    dtype = entry.get("dtype", "auto")
    if dtype not in DTYPES:
        raise fail("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_context = _parse_max_context(entry["max_context"], fail)
    sampling = _parse_sampling(entry.get("sampling", {}), max_context, fail)
    for key in ("display_name", "system_prompt", "notes"):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            raise fail(key, "must be text")
    source = _parse_source(entry["source"], fail, base_dir)
    trust = _parse_trust(entry.get("trust_remote_code", False), source, fail)
    draft, draft_tokens = _parse_draft(entry.get("draft"), entry.get("draft_tokens", 4), fail)
    return ModelSpec(
        draft=draft,
        draft_tokens=draft_tokens,
        name=name,
        display_name=entry.get("display_name") or name,
        family=family,
        source=source,
        sampling=sampling,
        max_context=max_context,
        dtype=dtype,
        system_prompt=entry.get("system_prompt"),
        notes=entry.get("notes") or "",
        trust_remote_code=trust,
    )


def _check_entry_keys(entry: dict, label: str, fail: _Fail) -> None:
    """No field qdemo does not know (a typo would be ignored silently), and every required one."""
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise RegistryError(f"{label}: unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    for key in _REQUIRED:
        if key not in entry:
            raise fail(key, "is missing")


def _parse_name(name: Any, fail: _Fail) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise fail("name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
    return name


def _parse_max_context(max_context: Any, fail: _Fail) -> int:
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 16:
        raise fail("max_context", f"must be an integer >= 16, got {max_context!r}")
    return max_context


def _parse_sampling(data: Any, max_context: int, fail: _Fail) -> SamplingParams:
    """The entry's default sampling; max_new_tokens, when not given, at most half the context."""
    if not isinstance(data, dict):
        raise fail("sampling", "must be a mapping")
    if "max_new_tokens" not in data:  # leave room for a prompt in small contexts
        data = {**data, "max_new_tokens": min(SamplingParams.max_new_tokens, max_context // 2)}
    try:
        sampling = SamplingParams.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise fail("sampling", f"is invalid: {exc}") from None
    if sampling.max_new_tokens >= max_context:
        raise fail("sampling", f"max_new_tokens {sampling.max_new_tokens} must be below max_context {max_context}")
    return sampling


def _parse_trust(trust: Any, source: Source, fail: _Fail) -> bool:
    """trust_remote_code, allowed only where the code that runs is pinned (a hub commit sha)."""
    if not isinstance(trust, bool):
        raise fail("trust_remote_code", f"must be true or false, got {trust!r}")
    if trust and not (isinstance(source, HubSource) and _COMMIT_SHA.fullmatch(source.revision)):
        raise fail("trust_remote_code", "is refused unless the source is a hub repository pinned to a 40-character "
                                        f"commit sha (source.hub.revision), got {source.describe()}")
    return trust


def _parse_draft(draft: Any, draft_tokens: Any, fail: _Fail) -> tuple[str | None, int]:
    """The speculative-decoding draft's name and tokens per proposal (that the name exists is checked once the
    whole registry is read)."""
    if draft is not None and not isinstance(draft, str):
        raise fail("draft", f"must be a model name, got {draft!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= 16:
        raise fail("draft_tokens", f"must be a whole number from 1 to 16, got {draft_tokens!r}")
    return draft, draft_tokens


def _parse_source(data: Any, fail, base_dir: Path) -> Source:
    if not isinstance(data, dict) or len(data) != 1:
        raise fail("source", "must be a mapping with exactly one of: hub, local, gguf, openai")
    (kind, body), = data.items()
    if kind == "hub":
        body = {"repo_id": body} if isinstance(body, str) else body
        _expect_keys(body, {"repo_id"}, {"revision"}, "source.hub", fail)
        return HubSource(repo_id=_text(body["repo_id"], "source.hub.repo_id", fail),
                         revision=_text(body.get("revision", "main"), "source.hub.revision", fail))
    if kind == "local":
        body = {"path": body} if isinstance(body, str) else body
        _expect_keys(body, {"path"}, set(), "source.local", fail)
        path = Path(os.path.expanduser(_text(body["path"], "source.local.path", fail)))
        return LocalSource(path=path if path.is_absolute() else (base_dir / path).resolve())
    if kind == "gguf":
        _expect_keys(body, {"packages", "file_name", "size", "sha256"}, set(), "source.gguf", fail)
        packages = body["packages"]
        if not isinstance(packages, list) or not packages or not all(isinstance(p, str) and p for p in packages):
            raise fail("source.gguf.packages", "must be a non-empty list of package names")
        size = body["size"]
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise fail("source.gguf.size", f"must be a positive integer, got {size!r}")
        sha = _text(body["sha256"], "source.gguf.sha256", fail).lower()
        if not _SHA256.match(sha):
            raise fail("source.gguf.sha256", f"must be 64 hex digits, got {body['sha256']!r}")
        file_name = _text(body["file_name"], "source.gguf.file_name", fail)
        if "/" in file_name or not file_name.endswith(".gguf"):
            raise fail("source.gguf.file_name", f"must be a bare *.gguf file name, got {file_name!r}")
        return GgufPartsSource(packages=tuple(packages), file_name=file_name, size=size, sha256=sha)
    if kind == "openai":
        _expect_keys(body, {"base_url", "model"}, {"api_key_env", "tokenizer"}, "source.openai", fail)
        base_url = _text(body["base_url"], "source.openai.base_url", fail).rstrip("/")
        if not re.match(r"https?://[^/\s]+", base_url):
            raise fail("source.openai.base_url", f"must be an http(s) URL such as http://127.0.0.1:8080/v1, got "
                                                 f"{base_url!r}")
        key_env = body.get("api_key_env")
        if key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key_env)):
            raise fail("source.openai.api_key_env", "must name an environment variable (the key itself never goes "
                                                    "in models.yaml)")
        tokenizer = body.get("tokenizer")
        model = _text(body["model"], "source.openai.model", fail)
        if isinstance(tokenizer, dict):  # a local/hub/GGUF source used for its tokenizer files only
            def fail_inner(field: str, why: str):
                return fail(f"source.openai.tokenizer.{field.removeprefix('source.')}", why)

            inner = _parse_source(tokenizer, fail_inner, base_dir)
            if isinstance(inner, OpenAISource):
                raise fail("source.openai.tokenizer", "must be a local, hub or gguf source, not another server")
            return OpenAISource(base_url=base_url, model=model, api_key_env=key_env, tokenizer_source=inner)
        return OpenAISource(base_url=base_url, model=model, api_key_env=key_env,
                            tokenizer=None if tokenizer is None else _text(tokenizer, "source.openai.tokenizer", fail))
    raise fail("source", f"has unknown kind {kind!r}; use hub, local, gguf or openai")


def _expect_keys(body: Any, required: set[str], optional: set[str], where: str, fail) -> None:
    if not isinstance(body, dict):
        raise fail(where, "must be a mapping")
    missing = required - set(body)
    if missing:
        raise fail(f"{where}.{sorted(missing)[0]}", "is missing")
    unknown = set(body) - required - optional
    if unknown:
        raise fail(where, f"has unknown key(s): {', '.join(sorted(map(str, unknown)))}")


def _text(value: Any, where: str, fail) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(where, f"must be non-empty text, got {value!r}")
    return value
