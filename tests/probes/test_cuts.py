"""Every probe ends early when its clock says so (the user's Stop, the server's time limit, a caller gone), between
its chunks, units or layers, and says how far it got (issue 19, item 5).

Oracles: the probe run to its end on the same ids (what a cut probe returns must be the beginning of that, value
for value), and a count of the forwards it ran (none may start after the clock said stop)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from qdemo.errors import Cut, Interrupted
from qdemo.probes.attribution import gradient_x_input, occlusion, token_units
from qdemo.probes.introspect import attention_maps
from qdemo.probes.lens import logit_lens
from qdemo.probes.scoring import divergence, score_ids


class Gate:
    """A step lock that counts the forwards it let through."""

    def __init__(self) -> None:
        self.forwards = 0

    @contextmanager
    def __call__(self):
        self.forwards += 1
        yield


def after(gate: Gate, forwards: int, reason: str = "time_limit"):
    """A clock that says `reason` once `gate` has let `forwards` forwards through."""
    return lambda: reason if gate.forwards >= forwards else None


def text_ids(lm, n: int) -> list[int]:
    ids = lm.tokenizer.encode("def is_prime(n): return n > 1 and 你好 all(n % k for k in range(2, n)) " * 3,
                              add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


def test_occlusion_stops_between_units_with_the_units_done_so_far(tiny_lm):
    ids = text_ids(tiny_lm, 20)
    context, target = ids[:-1], ids[-1]
    units = token_units([str(t) for t in context])
    full = occlusion(tiny_lm, context, target, units)
    gate = Gate()
    cut = occlusion(tiny_lm, context, target, units, gate, should_stop=after(gate, 5))
    assert gate.forwards == 5  # the full context, then four units; nothing after the clock said stop
    assert cut.cut == Cut("time_limit", 4, len(units), "units")
    done = [i for i, s in enumerate(cut.scores) if s is not None]
    assert done == list(range(len(units) - 4, len(units)))  # units run from the last one back
    assert [cut.scores[i] for i in done] == pytest.approx([full.scores[i] for i in done], abs=1e-6)
    assert full.cut is None and cut.to_dict()["cut"] == {"reason": "time_limit", "done": 4, "total": len(units),
                                                          "unit": "units"}


def test_occlusion_cut_before_its_first_unit_has_nothing_to_show(tiny_lm):
    ids = text_ids(tiny_lm, 12)
    gate = Gate()
    with pytest.raises(Interrupted) as caught:
        occlusion(tiny_lm, ids[:-1], ids[-1], token_units([str(t) for t in ids[:-1]]), gate, chunk=4,
                  should_stop=after(gate, 1, "stopped"))
    assert gate.forwards == 1 and caught.value.cut == Cut("stopped", 0, 11, "units")
    assert "stopped" in str(caught.value)


def test_the_lens_keeps_the_columns_of_the_chunks_it_finished(tiny_lm):
    ids = text_ids(tiny_lm, 24)
    positions = list(range(2, 23, 2))  # 11 columns over six chunks of 4
    full = logit_lens(tiny_lm, ids, positions, chunk=4)
    gate = Gate()
    cut = logit_lens(tiny_lm, ids, positions, gate, chunk=4, should_stop=after(gate, 3))
    assert gate.forwards == 3
    kept = [p for p in positions if p < 12]  # the first three chunks hold tokens 0..11
    assert cut.positions == tuple(kept) and cut.cut == Cut("time_limit", len(kept), len(positions), "columns")
    np.testing.assert_array_equal(cut.top_ids, full.top_ids[:, :len(kept)])
    np.testing.assert_allclose(cut.target_probs, full.target_probs[:, :len(kept)], atol=1e-6)
    assert cut.to_dict()["cut"]["done"] == len(kept) and full.cut is None


def test_the_lens_cut_before_any_column_raises(tiny_lm):
    ids = text_ids(tiny_lm, 24)
    gate = Gate()
    with pytest.raises(Interrupted) as caught:
        logit_lens(tiny_lm, ids, [20, 21], gate, chunk=4, should_stop=after(gate, 2))
    assert gate.forwards == 2 and caught.value.cut == Cut("time_limit", 0, 2, "columns")


def test_scoring_keeps_the_positions_it_scored(tiny_lm):
    ids = text_ids(tiny_lm, 22)
    full = score_ids(tiny_lm, ids, first=3, chunk=4)
    gate = Gate()
    cut = score_ids(tiny_lm, ids, gate, first=3, chunk=4, should_stop=after(gate, 2))
    assert gate.forwards == 2
    # the first chunk is context up to token 3 (positions 3 and 4 predicted by tokens 2..3), the second four more
    n = cut.count
    assert 0 < n < full.count and cut.cut == Cut("time_limit", n, full.count, "tokens")
    assert cut.positions == full.positions[:n] and cut.token_ids == full.token_ids[:n]
    assert cut.logprobs == pytest.approx(full.logprobs[:n], abs=1e-9)
    assert cut.to_dict()["cut"]["total"] == full.count and full.to_dict()["cut"] is None


def test_divergence_keeps_the_positions_both_models_read(tiny_lm):
    ids = text_ids(tiny_lm, 22)
    full = divergence(tiny_lm, tiny_lm, ids, chunk=4)
    gate = Gate()
    cut = divergence(tiny_lm, tiny_lm, ids, gate, gate, chunk=4, should_stop=after(gate, 4))
    assert gate.forwards == 4  # two chunks of each model
    assert cut.count == 8 and cut.cut == Cut("time_limit", 8, full.count, "tokens")
    assert cut.kl_ab == pytest.approx(full.kl_ab[:8], abs=1e-9) and cut.top1_a == full.top1_a[:8]


def layer_calls(lm) -> tuple[list[int], list]:
    calls: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
               for i, layer in enumerate(lm.model.model.layers)]
    return calls, handles


@pytest.mark.parametrize("probe", ["gradient×input", "attention"])
def test_one_forward_probes_stop_between_layers(tiny_lm, probe):
    ids = text_ids(tiny_lm, 10)
    asked: list[int] = []

    def clock() -> str | None:
        asked.append(1)
        return "stopped" if len(asked) >= 2 else None  # before the run, then before layer 0, …

    calls, handles = layer_calls(tiny_lm)
    try:
        with pytest.raises(Interrupted) as caught:
            if probe == "attention":
                attention_maps(tiny_lm, ids, should_stop=clock)
            else:
                gradient_x_input(tiny_lm, ids[:-1], ids[-1], should_stop=clock)
    finally:
        for h in handles:
            h.remove()
    layers = len(tiny_lm.model.model.layers)
    assert caught.value.cut.reason == "stopped" and caught.value.cut.total == layers
    assert len(calls) < layers  # the forward ended inside the model
    with torch.no_grad():
        assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_a_clock_that_never_rings_changes_nothing(tiny_lm):
    ids = text_ids(tiny_lm, 12)
    quiet = lambda: None  # noqa: E731
    assert score_ids(tiny_lm, ids, should_stop=quiet).logprobs == score_ids(tiny_lm, ids).logprobs
    np.testing.assert_array_equal(attention_maps(tiny_lm, ids, should_stop=quiet), attention_maps(tiny_lm, ids))
    a = gradient_x_input(tiny_lm, ids[:-1], ids[-1], should_stop=quiet)
    assert a.scores == gradient_x_input(tiny_lm, ids[:-1], ids[-1]).scores and a.cut is None
