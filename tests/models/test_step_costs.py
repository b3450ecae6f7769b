"""Whether a batch of rows pays is read from the model's own recent decode steps."""

from __future__ import annotations

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
