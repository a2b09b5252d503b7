"""remat_kit.measure's planning doors (what the benchmarks time and run instead of adapter
internals): a JAX function traced as auto traces it, run under the cost model's plan and under a
preset's, with exact gradients; a torch module planned from its inputs as auto's first call does."""

from __future__ import annotations

import pytest

import remat_kit as rk
from remat_kit.measure import rel_err


def test_jax_trace_runs_any_plan_with_exact_gradients():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from remat_kit.measure import jax_trace

    def loss(ws, h):
        def body(h, w):
            return h + jnp.tanh(jnp.tanh(h @ w) @ w.T), None

        h, _ = jax.lax.scan(body, h, ws)
        return jnp.mean(h**2)

    ws = jax.random.normal(jax.random.key(0), (4, 16, 16)) / 4
    x = jax.random.normal(jax.random.key(1), (8, 16))
    step = jax_trace(loss, ws, x)
    assert len(step.scan_blocks) == 1 and len(step.scan_blocks[0]) == 4
    want = jax.grad(loss)(ws, x)
    plan = step.plan(0.7)
    assert plan.activation_fraction <= 0.7 and plan.num_recomputed_ops > 0
    for p in (plan, rk.presets.full(step.graph), rk.presets.none(step.graph)):
        for unroll in (1, 2):
            assert rel_err(jax.grad(step.run(p, unroll=unroll))(ws, x), want) <= 1e-6, (p.solver, unroll)
    other = rk.transformer_graph(num_layers=2, seq_len=8, batch=1, hidden=8, num_heads=2)
    with pytest.raises(ValueError, match="graph"):
        step.run(rk.presets.none(other))


def test_torch_plan_plans_from_inputs_as_auto_does():
    torch = pytest.importorskip("torch")
    from remat_kit.measure import torch_plan, torch_profile

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)) for _ in range(4)
    )

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x.pow(2).mean()

    model, x = Stack(), torch.randn(8, 16)
    planned = torch_plan(model, (x,), budget=0.7, profile="fake")
    assert planned.plan.activation_fraction <= 0.7 and planned.num_values > 0
    assert torch_profile(model, (x,), profile="fake") == planned.num_ops > 0
    with pytest.raises(ValueError, match="profile='every op'"):
        torch_plan(model, (x,), budget=0.5, profile="every op")


def test_torch_predicted_parts_add_up_to_the_predicted_extra_step():
    torch = pytest.importorskip("torch")
    from remat_kit.measure import torch_predicted_parts

    torch.manual_seed(0)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)) for _ in range(6)
            )

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x.pow(2).mean()

    model = rk.auto(Stack(), budget=0.5)
    model(torch.randn(32, 16)).backward()
    plans = rk.plan_of(model)
    parts = torch_predicted_parts(model)
    assert plans[-1].num_recomputed_ops > 0
    assert min(parts.ops_seconds, parts.frame_seconds, parts.forward_seconds) >= 0
    assert parts.ops_seconds > 0  # (the fixed costs are 0 here: conftest turns calibration off)
    total = parts.ops_seconds + parts.frame_seconds + parts.forward_seconds
    assert total == pytest.approx(sum(p.predicted_extra_step_seconds for p in plans), rel=1e-9)
