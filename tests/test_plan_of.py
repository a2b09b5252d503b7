"""remat_kit.plan_of: the plans auto made, one per input signature, newest last; a clear error
for anything auto did not make."""

from __future__ import annotations

import subprocess
import sys

import pytest

import remat_kit as rk


# -- torch ------------------------------------------------------------------------------------
def test_torch_instance_before_and_after_calls_and_per_input_shape():
    torch = pytest.importorskip("torch")
    from torch_helpers import TinyGPT, tokens

    torch.manual_seed(0)
    model = rk.auto(TinyGPT(layers=2), budget=0.7)
    assert rk.plan_of(model) == []  # nothing planned before the first training call
    with torch.no_grad():
        model(*tokens(seq=16))
    assert rk.plan_of(model) == []  # no_grad: no remat, no plan

    model(*tokens(seq=16)).backward()
    (first,) = rk.plan_of(model)
    assert isinstance(first, rk.Plan) and first.budget == "0.7"
    assert first.predicted_activation_bytes <= 0.7 * first.baseline_activation_bytes

    model(*tokens(seq=32)).backward()  # a new input shape: a second plan, last
    model(*tokens(seq=16)).backward()  # a shape seen before: no new plan
    plans = rk.plan_of(model)
    assert len(plans) == 2 and plans[0] == first
    assert plans[1].baseline_activation_bytes > first.baseline_activation_bytes  # twice the tokens
    plans.clear()  # a new list each call: the caller cannot disturb auto's cache
    assert len(rk.plan_of(model)) == 2


def test_torch_errors_name_the_argument_and_say_what_to_pass():
    pytest.importorskip("torch")
    from torch_helpers import TinyGPT, tokens

    with pytest.raises(
        ValueError, match=r"plan_of\(target=TinyGPT\( .*not made by remat_kit\.auto.*rematted torch module"
    ):
        rk.plan_of(TinyGPT(layers=1))
    with pytest.raises(ValueError, match=r"plan_of\(target=TinyGPT\): a torch module class has no plans.*instance"):
        rk.plan_of(TinyGPT)
    model = rk.auto(TinyGPT(layers=4), budget=0.7)  # one layer cannot reach 0.7 of a whole step (floor 0.92)
    model(*tokens(seq=16)).backward()
    rk.unwrap(model)
    with pytest.raises(ValueError, match="not made by remat_kit.auto"):
        rk.plan_of(model)  # unwrap drops the plans with the remat


# -- JAX --------------------------------------------------------------------------------------
def test_jax_function_plans_per_input_signature():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    def loss(params, x):
        for w in params:
            x = x + jnp.sin(jnp.tanh(x @ w) @ w.T)
        return jnp.mean(x**2)

    params = [jax.random.normal(jax.random.key(i), (16, 64)) / 4 for i in range(8)]
    wrapped = rk.auto(loss, budget=0.7)
    assert rk.plan_of(wrapped) == []
    jax.grad(wrapped)(params, jnp.ones((32, 16)))
    (first,) = rk.plan_of(wrapped)
    assert isinstance(first, rk.Plan) and first.budget == "0.7"
    # The budget holds as compiled (the plan aims at the cost model's fraction that compiles
    # within it, which may be above 0.7 of the model's own no-remat figure: XLA fuses).
    x = jnp.ones((32, 16))

    def temp(f):
        return jax.jit(jax.grad(f)).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    assert temp(wrapped) <= 0.7 * temp(loss)
    jax.grad(wrapped)(params, jnp.ones((64, 16)))
    plans = rk.plan_of(wrapped)
    assert len(plans) == 2 and plans[0] == first
    assert plans[1].baseline_activation_bytes > first.baseline_activation_bytes


def test_flax_nnx_instance_plans_live_on_its_class():
    pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")
    import jax.numpy as jnp

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(6)])

        def __call__(self, x):
            for layer in self.layers:
                x = x + jnp.tanh(layer(x))
            return jnp.mean(x**2)

    model = rk.auto(Model(nnx.Rngs(0)), budget=0.8)
    assert rk.plan_of(model) == []
    nnx.grad(lambda m, x: m(x))(model, jnp.ones((128, 16)))
    (plan,) = rk.plan_of(model)
    assert rk.plan_of(type(model)) == [plan]  # shared by every instance of the rematted class
    assert plan.predicted_activation_bytes <= 0.8 * plan.baseline_activation_bytes


def test_jax_targets_auto_did_not_make_are_refused():
    pytest.importorskip("jax")

    def loss(params, x):
        return (params * x).sum()

    for target in (loss, 42, rk.unwrap(rk.auto(loss, budget=0.5))):
        with pytest.raises(ValueError, match=r"remat_kit\.plan_of\(target=.*not made by remat_kit\.auto.*JAX function"):
            rk.plan_of(target)


def test_without_jax_or_torch_a_non_rematted_target_is_a_value_error():
    # Without jax nothing but a torch module can be rematted: the answer is the same ValueError,
    # not an ImportError asking for jax.
    code = (
        "import sys\n"
        "sys.modules.update(dict.fromkeys(('jax', 'jaxlib', 'flax', 'torch')))\n"  # None: import fails
        "import remat_kit as rk\n"
        "try:\n"
        "    rk.plan_of(lambda x: x)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "remat_kit.plan_of(target=<function <lambda>" in proc.stdout and "not made by remat_kit.auto" in proc.stdout
