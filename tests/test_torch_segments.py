"""Consecutive layers checkpointed as one region (plan segments) in the torch adapter.

On a deep chain of small layers the kept layer boundaries are the floor of one checkpoint per
layer; only regions spanning several layers (√n / rotor style) go below it. Properties: such a
plan is chosen below that floor, its gradients are those of no remat, its measured activation
memory fits the budget and matches the prediction, and a forward that leaves a region early is
refused before anything wrong is applied.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import remat_kit
from remat_kit._torch._api import state_of
from remat_kit._torch._limits import floor_plan
from remat_kit._torch._measure import measure_step
from tests.torch_helpers import grads, max_rel_err


class _Layer(nn.Module):
    """A residual MLP layer that takes a mask by keyword and returns a tuple, as HF layers do."""

    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.dropout = True

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.fc2(torch.tanh(self.fc1(x)))
        if self.dropout:
            h = F.dropout(h, 0.1, self.training)
        return x + h * scale, None


class _Chain(nn.Module):
    def __init__(self, n: int = 24, d: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(_Layer(d) for _ in range(n))
        self.head = nn.Linear(d, 4)
        self.stop_after: int | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(x.mean(dim=0, keepdim=True))  # made before the layers, read by each
        for k, block in enumerate(self.blocks):
            if self.stop_after is not None and k == self.stop_after:
                break
            x = block(x, scale=scale)[0]
        return F.cross_entropy(self.head(x), y)


def _setup(n: int = 24):
    torch.manual_seed(0)
    model = _Chain(n).train()
    inputs = (torch.randn(256, 64), torch.randint(0, 4, (256,)))
    reference = grads(model, *inputs)
    torch.manual_seed(1)
    none = measure_step(model, inputs, loss_fn=lambda loss: loss)
    return model, inputs, reference, none


@pytest.fixture(scope="module")
def chain():
    return _setup()


@pytest.fixture(scope="module")
def long_chain():
    # Long enough that a forward stopped inside its last region still fits the budget
    # (a shorter chain has a higher floor: its regions cannot be as long).
    return _setup(40)


def test_below_the_per_layer_floor_layers_share_regions_with_exact_gradients(chain):
    model, inputs, reference, none = chain
    rematted = remat_kit.auto(copy.deepcopy(model), budget=0.3)
    got = grads(rematted, *inputs)
    assert max_rel_err(got, reference) <= 1e-6
    (compiled,) = state_of(rematted).plans.values()
    plan = compiled.plan
    assert floor_plan(compiled.tg).activation_fraction > 0.3  # one checkpoint per layer cannot fit
    assert any(len(seg) > 1 for seg in plan.segments)
    assert any(region.members for region in compiled.regions.values())
    torch.manual_seed(1)
    measured = measure_step(rematted, inputs, loss_fn=lambda loss: loss)
    assert measured.activation_bytes <= 0.3 * none.activation_bytes
    assert measured.activation_bytes - plan.predicted_activation_bytes <= 0.002 * none.activation_bytes
    assert measured.flops - none.flops == plan.predicted_recompute_flops


def test_a_forward_that_leaves_a_region_early_is_refused_and_replanned(long_chain):
    model, inputs, _, _ = long_chain
    rematted = remat_kit.auto(copy.deepcopy(model), budget=0.3)
    grads(rematted, *inputs)  # plans with multi-layer regions
    (compiled,) = state_of(rematted).plans.values()
    *ran, last = [r.members for r in compiled.regions.values() if r.members][-1]
    # Stop before the last layer of the last multi-layer region, so the region is left early: the
    # shorter forward is re-planned as a whole model, and the budget must still be feasible for it
    # (the longer it is, the lower its floor; one layer alone cannot reach 0.3 of its step).
    assert ran
    stop = int(last.rsplit(".", 1)[1])
    short = copy.deepcopy(model)
    short.stop_after = stop
    rematted.stop_after = stop
    want = grads(short, *inputs)
    with pytest.warns(UserWarning, match="differs from its profile"):
        got = grads(rematted, *inputs)
    assert max_rel_err(got, want) <= 1e-6
    # Nothing is left open: the next op outside the model is not recorded by a stale region.
    assert state_of(rematted).segment is None
    torch.randn(3).sum()


def test_error_names_the_smallest_budget_with_regions_over_several_layers(chain):
    model, inputs, _, _ = chain
    with pytest.raises(remat_kit.InfeasibleBudgetError, match=r"budget=0\.05 is below the smallest feasible budget"):
        grads(remat_kit.auto(copy.deepcopy(model), budget=0.05), *inputs)


def test_torch_compile_of_a_model_with_multi_layer_regions(chain):
    """Under torch.compile a region over several layers runs eagerly (a graph break). Layers
    without random ops may share one there; layers with dropout may not (eager dropout draws other
    masks than Inductor's compiled no remat), so a budget only their grouping reaches is refused."""
    model, inputs, _, _ = chain
    with pytest.raises(remat_kit.InfeasibleBudgetError, match="run it eagerly") as refused:
        grads(torch.compile(remat_kit.auto(copy.deepcopy(model), budget=0.3), backend="aot_eager"), *inputs)
    assert refused.value.smallest_fraction > 0.3
    plain = copy.deepcopy(model)
    for block in plain.blocks:
        block.dropout = False
    reference = grads(plain, *inputs)
    rematted = remat_kit.auto(copy.deepcopy(plain), budget=0.3)
    compiled = torch.compile(rematted, backend="aot_eager")
    assert max_rel_err(grads(compiled, *inputs), reference) <= 1e-6
    assert any(len(seg) > 1 for seg in remat_kit.plan_of(rematted)[-1].segments)
