"""The JAX planner's floor is asked, not caught (issue 14 d3): `_plan.floor` names the least
activation bytes `choose` reaches under the same options, so the verifier's search (`_fit.py`)
and `auto`'s byte-budget path decide "below the floor" from it instead of catching
`InfeasibleBudgetError`."""

from __future__ import annotations

import ast
import pathlib

import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from remat_kit._core.budget import InfeasibleBudgetError  # noqa: E402
from remat_kit._jax._api import Planner  # noqa: E402
from remat_kit._jax._plan import Model, choose, floor  # noqa: E402

LAYERS, D = 4, 16
ADAPTER = pathlib.Path(__file__).resolve().parent.parent / "remat_kit" / "_jax"


def _layer(h, w):
    a = jnp.tanh(h @ w[0])
    return h + jnp.sin(jax.nn.gelu(a @ w[1])) * 0.5


def _scanned(params, x):
    h, _ = jax.lax.scan(lambda h, w: (_layer(h, w), None), x, params)
    return jnp.sum(h**2)


def _unrolled(params, x):
    h = x
    for i in range(LAYERS):
        h = _layer(h, params[i])
    return jnp.sum(h**2)


def _traced(f):
    params = jax.random.normal(jax.random.key(0), (LAYERS, 2, D, D)) * 0.1
    entry, _ = Planner(1.0, offload=False, solver=None, verify=False).prepare(f, (params, jnp.ones((8, D))), {})
    return entry.traced


@pytest.mark.parametrize("f", [_scanned, _unrolled], ids=["scanned", "unrolled"])
def test_floor_is_choose_verdict(f):
    """At every budget and knob, `choose` plans exactly where the floor admits the budget, and
    where it refuses, its error names the floor's bytes."""
    traced = _traced(f)
    knobs_list = [{}, {"scan_group": 2}, {"scan_group": 1}] if f is _scanned else [{}, {"max_segment_blocks": LAYERS}]
    refused = planned = 0
    for knobs in knobs_list:
        fl = floor(traced, "fraction", solver=None, offload=False, **knobs)
        assert 0 < fl.smallest <= fl.baseline
        for budget in (0.02, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0):
            admitted = fl.admits(budget, traced.graph.constant_bytes)
            try:
                plan = choose(traced, budget, solver=None, offload=False, **knobs)
            except InfeasibleBudgetError as e:
                assert not admitted, (knobs, budget)
                assert (e.smallest_activation_bytes, e.baseline_activation_bytes) == (fl.smallest, fl.baseline)
                refused += 1
            else:
                assert admitted, (knobs, budget, fl)
                assert plan.predicted_activation_bytes <= max(budget * fl.baseline, fl.smallest)
                planned += 1
    assert refused and planned  # both sides of the floor were checked


def test_least_memory_is_the_plan_at_the_floor():
    """`Model.least_memory` plans at the floor (no error to catch) and no plan goes lower."""
    traced = _traced(_scanned)
    model = Model(traced, solver=None, offload=False)
    least = model.least_memory()
    assert least.predicted_activation_bytes <= model.floor().smallest * 1.001
    with pytest.raises(InfeasibleBudgetError):
        model.plan(model.floor().fraction * 0.9)


def test_no_infeasible_error_as_control_flow():
    """Nothing in the JAX adapter catches `InfeasibleBudgetError` to learn something, only to
    record a verdict and raise it again (the plan cache). Fails before: `_fit` and `_api` caught
    it to find the model's floor."""
    catches = []
    for path in sorted(ADAPTER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and "InfeasibleBudgetError" in ast.unparse(
                node.type or ast.Name("")
            ):
                reraises = any(isinstance(n, ast.Raise) and n.exc is None for n in ast.walk(node))
                catches.append((path.name, node.lineno, reraises))
    assert all(reraises for _, _, reraises in catches), catches


def test_solves_sharing_a_graph_plan_as_fresh_ones():
    """The scan memo (`_scanplan._ScanMemo`: menus applied to every layer, body options by cap)
    is shared by every solve on a graph whatever the budget: solves in a row on one graph give
    the plans that solves on freshly traced graphs give."""
    budgets = (0.9, 0.5, 0.75, 0.6)
    shared = _traced(_scanned)
    in_a_row = [choose(shared, b, solver=None, offload=False).as_dict() for b in budgets]
    fresh = [choose(_traced(_scanned), b, solver=None, offload=False).as_dict() for b in budgets]
    assert in_a_row == fresh
    assert len({tuple(sorted(d.items())) for d in fresh}) > 1  # the budgets asked for different plans


def test_infeasible_error_names_the_least_plan_measured(monkeypatch):
    """Where XLA compiles the plans that recompute more to more (here, a stand-in measure), the
    search's first plans measure less than the least-memory ones measured last. The error names
    the least of every plan measured, not of the least-memory ones alone (fails before: it named
    the floors' least, above a plan the same search had measured), and a budget there is met."""
    import remat_kit as rk
    from remat_kit._core.plan import Decision
    from remat_kit._jax import _verify

    params = jax.random.normal(jax.random.key(0), (LAYERS, 2, D, D)) * 0.1
    x = jnp.ones((8, D))
    real = _verify.temp_bytes
    none = real(_traced(_unrolled), {}, _verify.specs_of([params, x]))
    seen: dict = {}

    def inverted(traced, decisions, specs, *, segments=()):
        recomputed = sum(d is Decision.RECOMPUTE for d in decisions.values()) / max(len(decisions), 1)
        seen[(tuple(sorted(decisions.items())), tuple(map(tuple, segments)))] = measured = int(
            none * (0.5 + 0.5 * recomputed + 0.1 * len(segments))
        )
        return measured

    monkeypatch.setattr(_verify, "temp_bytes", inverted)
    _verify._NONE_CACHE.clear()
    try:
        with pytest.raises(InfeasibleBudgetError) as e:
            jax.grad(rk.auto(_unrolled, 0.45))(params, x)
        assert len(set(seen.values())) > 1
        assert e.value.smallest_activation_bytes == min(seen.values())
        wrapped = rk.auto(_unrolled, e.value.smallest_fraction)
        jax.grad(wrapped)(params, x)
        (plan,) = rk.plan_of(wrapped)
        assert inverted(None, plan.as_dict(), None, segments=plan.segments) <= e.value.smallest_fraction * none
    finally:
        _verify._NONE_CACHE.clear()


def test_a_plan_measured_for_one_budget_is_not_compiled_again_for_another(monkeypatch):
    """Every budget's search of one program shares what was measured (`known`): a second budget
    whose search meets a plan the first compiled reads its bytes instead of compiling it again
    (the conformance suite's budgets below equinox's floor measured the same floor plans twice)."""
    import remat_kit as rk
    from remat_kit._jax import _verify

    params = jax.random.normal(jax.random.key(0), (LAYERS, 2, D, D)) * 0.1
    x = jnp.ones((8, D))
    real = _verify.temp_bytes
    compiled: list = []

    def counting(traced, decisions, specs, *, segments=()):
        compiled.append((tuple(sorted(decisions.items())), tuple(map(tuple, segments))))
        return real(traced, decisions, specs, segments=segments)

    monkeypatch.setattr(_verify, "temp_bytes", counting)
    _verify._NONE_CACHE.clear()
    try:
        for budget in (0.05, 0.06, 0.5, 0.45):  # two below the floor, two above it
            try:
                jax.grad(rk.auto(_unrolled, budget))(params, x)
            except InfeasibleBudgetError:
                pass
        assert len(compiled) > 2
        assert len(compiled) == len(set(compiled)), "a plan was compiled twice for one program"
    finally:
        _verify._NONE_CACHE.clear()
