"""The CLI on the tiny registry: models, chat, bench --json."""

from __future__ import annotations

import json

import pytest

from qdemo.cli import main


def test_models_lists_entries_and_cache_state(tiny_registry_path, capsys):
    assert main(["--registry", str(tiny_registry_path), "models"]) == 0
    out = capsys.readouterr().out
    assert "* tiny-qwen2" in out and "local" in out and "QDEMO_CACHE" in out


def test_bundled_models_listing(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "* qwen2.5-coder-0.5b-instruct" in out and "qwen2.5-7b-instruct" in out


def test_chat_streams_and_reports(tiny_registry_path, capsys):
    code = main(["--registry", str(tiny_registry_path), "chat", "tiny-qwen2", "你好 hello", "--seed", "3",
                 "--max-new-tokens", "6", "--stages"])
    captured = capsys.readouterr()
    assert code == 0
    assert "tokens, TTFT" in captured.err and "raw:" in captured.err and "top_k:" in captured.err


def test_chat_reports_bad_values_readably(tiny_registry_path, capsys):
    assert main(["--registry", str(tiny_registry_path), "chat", "tiny-qwen2", "hi", "--top-p", "2"]) == 2
    assert "top_p must be in (0.0, 1.0], got 2.0" in capsys.readouterr().err
    assert main(["--registry", str(tiny_registry_path), "chat", "nope", "hi"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_bench_json(tiny_registry_path, capsys):
    assert main(["--registry", str(tiny_registry_path), "bench", "tiny-qwen2", "--tokens", "8", "--runs", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 8 and result["model"] == "tiny-qwen2"
    for key in ("engine_tok_s", "hf_tok_s", "ratio", "engine_ttft_s", "bandwidth_gb_s", "limit_tok_s",
                "engine_vs_limit"):
        assert result[key] > 0
    assert result["step_bytes"] < result["weight_bytes"]  # untied embedding: one row read per step


@pytest.mark.parametrize("scenario,key", [("multiturn", "ratio"), ("ab", "speedup"), ("sweep", "speedup")])
def test_bench_scenarios_measure_side_by_side(tiny_dir, tmp_path, scenario, key):
    from qdemo.bench.scenarios import format_scenario, run_scenario
    from qdemo.models.loader import load_model
    from qdemo.models.registry import load_registry
    from tests.conftest import write_registry

    path = write_registry(tmp_path / "models.yaml", tiny_dir, max_context=8192)
    lm = load_model(load_registry(path).get("tiny-qwen2"), device="cpu")
    result = run_scenario(scenario, lm.spec.name, runs=1, tokens=8, registry_path=str(path), lm=lm)
    assert result["scenario"] == scenario and result[key] > 0
    if scenario == "multiturn":
        assert result["same_first_token"] and result["history_tokens"] >= 3000 - 200
    if scenario == "sweep":  # the batch's samples are the one-by-one samples, and every row count was timed
        assert result["same_samples"] and result["runs"] == 72 and sorted(result["step_ms"]) == [1, 2, 4, 7, 8]
    assert scenario in format_scenario(result)
