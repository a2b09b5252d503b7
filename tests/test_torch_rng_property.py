"""Random ops under remat_kit.auto draw exactly what they draw without remat (issue 11, deliverable 4,
PyTorch half): dropout and `torch.rand_like` on the default generator, `torch.bernoulli` /
`torch.rand` / `torch.randn` on an explicit `torch.Generator`, `torch.manual_seed` between steps,
in layers, between layers and outside them, at any budget.

Two bugs this pins: a recomputed op with an explicit generator drew from the generator as the
forward had left it (checkpoint's preserve_rng_state restores the default generators only), and the
profile's real prologue drew from an explicit generator, moving the first step's draws.
"""

from __future__ import annotations

import math

import hypothesis
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import remat_kit

NOISES = ("none", "dropout", "rand_default", "bernoulli_gen", "rand_gen", "randn_gen")


def noise(kind: str, x: torch.Tensor, gen: torch.Generator, training: bool) -> torch.Tensor:
    if kind == "dropout":
        return nn.functional.dropout(x, 0.25, training)
    if kind == "rand_default":
        return x * (0.5 + torch.rand_like(x))
    if kind == "bernoulli_gen":
        return x * torch.bernoulli(torch.full_like(x, 0.75), generator=gen) / 0.75
    if kind == "rand_gen":
        return x + torch.rand(x.shape, generator=gen, device=x.device)
    if kind == "randn_gen":
        return x + 0.1 * torch.randn(x.shape, generator=gen, device=x.device)
    return x


class NoisyLayer(nn.Module):
    def __init__(self, d: int, inner: str, gen: torch.Generator):
        super().__init__()
        self.up, self.down, self.inner, self.gen = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), inner, gen

    def forward(self, x):
        h = noise(self.inner, torch.tanh(self.up(x)), self.gen, self.training)
        return x + self.down(h)


class NoisyStack(nn.Module):
    """`inner[i]`: noise inside layer i; `outer[i]`: noise in the root's code before layer i
    (outer[0]: the prologue) and after the last layer (outer[-1])."""

    def __init__(self, d: int, inner: list[str], outer: list[str], gen: torch.Generator):
        super().__init__()
        self.gen, self.outer = gen, list(outer)
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(NoisyLayer(d, kind, gen) for kind in inner)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        x = self.inp(x)
        for layer, kind in zip(self.layers, self.outer):
            x = layer(noise(kind, x, self.gen, self.training))
        return self.head(noise(self.outer[-1], x, self.gen, self.training)).pow(2).mean()


def _build(inner, outer, d=8, device="cpu"):
    gen = torch.Generator(device=device)
    torch.manual_seed(0)
    return NoisyStack(d, inner, outer, gen).to(device), gen


def _step(model, gen, x, seed):
    torch.manual_seed(seed)
    gen.manual_seed(1000 + seed)
    model.zero_grad(set_to_none=True)
    model(x).backward()
    default = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else torch.get_rng_state()
    return [p.grad.clone() for p in model.parameters()], (gen.get_state(), default)


def _check_steps(inner, outer, budget, device="cpu", rows=4, d=8):
    """Two steps (the planning one and a planned one, manual_seed before each): gradients and the
    states of the explicit and the default generator after the step equal no remat's. Returns the plan, or the
    InfeasibleBudgetError the planning step raised."""
    ref, ref_gen = _build(inner, outer, d, device)
    model, gen = _build(inner, outer, d, device)
    remat_kit.auto(model, budget)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(7)).to(device)
    for seed in (1, 2):
        want, want_state = _step(ref, ref_gen, x, seed)
        try:
            got, got_state = _step(model, gen, x, seed)
        except remat_kit.InfeasibleBudgetError as e:
            assert seed == 1, "an infeasible budget is refused when planning, not later"
            return e
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(got_state[0], want_state[0]), "the step drew a different amount from the explicit generator"
        assert torch.equal(got_state[1], want_state[1]), "the step drew a different amount from the default generator"
    return remat_kit.plan_of(model)[-1]


@settings(max_examples=15, deadline=None)
@given(
    depth=st.integers(2, 5),
    data=st.data(),
    budget=st.integers(10, 100).map(lambda k: k / 100),
)
def test_random_models_draw_as_without_remat(depth, data, budget):
    inner = data.draw(st.lists(st.sampled_from(NOISES), min_size=depth, max_size=depth), label="inner")
    outer = data.draw(st.lists(st.sampled_from(NOISES), min_size=depth + 1, max_size=depth + 1), label="outer")
    plan = _check_steps(inner, outer, budget)
    raised = isinstance(plan, remat_kit.InfeasibleBudgetError)
    if raised:
        # Refused (tiny layers: floors of 0.5-0.9): the smallest feasible budget the error names
        # must plan, and draw as no remat.
        floor = math.ceil(plan.smallest_fraction * 1000) / 1000
        plan = _check_steps(inner, outer, floor)
        assert isinstance(plan, remat_kit.Plan), f"budget={floor}, the smallest feasible budget named, was refused"
    hypothesis.event(
        f"{'raised to the named floor' if raised else 'budget met'}; "
        f"{'some' if plan.num_recomputed_ops else 'no'} ops recomputed"
    )


def test_recomputed_op_on_an_explicit_generator_draws_its_forward_numbers():
    # Every layer draws a mask from the explicit generator; 0.4 recomputes them.
    plan = _check_steps(["bernoulli_gen"] * 6, ["none"] * 7, 0.4, rows=16, d=16)
    assert isinstance(plan, remat_kit.Plan) and any(
        "bernoulli" in n and d.value == "recompute" for n, d in plan.decisions
    )


def test_planning_does_not_move_an_explicit_generator():
    # The prologue draws from the explicit generator; the profile runs the prologue on real tensors.
    plan = _check_steps(["dropout"] * 6, ["rand_gen"] + ["none"] * 6, 0.5, rows=16, d=16)
    assert isinstance(plan, remat_kit.Plan) and plan.num_recomputed_ops > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA default and explicit generators)")
def test_cuda_generators_draw_as_without_remat():
    plan = _check_steps(
        ["dropout", "bernoulli_gen", "rand_default", "randn_gen"] * 2,
        ["rand_gen", "dropout"] + ["none"] * 7,
        0.4,
        device="cuda",
        rows=16,
        d=16,
    )
    assert isinstance(plan, remat_kit.Plan) and plan.num_recomputed_ops > 0
