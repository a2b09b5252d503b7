"""Plans are data: JSON round trip, schema version, stable names, committed plans reused."""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import remat_kit as rk
from tests.graphs import random_chain

ROOT = pathlib.Path(__file__).resolve().parents[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), frac=st.sampled_from([0.4, 0.6, 0.8, 1.0]), solver=st.sampled_from(rk.SOLVERS))
def test_json_round_trip(seed, frac, solver, tmp_path_factory):
    graph = random_chain(seed)
    try:
        plan = rk.solve(graph, frac, solver=solver)
    except rk.InfeasibleBudgetError:
        return
    assert rk.Plan.from_json(plan.to_json()) == plan
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    plan.save(path)
    assert rk.Plan.load(path) == plan
    assert rk.simulate(graph, rk.Plan.load(path)).activation_bytes == plan.predicted_activation_bytes


def test_schema_and_field_errors():
    graph = rk.transformer_graph(num_layers=2, seq_len=64, batch=1, hidden=32, num_heads=2)
    data = json.loads(rk.solve(graph, 0.8).to_json())
    with pytest.raises(ValueError, match="schema_version=99"):
        rk.Plan.from_json(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        rk.Plan.from_json(json.dumps({**data, "colour": "red"}))
    with pytest.raises(ValueError, match="decisions must be one of"):
        rk.Plan.from_json(json.dumps({**data, "decisions": {"layers.0.q": "forget"}}))
    with pytest.raises(ValueError, match="not JSON"):
        rk.Plan.from_json("{nope")


def test_names_are_stable_across_builds():
    def build():
        return rk.transformer_graph(num_layers=3, seq_len=128, batch=1, hidden=64, num_heads=2)

    a, b = build(), build()
    assert a.fingerprint() == b.fingerprint()
    assert rk.solve(a, 0.5) == rk.solve(b, 0.5)


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.json")), ids=lambda p: p.name)
def test_committed_policies_still_match_the_solver(path):
    """Plans under policies/ name the graph they were made for; re-solving gives the same plan."""
    from policies import load_with_graph

    plan, graph, budget = load_with_graph(path)
    plan.check_graph(graph)
    assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes
    assert rk.solve(graph, budget, solver=plan.solver) == plan


def test_policies_directory_is_not_empty():
    assert list((ROOT / "policies").glob("*.json"))


def test_one_decision_code_map():
    """`DecisionCode` is the one map between a decision and the small int the simulator and solvers
    use; the simulator's codes agree with it."""
    from remat_kit._core import simulate
    from remat_kit._core.plan import DecisionCode

    for d in rk.Decision:
        assert DecisionCode.of(d).decision is d and DecisionCode.of(d.value) is DecisionCode.of(d)
    assert [DecisionCode.of(d) for d in rk.Decision] == [0, 1, 2]
    graph = random_chain(0)
    plan = rk.presets.full(graph)  # recomputes something, keeps the rest
    codes = simulate.decision_codes(graph, plan)
    for i, v in enumerate(graph.values):
        assert DecisionCode(codes[i]).decision is plan.decision(v.name), v.name
    assert DecisionCode.RECOMPUTE in codes
