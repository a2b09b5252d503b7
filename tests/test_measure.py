"""remat_kit.measure: the one gradient check (`rel_err`) the benchmarks report and the tests assert on,
and the measuring doors the harness uses instead of the adapters' internals."""

from __future__ import annotations

import math

import numpy as np
import pytest

import remat_kit as rk
from remat_kit.measure import rel_err


def test_rel_err_is_per_array_not_over_the_whole_tree():
    want = [np.array([1000.0, -1000.0]), np.array([1e-3, 0.0])]
    got = [want[0].copy(), np.array([2e-3, 0.0])]
    # over the whole tree this error would read 1e-6 of the largest gradient; in its own array it is 100%
    assert rel_err(got, want) == pytest.approx(1.0)
    assert rel_err(want, want) == 0.0


def test_rel_err_never_lets_a_nan_pass():
    want = {"a": np.ones(3), "b": np.ones(2)}
    assert rel_err({"a": np.ones(3), "b": np.array([1.0, np.nan])}, want) == math.inf
    assert not rel_err({"a": np.ones(3), "b": np.array([1.0, np.inf])}, want) <= 1e-3


def test_rel_err_zero_reference_counts_the_absolute_error():
    assert rel_err([np.array([0.5, 0.0])], [np.zeros(2)]) == pytest.approx(0.5)


def test_rel_err_refuses_structures_that_do_not_line_up():
    with pytest.raises(ValueError, match="1 arrays against 2"):
        rel_err([np.ones(2)], [np.ones(2), np.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        rel_err([np.ones(2)], [np.ones(3)])


def test_rel_err_reads_torch_tensors_and_jax_arrays():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    want = [torch.ones(4, dtype=torch.bfloat16, requires_grad=True) * 2]
    assert rel_err([torch.full((4,), 3.0)], want) == pytest.approx(0.5)
    assert rel_err({"w": jnp.ones(3) * 1.5}, {"w": jnp.ones(3)}) == pytest.approx(0.5)


def test_measure_is_public_and_needs_no_framework_to_import():
    assert rk.measure.format_bytes(3 * 2**20) == "3.00MiB"
    assert set(rk.measure.__all__) <= set(dir(rk.measure))


def test_torch_step_and_cache_configs():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(4, 8)
    m = rk.measure.torch_step(model, (x,), loss_fn=lambda out: out.sum(), count_flops=False)
    assert m.activation_bytes > 0 and m.flops == 0
    assert all(p.grad is not None for p in model.parameters())  # the step's gradients, for a gradient check
    assert rk.measure.torch_step(model, (x,), loss_fn=lambda out: out.sum()).flops > 0
    assert rk.measure.hf_kv_cache_configs(model) == []


def test_jax_auto_flops_unrolled_counts_the_recompute():
    jax = pytest.importorskip("jax")
    jnp, lax = jax.numpy, jax.lax

    def make(unroll):
        def loss(w, x):
            def body(x, w):
                return jnp.tanh(jnp.tanh(x @ w) @ w), None

            x, _ = lax.scan(body, x, w, unroll=unroll)
            return jnp.sum(x)

        return loss

    w, x = jnp.ones((8, 32, 32)) / 32, jnp.ones((16, 32))
    once = rk.measure.jax_flops(jax.jit(jax.value_and_grad(make(1))).lower(w, x))  # the scan body counted once
    none = rk.measure.jax_flops(jax.jit(jax.value_and_grad(make(True))).lower(w, x))
    planned = rk.auto(make(1), budget=0.5)
    jax.grad(planned)(w, x)
    counted = rk.measure.jax_auto_flops_unrolled(planned, w, x)
    assert once < none < counted < 2 * none  # every layer counted, and the recompute on top
    with pytest.raises(ValueError, match="not made by remat_kit.auto"):
        rk.measure.jax_auto_flops_unrolled(make(1), w, x)
