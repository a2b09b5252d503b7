"""remat_kit.auto on Flax: nnx classes and instances (unrolled, under nnx.scan, in an
nnx.Optimizer step), linen classes (unrolled and under nn.scan); gradients equal to no remat."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax_helpers import rel_err

import remat_kit._jax as rj

D, N = 16, 4


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs, dropout: float = 0.0):
        self.l1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.l2 = nnx.Linear(4 * d, d, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x):
        h = self.l2(jnp.tanh(self.l1(x)))
        return x + (self.drop(h) if self.drop is not None else h)


class Model(nnx.Module):
    def __init__(self, block: type, rngs: nnx.Rngs, dropout: float = 0.0, depth: int = N):
        self.blocks = nnx.List([block(D, rngs, dropout) for _ in range(depth)])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return jnp.mean(x**2)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (256, D))  # activations dominate parameters


def nnx_grads(model, x):
    return nnx.jit(nnx.grad(lambda m, x: m(x)))(model, x)


def test_nnx_class_decorator_with_dropout(x):
    auto_block = rj.auto(Block, 0.5)
    want = nnx_grads(Model(Block, nnx.Rngs(0, dropout=1), dropout=0.2), x)
    got = nnx_grads(Model(auto_block, nnx.Rngs(0, dropout=1), dropout=0.2), x)
    assert rel_err(got, want) <= 1e-6
    assert auto_block.__name__ == "Block" and issubclass(auto_block, Block)


def test_nnx_layer_budget_holds_in_a_stack(x):
    """A decorated layer class: the budget is per layer of a deep stack (up to one layer's
    recompute transient); auto checks it on a chain of the layer. Eight layers here."""

    def temp(block: type) -> int:
        graphdef, state = nnx.split(Model(block, nnx.Rngs(0), depth=8))
        loss = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(state, x).compile().memory_analysis().temp_size_in_bytes

    assert temp(rj.auto(Block, 0.5)) <= 0.5 * temp(Block)


def test_nnx_instance_in_optimizer_step(x):
    ref = Model(Block, nnx.Rngs(0))
    model = rj.auto(Model(Block, nnx.Rngs(0)), 0.8)
    assert isinstance(model, Model)

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: m(x))(model)
        opt.update(model, grads)
        return loss

    losses = {}
    for name, m in (("ref", ref), ("auto", model)):
        opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
        losses[name] = [float(step(m, opt, x)) for _ in range(3)]
    assert losses["auto"] == pytest.approx(losses["ref"], rel=1e-6)
    assert losses["auto"][2] < losses["auto"][0]
    assert type(rj.unwrap(model)) is Model


def test_nnx_scan_over_layers(x):
    def stack(block: type):
        class Stack(nnx.Module):
            def __init__(self):
                @nnx.vmap(in_axes=0, out_axes=0)
                def create(key):
                    return block(D, nnx.Rngs(key))

                self.layers = create(jax.random.split(jax.random.key(0), N))

            def __call__(self, x):
                @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
                def body(x, layer):
                    return layer(x)

                return jnp.mean(body(x, self.layers) ** 2)

        return Stack()

    assert rel_err(nnx_grads(stack(rj.auto(Block, 0.5)), x), nnx_grads(stack(Block), x)) <= 1e-6


class LBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D)(jnp.tanh(nn.Dense(4 * D)(x)))


def test_linen_class_unrolled(x):
    class LM(nn.Module):
        block: type

        @nn.compact
        def __call__(self, x):
            for _ in range(N):
                x = self.block()(x)
            return jnp.mean(x**2)

    variables = LM(LBlock).init(jax.random.key(0), x)
    want = jax.jit(jax.grad(lambda v: LM(LBlock).apply(v, x)))(variables)
    got = jax.jit(jax.grad(lambda v: LM(rj.auto(LBlock, 0.5)).apply(v, x)))(variables)
    assert rel_err(got, want) <= 1e-6  # same parameter paths: the auto class keeps its name


def test_linen_nn_scan(x):
    class LS(nn.Module):
        block: type

        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                lambda m, c, _: (m(c), None), variable_axes={"params": 0}, split_rngs={"params": True}, length=N
            )
            y, _ = scan(self.block(), x, None)
            return jnp.mean(y**2)

    variables = LS(LBlock).init(jax.random.key(0), x)
    want = jax.jit(jax.grad(lambda v: LS(LBlock).apply(v, x)))(variables)
    got = jax.jit(jax.grad(lambda v: LS(rj.auto(LBlock, 0.5)).apply(v, x)))(variables)
    assert rel_err(got, want) <= 1e-6


def test_linen_instance_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="wrap the class instead"):
        rj.auto(LBlock(), 0.5)


def test_explain_nnx_instance(x, capsys):
    model = rj.auto(Model(Block, nnx.Rngs(0)), 0.8)
    e = rj.explain(model, x)
    assert "remat_kit plan" in capsys.readouterr().out
    assert e.predicted_fraction <= 0.8 + 1e-9
