"""Run records collect engine events and survive a JSON round trip unchanged."""

from __future__ import annotations

import json

import pytest

from qdemo.core.engine import generate
from qdemo.core.runs import RunRecord, run_from_dict


def test_record_round_trips_through_json(tiny_lm):
    params = tiny_lm.spec.sampling.replace(seed=5, max_new_tokens=6)
    record = RunRecord(run_id=3, model="tiny-qwen2", settings=params.to_dict(), label="A")
    record.extend(generate(tiny_lm, messages=[{"role": "user", "content": "你好 hi"}], params=params, top_n=4))
    assert record.prefill is not None and record.done is not None
    assert len(record.tokens) == record.done.stats.new_tokens
    again = run_from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record


def test_add_rejects_foreign_objects():
    with pytest.raises(TypeError, match="not an engine event"):
        RunRecord(run_id=0, model="m", settings={}).add({"kind": "TokenEvent"})
