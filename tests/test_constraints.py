"""Plan constraints as solver inputs (issue 14, deliverable 3): values that must be saved, values
that must be recomputed, groups of values sharing one fate. Every solver's plan honours them as it
comes, the exact solvers reach the brute-force optimum under them, budgets are never exceeded."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import remat_kit as rk
from remat_kit._core import chain_dp
from remat_kit._core.budget import Budget
from remat_kit._core.constraints import PlanConstraints, honours
from remat_kit._core.menus import block_menus, codes_from_milp
from remat_kit._core.milp import solve_milp
from remat_kit._core.simulate import _OFFLOAD, _RECOMPUTE, _SAVE, _run, baseline_activation_bytes
from remat_kit._core.solve import Costs, smallest_activation_bytes
from tests.graphs import all_codes, random_chain
from tests.test_solvers import _codes_of, _path_codes

FRACTIONS = (0.2, 0.35, 0.5, 0.7, 0.9, 1.0)
seeds = st.integers(0, 10**6)


def random_constraints(graph: rk.CostGraph, seed: int) -> PlanConstraints:
    """Random must-save and must-recompute values and groups of one block's free values (two or
    three each, never holding both a must-save and a must-recompute value)."""
    rng = random.Random(seed)
    free = list(graph.free_values)
    name = [v.name for v in graph.values]
    save = {i for i in free if rng.random() < 0.15}
    recompute = {i for i in free if i not in save and rng.random() < 0.15}
    groups = []
    for blk in range(graph.num_blocks):
        pool = [i for i in graph.block_members[blk] if i in set(free)]
        rng.shuffle(pool)
        while len(pool) >= 2 and rng.random() < 0.7:
            g = {pool.pop() for _ in range(min(len(pool), rng.choice([2, 2, 3])))}
            if not (g & save and g & recompute):
                groups.append(frozenset(name[i] for i in g))
    return PlanConstraints(
        must_save=frozenset(name[i] for i in save),
        must_recompute=frozenset(name[i] for i in recompute),
        same_fate=tuple(groups),
    )


def brute_force(graph, limit, costs, constraints, *, offload=False):
    """(least (cost, ops), codes) over every plan that honours `constraints` and fits, or None."""
    best = None
    for codes in all_codes(graph, offload=offload):
        if honours(graph, codes, constraints) is None and _run(graph, codes, False)[0] <= limit:
            c = costs.of(codes)
            if best is None or c < best[0]:
                best = (c, codes)
    return best


def _setup(seed, **kwargs):
    graph = random_chain(seed, **kwargs)
    return graph, random_constraints(graph, seed + 1), Costs(graph, rk.DeviceSpec())


@settings(max_examples=40, deadline=None)
@given(seed=seeds, offload=st.booleans())
def test_milp_matches_brute_force_under_constraints(seed, offload):
    graph, cons, costs = _setup(seed, num_blocks=2 if offload else None)
    base = baseline_activation_bytes(graph)
    for frac in FRACTIONS:
        limit = math.floor(frac * base)
        best = brute_force(graph, limit, costs, cons, offload=offload)
        res = solve_milp(
            graph,
            limit=limit,
            rec_cost=costs.recompute,
            off_cost=costs.offload if offload else None,
            constraints=cons,
        )
        if best is None:
            assert res is None
            continue
        assert res is not None, f"MILP infeasible where brute force found {best[0]} at limit {limit}"
        codes = codes_from_milp(graph, res, cons)
        assert honours(graph, codes, cons) is None
        assert _run(graph, codes, False)[0] <= limit
        assert costs.of(codes) == best[0]


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_chain_dp_is_exact_over_every_honouring_block_plan(seed):
    """Constraints are block-local: the DP over every per-block plan that honours them finds the
    brute-force optimum under them."""
    graph, cons, costs = _setup(seed)
    bound = cons.on(graph)
    menus = []
    for blk in range(graph.num_blocks):
        members = graph.block_members[blk]
        free = [i for i in members if not graph.is_forced[i]]
        menu = []
        for combo in itertools.product([_SAVE, _RECOMPUTE], repeat=len(free)):
            codes = dict(zip(free, combo))
            if bound.violation(graph, codes, members) is None:
                menu.append(chain_dp.measure_option(graph, blk, codes, costs.of, "enum"))
        menus.append(menu)
    base = baseline_activation_bytes(graph)
    for frac in FRACTIONS:
        limit = math.floor(frac * base)
        best = brute_force(graph, limit, costs, cons)
        found = chain_dp.solve_chain(menus, limit)
        assert (found is None) == (best is None)
        if found is not None:
            codes = _path_codes(graph, menus, found[0])
            assert honours(graph, codes, cons) is None
            assert (found[1], found[2]) == best[0] == costs.of(codes)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, solver=st.sampled_from(rk.SOLVERS), frac=st.sampled_from(FRACTIONS), span=st.sampled_from([1, 2]))
def test_every_solver_honours_constraints_within_the_budget(seed, solver, frac, span):
    graph, cons, costs = _setup(seed)
    span = span if solver == "dp" else 1
    limit = math.floor(frac * baseline_activation_bytes(graph))
    best = brute_force(graph, limit, costs, cons)
    try:
        plan = rk.solve(graph, frac, solver=solver, constraints=cons, max_segment_blocks=span)
    except rk.InfeasibleBudgetError as e:
        assert solver != "milp" or best is None  # the exact solver is never wrong about feasibility
        if solver == "dp":  # the named figure is what the solver reaches under the same constraints
            assert e.smallest_bytes - graph.constant_bytes > limit
            assert e.smallest_bytes - graph.constant_bytes == smallest_activation_bytes(
                graph, constraints=cons, max_segment_blocks=span
            )
        return
    target = plan.graph_for(graph)
    codes = _codes_of(target, plan)
    assert honours(target, codes, cons) is None
    assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes <= limit
    assert best is not None or span > 1  # segments reach plans the per-block brute force does not
    if solver == "milp":
        assert costs.of(codes) == best[0]


@settings(max_examples=25, deadline=None)
@given(seed=seeds, span=st.sampled_from([1, 2]))
def test_the_named_smallest_budget_is_met(seed, span):
    """At the smallest activation bytes the solver names under constraints, it finds a plan."""
    graph, cons, _ = _setup(seed, num_blocks=3)
    smallest = smallest_activation_bytes(graph, constraints=cons, max_segment_blocks=span)
    assert (
        smallest >= min(_run(graph, c, False)[0] for c in all_codes(graph) if honours(graph, c, cons) is None)
        or span > 1
    )
    plan = rk.solve(
        graph, Budget("bytes", float(graph.constant_bytes + smallest)), constraints=cons, max_segment_blocks=span
    )
    assert plan.predicted_activation_bytes <= smallest


@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_plans_are_monotone_in_the_budget_under_constraints(seed):
    graph, cons, _ = _setup(seed)
    previous = None
    for frac in sorted(FRACTIONS, reverse=True):
        try:
            plan = rk.solve(graph, frac, solver="milp", constraints=cons)
        except rk.InfeasibleBudgetError:
            break
        key = (plan.predicted_recompute_seconds, plan.num_recomputed_ops)
        assert previous is None or key >= previous
        previous = key


@settings(max_examples=40, deadline=None)
@given(seed=seeds, data=st.data())
def test_settle_honours_and_leaves_honouring_plans_alone(seed, data):
    graph, cons, _ = _setup(seed)
    bound = cons.on(graph)
    codes = data.draw(st.sampled_from(list(all_codes(graph, offload=True))))
    sparse = {i: c for i, c in enumerate(codes) if c != _SAVE}
    settled = bound.settle(graph, sparse, graph.activations)
    if settled is None:  # only where a must-save value shares a group with a recomputed one
        assert any(any(u in bound.save for u in g) for g in bound.groups)
        return
    full = [settled.get(i, _SAVE) for i in range(len(graph))]
    assert honours(graph, full, cons) is None
    assert bound.settle(graph, settled, graph.activations) == settled
    if honours(graph, codes, cons) is None:  # only labels change: must-recompute values nothing needs
        assert settled == {**sparse, **dict.fromkeys(bound.recompute, _RECOMPUTE)}
        assert _run(graph, full, False)[0] == _run(graph, codes, False)[0]
    # settling only turns codes to RECOMPUTE (and must-save values to SAVE)
    for i, c in settled.items():
        assert c == sparse.get(i, _SAVE) or c == _RECOMPUTE
    assert all(c in (_RECOMPUTE, _OFFLOAD) for c in settled.values())


def test_no_constraints_change_nothing():
    """The empty constraints give the very plans of a solve without them (same menus, same DP)."""
    graph = rk.transformer_graph(num_layers=3, seq_len=128, batch=1, hidden=64, num_heads=2)
    for frac in (0.45, 0.6, 0.8):
        assert rk.solve(graph, frac) == rk.solve(graph, frac, constraints=PlanConstraints())


def test_menus_of_constrained_layers_are_shared_and_honour():
    """Layers with the same constraints share one menu; a layer constrained differently gets its
    own; every option honours them."""
    graph = rk.transformer_graph(num_layers=4, seq_len=128, batch=1, hidden=64, num_heads=2)
    costs = Costs(graph, rk.DeviceSpec())
    layer = [graph.block_members[b] for b in range(graph.num_blocks)]
    free = [[i for i in m if not graph.is_forced[i]] for m in layer]
    # Every layer's first two free values must be recomputed; layer 2's third must be saved.
    big = max(range(1, graph.num_blocks), key=lambda b: len(free[b]))
    must_recompute = {graph.values[f[k]].name for f in free[1:] for k in range(2) if len(f) > 2}
    must_save = {graph.values[free[big][2]].name}
    cons = PlanConstraints(must_save=must_save, must_recompute=must_recompute - must_save)
    menus = block_menus(graph, costs, False, cons)
    for blk, menu in enumerate(menus):
        for o in menu:
            assert cons.on(graph).violation(graph, dict(o.codes), layer[blk]) is None
    plan = rk.solve(graph, 0.5, constraints=cons)
    assert set(plan.names(rk.Decision.RECOMPUTE)) >= {n for n in must_recompute if graph.is_residual[graph.index(n)]}
    assert plan.decision(next(iter(must_save))) is rk.Decision.SAVE


def test_bad_constraints_raise_naming_the_problem():
    graph = random_chain(3, num_blocks=2, per_block=3)
    free = [graph.values[i].name for i in graph.free_values]
    with pytest.raises(ValueError, match="both must_save and must_recompute"):
        PlanConstraints(must_save={free[0]}, must_recompute={free[0]})
    with pytest.raises(ValueError, match="pass a collection"):
        PlanConstraints(must_save=free[0])
    with pytest.raises(ValueError, match="does not have"):
        rk.solve(graph, 0.5, constraints=PlanConstraints(must_save={"nope"}))
    with pytest.raises(ValueError, match="must be a PlanConstraints"):
        rk.solve(graph, 0.5, constraints={"must_save": free[:1]})
    first, last = graph.block_members[0][0], graph.block_members[-1][0]
    if graph.values[first].block != graph.values[last].block:
        with pytest.raises(ValueError, match="one block"):
            rk.solve(
                graph, 0.5, constraints=PlanConstraints(same_fate=[{graph.values[first].name, graph.values[last].name}])
            )
    with pytest.raises(ValueError, match="no plan can run it"):
        PlanConstraints(must_save={free[0]}, must_recompute={free[1]}, same_fate=[{free[0], free[1]}])
    with pytest.raises(ValueError, match="in two groups"):
        PlanConstraints(same_fate=[{free[0], free[1]}, {free[1], free[2]}])
