"""models.yaml's `arena:` section, read strictly: each bad contender fails loudly with its name and the field."""

from __future__ import annotations

import textwrap

import pytest

from qdemo.errors import RegistryError
from qdemo.models.arena_entries import Contender
from qdemo.models.registry import load_registry

MODELS = """\
default: small
models:
  - name: small
    family: qwen2
    source: {hub: {repo_id: Qwen/Qwen2.5-0.5B-Instruct}}
    max_context: 4096
    sampling: {do_sample: true, temperature: 0.7}
  - name: packed
    family: qwen2
    source:
      gguf:
        packages: [pkg-part1]
        file_name: m.gguf
        size: 10
        sha256: 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    max_context: 4096
  - name: far
    family: qwen2
    source: {openai: {base_url: "http://127.0.0.1:8080/v1", model: m}}
    max_context: 4096
"""


def registry_with(tmp_path, arena: str):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS + textwrap.dedent(arena), encoding="utf-8")
    return load_registry(path)


def test_contenders_are_read_with_their_forward_and_preset(tmp_path):
    registry = registry_with(tmp_path, """\
        arena:
          - {name: small greedy, model: small, settings: {do_sample: false}}
          - {name: packed torch, model: packed, forward: torch}
          - {name: packed llama, model: packed, forward: llama.cpp, settings: {top_p: 0.95}}
          - {name: far default, model: far}
        """)
    assert registry.arena == (Contender("small greedy", "small", None, {"do_sample": False}),
                              Contender("packed torch", "packed", "torch", {}),
                              Contender("packed llama", "packed", "llama.cpp", {"top_p": 0.95}),
                              Contender("far default", "far", None, {}))
    assert [c.ref for c in registry.arena] == ["small", "packed [torch]", "packed [llama.cpp]", "far"]


def test_no_arena_section_means_no_listed_contenders(tmp_path):
    assert registry_with(tmp_path, "").arena == ()


def test_the_bundled_registry_lists_the_default_models_presets_and_both_forwards():
    registry = load_registry()
    assert len(registry.arena) >= 3 and all(c.model == registry.default for c in registry.arena)
    assert {c.forward for c in registry.arena} >= {"torch", "llama.cpp"}
    assert any(c.settings.get("do_sample") is False for c in registry.arena)


BAD = [
    ("  - {name: a, model: small}\n", "'arena' must be a list of at least two contenders"),
    ("  {name: a}\n", "'arena' must be a list"),
    ("  - {name: a, model: small}\n  - [b]\n", "arena entry 1 must be a mapping"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, temprature: 1}\n",
     "arena entry 'b': unknown key(s): temprature"),
    ("  - {name: a, model: small}\n  - {name: b, model: missing}\n",
     "arena entry 'b': 'model' must name a model of this registry (small, packed, far), got 'missing'"),
    ("  - {name: a, model: small}\n  - {model: small}\n", "arena entry 1: 'name' must be text"),
    ("  - {name: a, model: small}\n  - {name: " + "n" * 61 + ", model: small}\n", "1 to 60 characters"),
    ("  - {name: a, model: small}\n  - {name: a, model: small}\n", "duplicate contender name 'a'"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, forward: vllm}\n",
     "arena entry 'b': 'forward' must be one of torch, llama.cpp"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, forward: llama.cpp}\n",
     "'forward' llama.cpp does not apply to small: it runs only on torch"),
    ("  - {name: a, model: small}\n  - {name: b, model: far, forward: torch}\n",
     "'forward' torch does not apply to far: it runs on a remote server"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, settings: {temperature: -1}}\n",
     "arena entry 'b': 'settings' is invalid: sampling field temperature"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, settings: {bogus: 1}}\n",
     "'settings' is invalid: unknown sampling field(s): bogus"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, settings: {seed: 3}}\n",
     "'settings' may not fix seed"),
    ("  - {name: a, model: small}\n  - {name: b, model: small, settings: [1]}\n",
     "'settings' must be a mapping of sampling fields"),
]


@pytest.mark.parametrize("body, says", BAD, ids=[says[:40] for _, says in BAD])
def test_a_bad_contender_fails_naming_its_entry_and_field(tmp_path, body, says):
    with pytest.raises(RegistryError) as failed:
        registry_with(tmp_path, "arena:\n" + body)
    assert says in str(failed.value)


def test_an_unknown_top_level_key_is_still_refused(tmp_path):
    with pytest.raises(RegistryError, match="unknown top-level key"):
        registry_with(tmp_path, "arenas: []\n")
