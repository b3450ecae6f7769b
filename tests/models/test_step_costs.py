"""Whether a batch of rows pays is read from the model's own recent decode steps."""

from __future__ import annotations

from qdemo.models import step_costs as module
from qdemo.models.step_costs import ENOUGH, StepCosts


def test_a_batch_pays_only_when_its_steps_cost_less_than_that_many_single_steps():
    costs = StepCosts()
    assert costs.batch_pays(2) is None
    for _ in range(ENOUGH):
        costs.add(1, 0.010)
    assert costs.batch_pays(2) is None  # two-row steps not seen yet
    for _ in range(ENOUGH - 1):
        costs.add(2, 0.014)
    assert costs.median(2) is None and costs.batch_pays(2) is None
    costs.add(2, 0.014)
    assert costs.batch_pays(2) is True
    for _ in range(40):  # the window forgets the old steps: now two rows cost more than two single steps
        costs.add(2, 0.021)
    assert costs.median(2) == 0.021 and costs.batch_pays(2) is False


def test_a_verdict_goes_stale_so_a_busy_spell_does_not_decide_for_good(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    costs = StepCosts()
    for _ in range(ENOUGH):
        costs.add(1, 0.010)
        costs.add(2, 0.030)
    assert costs.batch_pays(2) is False  # sides run one after the other: no two-row steps come any more
    now[0] += module.STALE_S - 1
    costs.add(1, 0.010)
    assert costs.batch_pays(2) is False
    now[0] += 2
    assert costs.median(2) is None and costs.batch_pays(2) is None  # the next Compare batches, and measures again
