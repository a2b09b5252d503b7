"""Torch plans are one constrained solve (issue 14, deliverable 3): what the replay can run (pinned
values saved, values rewritten in place recomputed, an op's outputs sharing one fate) goes into
the core's solver as constraints, instead of a rewrite of its plan and up to six solves more."""

from __future__ import annotations

import pytest
import torch
from test_torch_outside_fixes import _ViT

import remat_kit as rk
from remat_kit._core.constraints import honours
from remat_kit._core.simulate import decision_codes
from remat_kit._torch import _plan
from remat_kit._torch._replay import constraints_for_torch, decisions_for_torch


def _vit_and_inputs():
    torch.manual_seed(0)
    model = _ViT()
    model.train()
    return model, (torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))


@pytest.fixture
def solves(monkeypatch):
    """The core solves solve_torch asks for, as (budget, constraints)."""
    calls = []
    real = _plan.solve

    def recorded(graph, budget, **kwargs):
        calls.append((budget, kwargs.get("constraints")))
        return real(graph, budget, **kwargs)

    monkeypatch.setattr(_plan, "solve", recorded)
    return calls


@pytest.mark.parametrize("budget", [0.4, 0.7])
def test_plan_is_the_solvers_answer_under_the_replays_constraints(solves, budget):
    model, args = _vit_and_inputs()
    entry = _plan.compile_plan(model, args, {}, budget)
    tg, prof, plan = entry.tg, entry.profile, entry.plan
    cons = constraints_for_torch(tg, prof)
    # The ViT has all three: values outside the layers, dropout masks written in place, ops with
    # several outputs (layer norm's mean and rstd, dropout's mask).
    assert cons.must_save and cons.must_recompute and cons.same_fate
    assert len(solves) == 1 and solves[0][1] == cons
    graph = plan.graph_for(tg.graph)
    assert honours(graph, decision_codes(graph, plan), cons) is None
    # Settling it to the replay's constraints changes nothing: no fix-up is left to make.
    assert decisions_for_torch(tg, plan, prof) == {
        graph.values[i].name: plan.decision(graph.values[i].name) for i in graph.free_values
    }
    assert plan.predicted_activation_bytes <= budget * plan.baseline_activation_bytes


def test_infeasible_budget_is_two_solves_and_names_the_solvers_floor(solves):
    """Below the floor: one solve at the margin, one at the budget, then the error naming the least
    the solver reaches under the same constraints; a budget at that figure is met."""
    model, args = _vit_and_inputs()
    with pytest.raises(rk.InfeasibleBudgetError) as info:
        _plan.compile_plan(model, args, {}, 0.2)
    assert 1 <= len(solves) <= 2 and all(c is not None and c.must_recompute for _, c in solves)
    floor = info.value.smallest_fraction
    assert floor > 0.2
    solves.clear()
    entry = _plan.compile_plan(model, args, {}, floor)
    assert len(solves) <= 2
    assert entry.plan.predicted_activation_bytes <= floor * entry.plan.baseline_activation_bytes
