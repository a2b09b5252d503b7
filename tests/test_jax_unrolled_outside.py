"""Outside JAX models without a scan: Flax's own lm1b `TransformerLM` (issue 11, case 2) and a
long program with no repeated layer (deliverable 3).

The lm1b model is benchmarks/models/flax_lm1b.py (a faithful small copy of google/flax
`examples/lm1b/models.py`, its layers in a Python loop) with Flax's layer initializers.
Before the fix, the float `decoder_mask` (made from tokens, read by every layer) hid the cuts
between layers: the whole model was one block, `auto` built one op-level program over it and
raised "the program has ... variables", and without dropout planned it as a single layer
(a per-call budget, never checked) and compiled at 1.00 of no remat at budget 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_helpers import rel_err

import remat_kit as rk
import remat_kit._jax as rj
from benchmarks.models.flax_lm1b import FLAX_LAYER_INITS, Config, TransformerLM
from remat_kit._core.plan import Decision
from remat_kit._jax._api import planner_of


def lm1b(dropout: bool, batch: int = 2):
    rate = 0.1 if dropout else 0.0
    config = Config(dropout_rate=rate, attention_dropout_rate=rate, deterministic=not dropout, **FLAX_LAYER_INITS)
    model = TransformerLM(config)
    tokens = jax.random.randint(jax.random.key(1), (batch, config.max_len), 1, config.vocab_size)
    params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(2)}, tokens)["params"]

    def loss(params, tokens, key):
        logits = model.apply({"params": params}, tokens, rngs={"dropout": key})
        labels = jax.nn.one_hot(tokens, config.vocab_size)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1))

    return loss, (params, tokens, jax.random.key(3))


def temp_bytes(f, *args) -> int:
    return int(jax.jit(jax.grad(f)).lower(*args).compile().memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("dropout", [True, False])
def test_lm1b_layers_are_found_through_the_token_mask(dropout):
    loss, args = lm1b(dropout)
    planner, f = planner_of(rk.auto(loss, budget=1.0))
    traced = planner.prepare(f, args, {})[0].traced
    layers = [n for n in traced.graph.block_names if "encoderdecoderblock_" in n]
    assert len(layers) == 4, traced.graph.block_names  # one block per layer, not one for the model
    assert not traced.pieces


@pytest.mark.slow  # over 10 s in CI's --durations
@pytest.mark.parametrize("solver", [None, "dp"])
def test_lm1b_with_dropout_plans_and_keeps_gradients(solver):
    loss, args = lm1b(True)
    planned = rj.auto(loss, budget=0.5, solver=solver, verify=False)  # the model's plan, as planned
    got = jax.jit(jax.grad(planned))(*args)  # raised "the program has ... variables" before
    # The conformance suite's tolerance (GRAD_TOL): XLA fuses a recomputed layer differently, and
    # float32 reassociation read 1.04e-6 on a 2-core Xeon (under 1e-6 on the machine before it).
    assert rel_err(got, jax.grad(loss)(*args)) <= 1e-5
    (plan,) = rk.plan_of(planned)
    assert plan.names("recompute") and plan.activation_fraction <= 0.5


def test_lm1b_without_dropout_holds_the_budget_as_compiled():
    loss, args = lm1b(False)
    planned = rk.auto(loss, budget=0.5)
    try:
        measured = temp_bytes(planned, *args)
    except rk.InfeasibleBudgetError as e:  # the contract's other outcome: it names the floor
        assert e.smallest_fraction > 0.5
        return
    assert measured <= 0.5 * temp_bytes(loss, *args)  # compiled at 1.00 of no remat before


def _unrepeated(num_layers: int = 24, width: int = 32, batch: int = 256):
    """A long program with no repeated layer: every layer has its own width and activation."""
    rng = np.random.default_rng(0)
    widths = [width + 4 * k for k in range(num_layers + 1)]  # no two layers alike
    acts = [jnp.tanh, jax.nn.gelu, jax.nn.relu, jax.nn.sigmoid, jax.nn.silu, jnp.sin]
    params = [
        jnp.asarray(rng.standard_normal((widths[k], widths[k + 1]), dtype=np.float32) / 8) for k in range(num_layers)
    ]
    x = jnp.asarray(rng.standard_normal((batch, widths[0]), dtype=np.float32))

    def loss(params, x):
        for k, w in enumerate(params):
            x = acts[k % len(acts)](x @ w) * (1.0 + 0.1 * k)
        return jnp.mean(x**2)

    return loss, (params, x)


@pytest.mark.slow  # over 10 s in CI's --durations
def test_unrepeated_program_is_planned_in_pieces_within_the_budget():
    loss, args = _unrepeated()
    planner, f = planner_of(rk.auto(loss, budget=1.0))
    traced = planner.prepare(f, args, {})[0].traced
    assert traced.pieces and traced.graph.num_blocks >= 4  # was one block: one op-level program
    planned = rk.auto(loss, budget=0.5)
    try:
        measured = temp_bytes(planned, *args)
    except rk.InfeasibleBudgetError as e:
        assert e.smallest_fraction > 0.5
        return
    assert measured <= 0.5 * temp_bytes(loss, *args)
    # rel_err is per array: float32 reassociation in the recompute reads 1.5e-6 in the smallest one
    assert rel_err(jax.grad(planned)(*args), jax.grad(loss)(*args)) <= 1e-5


def test_values_only_returned_do_not_hide_the_cuts():
    """Batch-norm-style statistics each layer returns as new state (haiku's ResNet) are alive
    until the function returns; they must not count as crossing every cut (it was one block)."""
    loss, (params, x) = _unrepeated()

    def with_stats(params, x):
        stats = []
        for k, w in enumerate(params):
            x = jnp.tanh(x @ w) * (1.0 + 0.1 * k)
            stats.append(jnp.mean(x, axis=0))
        return jnp.mean(x**2), stats

    planner, f = planner_of(rk.auto(with_stats, budget=1.0))
    traced = planner.prepare(f, (params, x), {})[0].traced
    assert traced.pieces and traced.graph.num_blocks >= 4


# The device constants this repository's 2-core CI VM measured (session 13, ~/.cache/remat_kit):
# memory-bound next to its compute, they move the model's plans on lm1b to ones XLA compiles larger.
VM_DEVICE = {
    "peak_flops": 133352143216.3324,
    "memory_bandwidth": 20535250264.57146,
    "host_bandwidth": 4869675251.658631,
    "op_overhead_seconds": 3.1622776601683795e-09,
    "op_bandwidth": [],
}


@pytest.mark.slow
def test_lm1b_under_the_ci_vm_s_calibration_fits_a_budget_another_pricing_fits(monkeypatch):
    """Under these constants every plan the model offers, and its coarser layouts, compiled to
    0.704 of no remat or more, and auto(0.7) was refused naming 0.704, while under the
    uncalibrated `DeviceSpec` a plan measuring 0.597 was found: the error named the smallest
    budget measured, not the smallest feasible one (session 13). Every layer recomputed whole
    compiles to 0.573, and was then the answer (+23% FLOPs, counted by XLA); now the search over
    layers recomputed whole (`_wholelayers`) keeps some layers and still fits (0.613, +17%)."""
    from benchmarks.models.outside_jax import cases
    from remat_kit._core.graph import DeviceSpec
    from remat_kit._jax import _device, _verify

    # The constants as the calibration cache would give them (conftest turns calibration off).
    monkeypatch.setattr(_device, "calibrated_spec", lambda key, measure: DeviceSpec(**{**VM_DEVICE, "name": key}))
    monkeypatch.setattr(_verify, "_NONE_CACHE", {})  # no plan another test measured
    assert _device.default_device().peak_flops == VM_DEVICE["peak_flops"]
    model = cases()["flax-lm1b"].build()
    wrapped = rk.auto(model.loss, 0.7)
    compiled = jax.jit(jax.grad(wrapped)).lower(model.params, model.batch).compile()
    none = jax.jit(jax.grad(model.loss)).lower(model.params, model.batch).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.7 * none.memory_analysis().temp_size_in_bytes
    assert rel_err(compiled(model.params, model.batch), none(model.params, model.batch)) <= 1e-5
    # Some layers recomputed whole, not every one.
    planner, f = planner_of(wrapped)
    traced = planner.prepare(f, (model.params, model.batch), {})[0].traced
    decisions, by_block = dict(rk.plan_of(wrapped)[-1].decisions), {}
    for i in traced.graph.free_values:
        v = traced.graph.values[i]
        by_block.setdefault(v.block, set()).add(decisions.get(v.name, Decision.SAVE))
    layers = [b for b, name in enumerate(traced.graph.block_names) if "encoderdecoderblock_" in name]
    assert any(by_block[b] == {Decision.RECOMPUTE} for b in layers)
    assert any(Decision.SAVE in by_block[b] for b in layers)
    # A budget below every plan is refused naming one at most what every layer recomputed measures.
    with pytest.raises(rk.InfeasibleBudgetError) as refused:
        jax.jit(jax.grad(rk.auto(model.loss, 0.3))).lower(model.params, model.batch).compile()
    assert refused.value.smallest_fraction <= 0.6
