"""remat_kit.auto on torch modules: exact gradients, measured memory within budget, exact FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch_helpers import Block, TinyGPT, fresh, grads, max_rel_err, tokens

import remat_kit._torch as rt
from remat_kit import InfeasibleBudgetError
from remat_kit._core.simulate import simulate
from remat_kit._torch._api import state_of
from remat_kit._torch._measure import measure_step

BUDGETS = (1.0, 0.7, 0.5, 0.3)


def _setup(layers: int, seq: int):
    torch.manual_seed(0)
    model = TinyGPT(layers=layers, d=16, heads=4)
    idx, tgt = tokens(batch=2, seq=seq)
    reference = grads(model, idx, tgt)
    none = measure_step(model, (idx, tgt), loss_fn=lambda loss: loss)
    return model, (idx, tgt), reference, none


@pytest.fixture(scope="module")
def gpt():
    return _setup(layers=8, seq=48)


def compiled_of(model):
    (compiled,) = state_of(model).plans.values()
    return compiled


@pytest.mark.parametrize("budget", BUDGETS)
def test_gradients_memory_and_flops_match_the_plan(gpt, budget):
    _check_budget(gpt, budget)


def test_budget_0_2_on_a_deeper_model():
    _check_budget(_setup(layers=12, seq=24), 0.2)


def _check_budget(setup, budget):
    model, inputs, reference, none = setup
    rematted = rt.auto(fresh(model), budget)
    got = grads(rematted, *inputs)
    # Same seed, same dropout masks: the gradients are those of no remat (fp32).
    assert max_rel_err(got, reference) <= 1e-6
    plan = compiled_of(rematted).plan
    torch.manual_seed(1)
    measured = measure_step(rematted, inputs, loss_fn=lambda loss: loss)
    assert measured.activation_bytes <= budget * none.activation_bytes
    # The measured peak is never above the simulator's prediction by more than a rounding error,
    # and below it by at most 2% of no remat (the simulator counts layer-norm statistics the
    # replay recomputes, and one gradient buffer per residual-add input).
    assert measured.activation_bytes - plan.predicted_activation_bytes <= 0.002 * none.activation_bytes
    assert plan.predicted_activation_bytes - measured.activation_bytes <= 0.02 * none.activation_bytes
    # FlopCounterMode counts the replayed ops: extra FLOPs are exactly the predicted recompute.
    assert measured.flops - none.flops == plan.predicted_recompute_flops
    if budget < 1.0:
        assert plan.predicted_recompute_flops > 0


def test_infeasible_budget_names_the_smallest_feasible_one(gpt):
    model, inputs, _, _ = gpt
    rematted = rt.auto(fresh(model), 0.01)
    with pytest.raises(ValueError, match=r"budget=0\.01 is below the smallest feasible budget 0\.\d+") as info:
        rematted(*inputs)
    smallest = float(str(info.value).split("smallest feasible budget ")[1].split()[0])
    rt.unwrap(rematted)
    rt.auto(rematted, smallest)
    rematted(*inputs).backward()  # the named budget is feasible


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "lots", "12XB", None, True, [0.5]])
def test_bad_budgets_are_refused_with_the_allowed_forms(bad):
    with pytest.raises(ValueError, match="budget"):
        rt.auto(TinyGPT(layers=2), bad)


def test_bad_targets_and_unwrap_of_a_plain_module():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        rt.auto(lambda x: x, 0.5)
    with pytest.raises(ValueError, match="not a module rematted"):
        rt.unwrap(TinyGPT(layers=2))


def test_identity_state_dict_unwrap_and_eval_cost_nothing(gpt):
    model, inputs, _, _ = gpt
    m = fresh(model)
    params = [id(p) for p in m.parameters()]
    keys = list(m.state_dict())
    assert rt.auto(m, 0.5) is m
    assert [id(p) for p in m.parameters()] == params and list(m.state_dict()) == keys
    # eval and no_grad: no planning, no checkpoint, the original forward.
    m.eval()
    with torch.no_grad():
        m(*inputs)
    m.train()
    with torch.no_grad():
        m(*inputs)
    assert not state_of(m).plans
    m(*inputs).backward()
    assert len(state_of(m).plans) == 1 and "forward" in m.h[0].__dict__
    rt.unwrap(m)
    assert "forward" not in m.__dict__ and "forward" not in m.h[0].__dict__ and state_of(m) is None


def test_replans_per_input_signature():
    m = rt.auto(TinyGPT(layers=2), 0.7)
    for seq in (16, 32, 16):
        idx, tgt = tokens(seq=seq)
        m(idx, tgt).backward()
    assert len(state_of(m).plans) == 2


def test_class_decorator_remats_every_instance_and_can_be_undone():
    class Layer(Block):
        pass

    rt.auto(Layer, 0.5)
    try:
        torch.manual_seed(0)
        layer = Layer(d=16, heads=4)
        plain = copy.deepcopy(layer)
        rt.unwrap(plain)
        x = torch.randn(2, 64, 16, requires_grad=True)
        assert max_rel_err(grads(layer, x), grads(plain, x)) <= 1e-6
        compiled = compiled_of(layer)
        # No repeated children: the whole forward is one region, planned op by op, and the budget
        # bounds what the layer keeps for its backward (what stacking such layers adds up).
        graph = compiled.tg.graph
        kept = simulate(graph, compiled.plan).kept_bytes_by_block[0]
        assert list(compiled.regions) == [""] and kept <= 0.5 * simulate(graph).kept_bytes_by_block[0]
    finally:
        rt.unwrap(Layer)
    assert "forward" not in Layer(d=16, heads=4).__dict__


def test_deepcopy_of_a_rematted_model_runs_on_the_copy(gpt):
    model, inputs, reference, _ = gpt
    m = rt.auto(fresh(model), 0.5)
    m(*inputs).backward()
    before = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
    twin = copy.deepcopy(m)
    assert max_rel_err(grads(twin, *inputs), reference) <= 1e-6
    # The copy's step ran the copy's layers: the original's gradients are as its own step left them
    # (a forward still bound to the original would have accumulated into them).
    after = [p.grad for p in m.parameters()]
    assert all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(after, before, strict=True)
    )
    assert twin.forward.module is twin


def test_inputs_that_need_no_grad_and_frozen_parameters(gpt):
    model, inputs, _, _ = gpt
    m = rt.auto(fresh(model), 0.99)
    for p in m.parameters():
        p.requires_grad_(False)
    out = m(*inputs)  # nothing needs a gradient: no planning at all
    assert not out.requires_grad and not state_of(m).plans
    for p in m.h[-1].parameters():  # only the last layer trains
        p.requires_grad_(True)
    # Only the last layer's activations are kept for a backward: remat has less to give back than
    # its planning margin, so the floor named is no remat itself (not above it).
    with pytest.raises(InfeasibleBudgetError) as refused:
        m(*inputs).backward()
    assert refused.value.smallest_fraction == 1.0
    m = rt.auto(fresh(model), 1.0)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m.h[-2].parameters():  # a layer before the last trains: the last one's input needs a gradient
        p.requires_grad_(True)
    m(*inputs).backward()
    assert all(p.grad is not None for p in m.h[-2].parameters())


class Branchy(torch.nn.Module):
    """Data-dependent control flow: the op sequence depends on the input's values."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.a(x)) if x.sum() > 0 else torch.tanh(self.a(x)).sin()
        return self.b(h).pow(2).mean()


def test_op_sequence_change_is_refused_then_replanned():
    # As a decorated layer class (the budget bounds what one call keeps): as a whole model, two
    # Linear layers with the code between them cannot reach 0.5 of their own step.
    rt.auto(Branchy, 0.5)
    try:
        m = Branchy()
    finally:
        rt.unwrap(Branchy)
    pos = torch.ones(64, 16)
    m(pos).backward()
    with pytest.raises(RuntimeError, match="op sequence changed"):
        m(-pos)
    m(-pos).backward()  # re-profiled on this call


def test_offload_plans_give_exact_gradients():
    torch.manual_seed(0)
    model = TinyGPT(layers=4)
    idx, tgt = tokens(seq=32)
    want = grads(model, idx, tgt)
    m = rt.auto(fresh(model), 0.5, offload=True)
    assert max_rel_err(grads(m, idx, tgt), want) <= 1e-6
    plan = compiled_of(m).plan
    # On CPU host memory is the same memory; the plan may still pick offload where it is cheaper.
    assert plan.predicted_activation_bytes <= 0.5 * plan.baseline_activation_bytes


class _TwoStacks(torch.nn.Module):
    """An encoder stack and a decoder stack of another class (a plain-torch T5 shape): both
    ModuleLists become checkpoint regions, with the code between them pinned."""

    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.mid = torch.nn.LayerNorm(d)
        self.dec = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, 4, 4 * d, 0.1, batch_first=True) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.enc:
            x = layer(x)
        x = self.mid(x)
        for layer in self.dec:
            x = layer(x)
        return x.pow(2).mean()


def test_every_layer_stack_is_planned():
    model = _TwoStacks()
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(0))
    reference = grads(model, x)
    none = measure_step(model, (x,), loss_fn=lambda loss: loss, count_flops=False).activation_bytes
    rematted = rt.auto(fresh(model), 0.4)
    assert max_rel_err(grads(rematted, x), reference) <= 1e-6
    regions = {s.module for s in compiled_of(rematted).tg.segments if s.module}
    assert regions == {*(f"enc.{i}" for i in range(3)), *(f"dec.{i}" for i in range(3))}
    torch.manual_seed(1)
    assert measure_step(rematted, (x,), loss_fn=lambda loss: loss, count_flops=False).activation_bytes <= 0.4 * none
