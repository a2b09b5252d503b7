"""Property: dropout draws the same masks under every plan `auto` makes, whatever the structure.

Randomly built JAX models with dropout in random places (inside a `lax.scan` body, in unrolled
layers, outside the layers), keys typed (`jax.random.key`) or raw (`jax.random.PRNGKey`) and
routed into the layers by `split`, `fold_in` or a key carried through the loop; Flax linen
`make_rng` per call under `nn.scan(split_rngs={"dropout": True})`; Flax nnx `nnx.Rngs` streams
with `nnx.Dropout` under `nnx.scan`. At a budget drawn from 0.1 .. 1.0, `auto`'s gradients equal
no remat's (an `InfeasibleBudgetError` is an allowed answer; anything else fails).

The activations are smooth (tanh): XLA may round a value 1 ulp apart in two compiled programs
that materialise different intermediates (tests/test_jax_rng.py shows it on the lm1b block), and
relu's derivative jumps at 0, so a relu input within an ulp of 0 would flip one gradient entry
by O(1) in either program. Smooth activations keep that rounding at its own size (1e-7), far
below the tolerance, while a dropout mask drawn differently moves gradients by O(0.1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax_helpers import rel_err

import remat_kit._jax as rj
from remat_kit._core.solve import InfeasibleBudgetError

B, D, F, RATE = 64, 8, 32, 0.5  # batch x hidden activations outweigh the parameters: plans recompute
TOL = 1e-5


def dropout(key, x):
    keep = jax.random.bernoulli(key, 1 - RATE, x.shape)
    return jnp.where(keep, x / (1 - RATE), 0.0)


# -- plain JAX: layers scanned, unrolled, or one unrolled then the rest scanned ------------------
def jax_model(structure: str, route: str, sites: frozenset, num_layers: int):
    """`route`: how layer l gets its key: `split` (split(key, L)[l]), `fold_in` (fold_in(key, l),
    l carried as an int through a scan), `carry` (split off a key carried through the layers)."""

    def layer(w, x, k):
        h = jnp.tanh(x @ w["w1"])
        if "mid" in sites:
            h = dropout(jax.random.split(k)[0], h)
        y = h @ w["w2"]
        if "out" in sites:
            y = dropout(jax.random.fold_in(k, 1), y)
        return x + jnp.tanh(y)

    def scan_layers(x, stacked, key, start):
        n = stacked["w1"].shape[0]
        if route == "split":
            step = lambda x, wk: (layer(wk[0], x, wk[1]), None)  # noqa: E731
            x, _ = jax.lax.scan(step, x, (stacked, jax.random.split(key, n)))
            return x, key
        if route == "fold_in":

            def step(carry, w):
                x, i = carry
                return (layer(w, x, jax.random.fold_in(key, i)), i + 1), None

            (x, _), _ = jax.lax.scan(step, (x, jnp.int32(start)), stacked)
            return x, key

        def step(carry, w):
            x, k = carry
            k, sub = jax.random.split(k)
            return (layer(w, x, sub), k), None

        (x, key), _ = jax.lax.scan(step, (x, key), stacked)
        return x, key

    def unrolled_layer(x, w, key, i):
        if route == "split":
            return layer(w, x, jax.random.split(key, num_layers)[i]), key
        if route == "fold_in":
            return layer(w, x, jax.random.fold_in(key, i)), key
        key, sub = jax.random.split(key)
        return layer(w, x, sub), key

    def loss(params, x, key):
        if "pre" in sites:
            x = dropout(jax.random.fold_in(key, 99), x @ params["w0"])
        stacked = params["layers"]
        if structure == "unrolled":
            for i in range(num_layers):
                x, key = unrolled_layer(x, jax.tree.map(lambda p: p[i], stacked), key, i)
        elif structure == "mixed":
            x, key = unrolled_layer(x, jax.tree.map(lambda p: p[0], stacked), key, 0)
            x, key = scan_layers(x, jax.tree.map(lambda p: p[1:], stacked), key, 1)
        else:
            x, key = scan_layers(x, stacked, key, 0)
        if "post" in sites:
            x = dropout(jax.random.fold_in(key, 100), x)
        return jnp.mean(jnp.tanh(x) ** 2)

    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "w0": jax.random.normal(k[0], (D, D)) / D**0.5,
        "layers": {
            "w1": jax.random.normal(k[1], (num_layers, D, F)) / D**0.5,
            "w2": jax.random.normal(k[2], (num_layers, F, D)) / F**0.5,
        },
    }
    return loss, params


@st.composite
def jax_specs(draw):
    return dict(
        structure=draw(st.sampled_from(["scan", "unrolled", "mixed"])),
        route=draw(st.sampled_from(["split", "fold_in", "carry"])),
        sites=draw(st.frozensets(st.sampled_from(["pre", "mid", "out", "post"]), min_size=1)),
        num_layers=draw(st.sampled_from([2, 4])),
    )


def check(planned_grads, want_grads, budget) -> None:
    try:
        got = planned_grads()
    except InfeasibleBudgetError as e:  # allowed when it names a smallest budget above this one
        assert e.smallest_fraction > budget, e
        return
    err = rel_err(got, want_grads)
    assert err < TOL, f"budget={budget}: gradients differ from no remat (max rel err {err:.2e})"


@pytest.mark.slow  # over 10 s in CI's --durations
@pytest.mark.newest_jax  # slow, yet run on the newest jax too (.ci/run): RNG routes are what a jax release changes
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=jax_specs(), raw=st.booleans(), budget=st.floats(0.1, 1.0))
def test_jax_dropout_exact(spec, raw, budget):
    loss, params = jax_model(**spec)
    x = jax.random.normal(jax.random.key(1), (B, D))
    key = jax.random.PRNGKey(7) if raw else jax.random.key(7)
    want = jax.jit(jax.grad(loss))(params, x, key)
    check(lambda: jax.jit(jax.grad(rj.auto(loss, budget)))(params, x, key), want, budget)


# -- Flax linen: make_rng per call under nn.scan(split_rngs={"dropout": True}) --------------------
class LinenBlock(nn.Module):
    mid: bool

    @nn.compact
    def __call__(self, x, _):
        h = jnp.tanh(nn.Dense(F)(nn.LayerNorm()(x)))
        if self.mid:
            h = nn.Dropout(RATE)(h, deterministic=False)
        return x + nn.Dropout(RATE)(nn.Dense(D)(h), deterministic=False), None


class LinenStack(nn.Module):
    num_layers: int
    mid: bool

    @nn.compact
    def __call__(self, x):
        x = nn.Dropout(RATE)(x, deterministic=False)
        stack = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.num_layers,
        )
        x, _ = stack(self.mid)(x, None)
        return jnp.mean(jnp.tanh(x) ** 2)


@pytest.mark.slow  # over 10 s in CI's --durations
@pytest.mark.newest_jax  # slow, yet run on the newest jax too (.ci/run): RNG routes are what a jax release changes
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.sampled_from([2, 4]), mid=st.booleans(), raw=st.booleans(), budget=st.floats(0.1, 1.0))
def test_linen_scan_make_rng_exact(num_layers, mid, raw, budget):
    model = LinenStack(num_layers, mid)
    x = jax.random.normal(jax.random.key(1), (B, D))
    key = jax.random.PRNGKey(7) if raw else jax.random.key(7)
    variables = model.init({"params": jax.random.key(0), "dropout": key}, x)
    loss = lambda v, x, key: model.apply(v, x, rngs={"dropout": key})  # noqa: E731
    want = jax.jit(jax.grad(loss))(variables, x, key)
    check(lambda: jax.jit(jax.grad(rj.auto(loss, budget)))(variables, x, key), want, budget)


# -- Flax nnx: nnx.Rngs streams with nnx.Dropout, layers under nnx.scan ----------------------------
class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D, F, rngs=rngs)
        self.l2 = nnx.Linear(F, D, rngs=rngs)
        self.drop = nnx.Dropout(RATE, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(self.l2(jnp.tanh(self.l1(x))))


class NnxStack(nnx.Module):
    def __init__(self, num_layers: int, seed: int):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs):
            return NnxBlock(rngs)

        self.layers = create(nnx.Rngs(params=0, dropout=seed))
        self.drop = nnx.Dropout(RATE, rngs=nnx.Rngs(dropout=seed + 1))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return jnp.mean(jnp.tanh(body(self.drop(x), self.layers)) ** 2)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.sampled_from([2, 4]), budget=st.floats(0.1, 1.0))
def test_nnx_rngs_scan_exact(num_layers, budget):
    x = jax.random.normal(jax.random.key(1), (B, D))
    grads = nnx.jit(nnx.grad(lambda m, x: m(x)))
    want = grads(NnxStack(num_layers, 5), x)
    check(lambda: grads(rj.auto(NnxStack(num_layers, 5), budget), x), want, budget)
