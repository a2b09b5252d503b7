"""Every solver against brute force on small random graphs; budgets never exceeded."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import remat_kit as rk
from remat_kit._core import chain_dp
from remat_kit._core.milp import solve_milp
from remat_kit._core.plan import DecisionCode
from remat_kit._core.simulate import _RECOMPUTE, _SAVE, _run, baseline_activation_bytes, shared_with_own_block
from remat_kit._core.solve import Costs, codes_from_milp
from tests.graphs import all_codes, brute_force, brute_min_peak, limit_of, random_chain

FRACTIONS = (0.2, 0.35, 0.5, 0.7, 0.9, 1.0)
seeds = st.integers(0, 10**6)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, offload=st.booleans())
def test_milp_matches_brute_force(seed, offload):
    graph = random_chain(seed, num_blocks=2 if offload else None)
    costs = Costs(graph, rk.DeviceSpec())
    base = baseline_activation_bytes(graph)
    for frac in FRACTIONS:
        limit = math.floor(frac * base)
        best = brute_force(graph, limit, costs, offload=offload)
        res = solve_milp(graph, limit=limit, rec_cost=costs.recompute, off_cost=costs.offload if offload else None)
        if best is None:
            assert res is None
            continue
        assert res is not None, f"MILP infeasible where brute force found {best[0]} at limit {limit}"
        codes = codes_from_milp(graph, res)
        assert _run(graph, codes, False)[0] <= limit
        assert costs.of(codes) == best[0]


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_chain_dp_is_exact_over_its_menus(seed):
    """With every per-block plan on the menu, the DP finds the brute-force optimum."""
    graph = random_chain(seed)
    costs = Costs(graph, rk.DeviceSpec())
    menus = _every_block_plan(graph, costs)
    base = baseline_activation_bytes(graph)
    for frac in FRACTIONS:
        limit = math.floor(frac * base)
        best = brute_force(graph, limit, costs)
        found = chain_dp.solve_chain(menus, limit)
        assert (found is None) == (best is None)
        if found is None:
            continue
        path, cost, ops, peak = found
        assert [start for start, _ in path] == list(range(graph.num_blocks))
        codes = _path_codes(graph, menus, path)
        assert _run(graph, codes, False)[0] == peak <= limit  # the DP's peak is the simulator's
        assert (cost, ops) == best[0] == costs.of(codes)
    assert chain_dp.min_peak(menus) == brute_min_peak(graph)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, data=st.data())
def test_memory_decomposes_over_blocks(seed, data):
    """The DP's premise: peak = max_b (kept bytes of earlier blocks + the block's local peak)."""
    graph = random_chain(seed)
    codes = data.draw(st.sampled_from(list(all_codes(graph))))
    costs = Costs(graph, rk.DeviceSpec())
    options = []
    for blk in range(graph.num_blocks):
        own = {i: codes[i] for i in graph.block_members[blk] if not graph.is_forced[i]}
        options.append(chain_dp.measure_option(graph, blk, own, costs.of, "x"))
        assert options[-1] == chain_dp.measure_option(graph, blk, own, costs.of, "x", windowed=False)
    prefix, predicted = 0, 0
    for o in options:
        predicted = max(predicted, prefix + o.local_peak)
        prefix += o.kept_bytes
    assert predicted == _run(graph, codes, False)[0]


@settings(max_examples=30, deadline=None)
@given(seed=seeds, solver=st.sampled_from(rk.SOLVERS), frac=st.sampled_from(FRACTIONS))
def test_solvers_never_exceed_the_budget(seed, solver, frac):
    graph = random_chain(seed)
    costs = Costs(graph, rk.DeviceSpec())
    limit = limit_of(frac, graph)  # as rk.solve takes `frac`
    best = brute_force(graph, limit, costs)
    try:
        plan = rk.solve(graph, frac, solver=solver)
    except rk.InfeasibleBudgetError as e:
        assert solver != "milp" or best is None  # the exact solver is never wrong about feasibility
        assert e.smallest_fraction > frac or best is None or solver != "dp"
        return
    result = rk.simulate(graph, plan)
    assert result.activation_bytes == plan.predicted_activation_bytes <= limit
    assert best is not None
    got = costs.of(_codes_of(graph, plan))
    assert got >= best[0]
    if solver == "milp":
        assert got == best[0]


def _codes_of(graph, plan):
    codes = [_SAVE] * len(graph)
    for name, d in plan.decisions:
        codes[graph.index(name)] = int(DecisionCode.of(d))
    return codes


def test_infeasible_budget_names_the_smallest_feasible_one():
    graph = rk.transformer_graph(num_layers=3, seq_len=256, batch=1, hidden=64, num_heads=2)
    with pytest.raises(rk.InfeasibleBudgetError) as info:
        rk.solve(graph, 0.05)
    err = info.value
    assert "smallest feasible budget" in str(err) and "budget=0.05" in str(err) and "raise it" in str(err)
    plan = rk.solve(graph, math.ceil(err.smallest_fraction * 1000) / 1000)  # the number it names works
    assert plan.predicted_activation_bytes <= math.floor(
        math.ceil(err.smallest_fraction * 1000) / 1000 * plan.baseline_activation_bytes
    )
    with pytest.raises(rk.InfeasibleBudgetError, match="smallest feasible budget"):
        rk.solve(graph, err.smallest_bytes - 1)
    rk.solve(graph, err.smallest_bytes)  # bytes: exactly the smallest is feasible


def test_offload_is_chosen_where_it_is_cheaper_than_recompute():
    graph = rk.transformer_graph(num_layers=4, seq_len=256, batch=1, hidden=64, num_heads=2)
    assert rk.smallest_activation_bytes(graph, offload=True) <= rk.smallest_activation_bytes(graph)
    # A slow matmul unit and a fast host link make moving activations cheaper than recomputing them.
    device = rk.DeviceSpec("slow-flops", peak_flops=1e9, memory_bandwidth=1e11, host_bandwidth=1e11)
    plain = rk.solve(graph, 0.4, device=device)
    moved = rk.solve(graph, 0.4, offload=True, device=device)
    assert moved.names(rk.Decision.OFFLOAD)
    assert moved.predicted_recompute_seconds < plain.predicted_recompute_seconds
    assert moved.predicted_activation_bytes <= math.floor(0.4 * moved.baseline_activation_bytes)


@pytest.mark.parametrize("bad", ["fast", "", 3, "DP"])
def test_bad_solver_name(bad):
    graph = random_chain(1)
    with pytest.raises(ValueError, match=r"solver=.* is not a solver; pass one of"):
        rk.solve(graph, 0.5, solver=bad)


def test_budget_one_is_no_remat():
    graph = rk.transformer_graph(num_layers=2, seq_len=128, batch=1, hidden=64, num_heads=2)
    plan = rk.solve(graph, 1.0)
    assert plan.num_recomputed_ops == 0 and plan.activation_fraction == 1.0


@pytest.mark.parametrize("solver", ["dp", "milp"])
def test_smaller_budget_never_gives_less_recompute(solver):
    graph = rk.transformer_graph(num_layers=3, seq_len=256, batch=1, hidden=64, num_heads=4)
    floor = rk.smallest_activation_bytes(graph) / rk.simulate(graph).activation_bytes
    fractions = [f for f in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0) if f >= floor]
    costs = [rk.solve(graph, f, solver=solver).predicted_recompute_seconds for f in fractions]
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] == 0.0


@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_monotone_on_random_graphs(seed):
    graph = random_chain(seed)
    previous = None
    for frac in sorted(FRACTIONS, reverse=True):
        try:
            plan = rk.solve(graph, frac, solver="milp")
        except rk.InfeasibleBudgetError:
            break
        key = (plan.predicted_recompute_seconds, plan.num_recomputed_ops)
        assert previous is None or key >= previous
        previous = key


def test_auto_beats_megatron_at_megatron_memory():
    """Paper check: a GPT layer with 5as/h = 80 (h=256, a=4, s=1024). At the memory Megatron's
    selective recompute reaches, the solver's extra FLOPs are at most Megatron's."""
    graph = rk.transformer_graph(num_layers=4, seq_len=1024, batch=1, hidden=256, num_heads=4)
    assert 5 * 4 * 1024 // 256 == 80
    megatron = rk.presets.megatron_selective(graph)
    plan = rk.solve(graph, megatron.predicted_peak_bytes)
    assert plan.predicted_peak_bytes <= megatron.predicted_peak_bytes
    assert plan.predicted_recompute_flops <= megatron.predicted_recompute_flops
    assert plan.predicted_recompute_seconds <= megatron.predicted_recompute_seconds


@pytest.mark.parametrize("preset", ["full", "megatron_selective", "every_2", "dots", "sqrt_n"])
def test_solver_no_worse_than_any_preset_that_fits(preset):
    graph = rk.transformer_graph(num_layers=6, seq_len=512, batch=1, hidden=128, num_heads=4)
    p = {
        "full": rk.presets.full,
        "megatron_selective": rk.presets.megatron_selective,
        "every_2": lambda g: rk.presets.every_k(g, 2),
        "sqrt_n": rk.presets.sqrt_n,
        "dots": lambda g: rk.presets.save_only_kinds(g, ["matmul", "attention"]),
    }[preset](graph)
    plan = rk.solve(graph, p.predicted_peak_bytes)
    assert plan.predicted_recompute_seconds <= p.predicted_recompute_seconds


def _segmentations(n):
    """Every way to cut n blocks into runs of consecutive blocks."""
    if n == 0:
        yield []
        return
    for first in range(1, n + 1):
        for rest in _segmentations(n - first):
            yield [first, *rest]


@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_chain_dp_with_segments_is_exact(seed):
    """Menus holding every plan of every single block and every merged segment: the DP equals
    brute force over all segmentations and all plans of each."""
    import itertools

    graph = random_chain(seed, num_blocks=3, per_block=2)
    costs = Costs(graph, rk.DeviceSpec())
    names = graph.block_names
    options = [[] for _ in range(graph.num_blocks)]
    for first in range(graph.num_blocks):
        for last in range(first, graph.num_blocks):
            merged = graph.regroup(
                [[n] for n in names[:first]] + [list(names[first : last + 1])] + [[n] for n in names[last + 1 :]]
            )
            free = [i for i in merged.block_members[first] if not merged.is_forced[i]]
            for combo in itertools.product([_SAVE, _RECOMPUTE], repeat=len(free)):
                codes = dict(zip(free, combo))
                o = chain_dp.measure_option(graph, first, codes, costs.of, "enum", last=last)
                assert o == chain_dp.measure_option(graph, first, codes, costs.of, "enum", last=last, windowed=False)
                options[first].append(o)
    base = baseline_activation_bytes(graph)
    for frac in (0.2, 0.35, 0.5, 0.7):
        limit = math.floor(frac * base)
        best = None
        for cut in _segmentations(graph.num_blocks):
            bounds = [0, *itertools.accumulate(cut)]
            merged = graph.regroup([list(names[a:b]) for a, b in zip(bounds, bounds[1:])])
            found = brute_force(merged, limit, Costs(merged, rk.DeviceSpec()))
            if found is not None and (best is None or found[0] < best):
                best = found[0]
        found = chain_dp.solve_chain(options, limit)
        assert (found is None) == (best is None)
        if found is not None:
            assert (found[1], found[2]) == best


def test_segments_reach_below_per_block_recompute_where_boundaries_dominate():
    """A deep chain of tiny blocks (an MLP): √n-style segments keep fewer boundaries."""
    vals = [rk.value("x", 1000, role="input"), rk.value("w", 10, role="param")]
    prev = "x"
    for b in range(16):
        h = rk.value(f"l{b}.h", 1000, kind="matmul", flops=10**6, deps=[prev, "w"], bwd_reads=[prev], block=b)
        a = rk.value(f"l{b}.a", 1000, kind="elementwise", flops=10**3, deps=[h.name], bwd_reads=[h.name], block=b)
        vals += [h, a]
        prev = a.name
    vals.append(rk.value("loss", 4, kind="reduction", deps=[prev], bwd_reads=[prev], block=15))
    graph = rk.CostGraph(vals)
    per_block = rk.smallest_activation_bytes(graph)
    with_segments = rk.smallest_activation_bytes(graph, max_segment_blocks=4)
    assert with_segments < per_block
    base = rk.simulate(graph).activation_bytes
    frac = (with_segments + per_block) / 2 / base
    with pytest.raises(rk.InfeasibleBudgetError, match="max_segment_blocks=4"):
        rk.solve(graph, frac)
    plan = rk.solve(graph, frac, max_segment_blocks=4)
    assert any(len(seg) > 1 for seg in plan.segments)
    assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes <= math.floor(frac * base)
    assert rk.Plan.from_json(plan.to_json()) == plan
    sqrt = rk.presets.sqrt_n(graph)
    if sqrt.predicted_activation_bytes <= plan.predicted_activation_bytes:
        assert plan.predicted_recompute_seconds <= sqrt.predicted_recompute_seconds
    with pytest.raises(ValueError, match="max_segment_blocks=0"):
        rk.solve(graph, 0.5, max_segment_blocks=0)
    with pytest.raises(ValueError, match="needs solver='dp'"):
        rk.solve(graph, 0.5, solver="milp", max_segment_blocks=2)


def test_identical_blocks_with_dead_end_outputs():
    """Outputs nobody reads but that require grad (torch autocast leaves weight casts like that)
    are seeded; their seeds are alive in every later block's backward, so identical blocks have
    different local peaks. Regression: the shared menu used the first block's peak."""
    vals = [rk.value("x", 100, role="input"), rk.value("w", 10, role="param")]
    prev = "x"
    for b in range(5):
        h = rk.value(f"l{b}.h", 400, kind="matmul", flops=10**5, deps=[prev, "w"], bwd_reads=[prev], block=b)
        cast = rk.value(f"l{b}.cast", 300, kind="other", flops=10, deps=["w"], bwd_reads=[], block=b)
        a = rk.value(f"l{b}.a", 100, kind="elementwise", flops=10**3, deps=[h.name], bwd_reads=[h.name], block=b)
        vals += [h, cast, a]
        prev = a.name
    vals.append(rk.value("loss", 4, kind="reduction", deps=[prev], bwd_reads=[prev], block=4))
    graph = rk.CostGraph(vals)
    floor = rk.smallest_activation_bytes(graph) / rk.simulate(graph).activation_bytes
    for frac in (0.5, 0.6, 0.7, 0.8, 0.9):
        if frac < floor:
            continue
        plan = rk.solve(graph, frac)  # raised "over the limit" before the fix
        exact = rk.solve(graph, frac, solver="milp")
        assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes
        assert plan.predicted_recompute_seconds == pytest.approx(exact.predicted_recompute_seconds)


def test_shared_menus_match_each_position_with_values_read_by_every_block():
    """A mask and a position table from the prologue are read by every layer (as in HF Llama):
    the mask is released only in the first layer's backward, the table's gradient is allocated in
    the last layer's. Identical layers then differ by position; each shared menu entry must still
    equal what the whole-graph simulator says at that position."""
    vals = [rk.value("x", 64, role="input"), rk.value("w", 10, role="param")]
    vals += [
        rk.value("pre.mask", 32, kind="other", deps=["x"], bwd_reads=[], requires_grad=False, block=0),
        rk.value("pre.pos", 64, kind="embedding", deps=["w"], bwd_reads=[], block=0),
        rk.value("pre.h", 64, kind="elementwise", deps=["x", "pre.pos"], bwd_reads=[], block=0),
    ]
    prev = "pre.h"
    for b in range(1, 6):
        q = rk.value(f"l{b}.q", 128, kind="matmul", flops=10**5, deps=[prev, "w"], bwd_reads=[prev], block=b)
        s = rk.value(
            f"l{b}.s",
            256,
            kind="attention",
            flops=10**5,
            deps=[q.name, "pre.mask", "pre.pos"],
            bwd_reads=[q.name, "pre.mask"],
            block=b,
        )
        o = rk.value(f"l{b}.o", 64, kind="matmul", flops=10**5, deps=[s.name, prev], bwd_reads=[s.name], block=b)
        vals += [q, s, o]
        prev = o.name
    vals.append(rk.value("loss", 4, kind="reduction", deps=[prev], bwd_reads=[prev], block=5))
    graph = rk.CostGraph(vals)
    from remat_kit._core.solve import block_menus

    costs = Costs(graph, rk.DeviceSpec())
    for blk, menu in enumerate(block_menus(graph, costs, False)):
        for o in menu:
            whole = chain_dp.measure_option(graph, blk, dict(o.codes), costs.of, o.label, windowed=False)
            assert (o.kept_bytes, o.local_peak) == (whole.kept_bytes, whole.local_peak), (blk, o.label)
    for frac in (0.5, 0.6, 0.8):
        try:
            plan = rk.solve(graph, frac)
        except rk.InfeasibleBudgetError:
            continue
        assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes


def test_min_peak_skips_blocks_only_a_segment_covers():
    # Block 1 starts no option: only the two-block segment from block 0 reaches block 2 (a scan
    # regrouped g layers per step gives such menus). min_peak must equal solve_chain's bisection.
    def opt(kept, peak, span=1):
        return chain_dp.BlockOption(
            label="o",
            codes=(),
            kept_bytes=kept,
            local_peak=peak,
            cost=0,
            num_ops=0,
            span=span,
            forward_peak=peak,
            backward_peak=peak,
        )

    options = [[opt(5, 9, span=2)], [], [opt(3, 4), opt(1, 7)]]
    assert chain_dp.min_peak(options) == 9
    assert chain_dp.solve_chain(options, 9) is not None and chain_dp.solve_chain(options, 8) is None


@settings(max_examples=60, deadline=None)
@given(seed=seeds, data=st.data())
def test_decomposition_is_an_upper_bound_where_a_value_is_shared_with_later_blocks(seed, data):
    """A value kept for later blocks that its own block also reads (T5's position bias) lives on
    only if its own block recomputes a reader: the decomposition counts it alive, never less
    than the simulator (found on T5, where both solvers handed out plans over the limit)."""
    graph = random_chain(seed, shared=True)
    codes = data.draw(st.sampled_from(list(all_codes(graph))))
    costs = Costs(graph, rk.DeviceSpec())
    prefix, predicted = 0, 0
    for blk in range(graph.num_blocks):
        own = {i: codes[i] for i in graph.block_members[blk] if not graph.is_forced[i]}
        option = chain_dp.measure_option(graph, blk, own, costs.of, "x")
        assert option == chain_dp.measure_option(graph, blk, own, costs.of, "x", windowed=False)
        predicted = max(predicted, prefix + option.local_peak)
        prefix += option.kept_bytes
    assert predicted >= _run(graph, codes, False)[0]


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_solvers_never_exceed_the_budget_where_values_are_shared_with_later_blocks(seed):
    """The DP over every per-block plan and the op-level program keep the simulated peak within
    the limit, and the bound costs at most the shared bytes: where they find nothing, nothing
    fits with that much less memory either."""
    graph = random_chain(seed, shared=True)
    shared_bytes = sum(v.num_bytes for v, s in zip(graph.values, shared_with_own_block(graph)) if s)
    costs = Costs(graph, rk.DeviceSpec())
    menus = _every_block_plan(graph, costs)
    for frac in FRACTIONS:
        limit = math.floor(frac * baseline_activation_bytes(graph))
        found = chain_dp.solve_chain(menus, limit)
        res = solve_milp(graph, limit=limit, rec_cost=costs.recompute)
        for codes in (
            None if found is None else _path_codes(graph, menus, found[0]),
            None if res is None else codes_from_milp(graph, res),
        ):
            if codes is None:
                assert brute_force(graph, limit - shared_bytes, costs) is None
            else:
                assert _run(graph, codes, False)[0] <= limit
        for solver in rk.SOLVERS:
            try:
                plan = rk.solve(graph, frac, solver=solver)
            except rk.InfeasibleBudgetError:
                continue
            assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes <= limit


def _every_block_plan(graph, costs):
    """Per block, a menu holding every plan of its free values (save or recompute each)."""
    menus = []
    for blk in range(graph.num_blocks):
        free = [i for i in graph.block_members[blk] if not graph.is_forced[i]]
        menus.append(
            [
                chain_dp.measure_option(graph, blk, dict(zip(free, combo)), costs.of, "enum")
                for combo in itertools.product([_SAVE, _RECOMPUTE], repeat=len(free))
            ]
        )
    return menus


def _path_codes(graph, menus, path):
    codes = [_SAVE] * len(graph)
    for start, k in path:
        for i, c in menus[start][k].codes:
            codes[i] = c
    return codes


# -- planning without repetition (issue 11, deliverable 3) -------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=seeds, offload=st.booleans())
def test_sparse_costs_equal_the_full_vector(seed, offload):
    """Block menus price options from {index: code}; it must be what the full vector costs."""
    graph = random_chain(seed)
    costs = Costs(graph, rk.DeviceSpec())
    for codes in itertools.islice(all_codes(graph, offload=offload), 64):
        assert costs.of({i: c for i, c in enumerate(codes) if c != _SAVE}) == costs.of(codes)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, frac=st.sampled_from(FRACTIONS))
def test_ladder_menus_never_exceed_the_budget(seed, frac):
    """With no op-level program at all (every block past the work limit), every plan still fits
    and is no cheaper than the brute-force optimum; infeasibility is never claimed wrongly below
    what the menus reach."""
    from remat_kit._core import default_solver, menus

    graph = random_chain(seed)
    costs = Costs(graph, rk.DeviceSpec())
    limit = math.floor(frac * baseline_activation_bytes(graph))
    best = brute_force(graph, limit, costs)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(menus, "MILP_MENU_WORK", 0)
            mp.setattr(menus, "MILP_LAYER_WORK", 0)
            mp.setattr(default_solver, "WHOLE_GRAPH_WORK", -1)  # the DP alone, on ladder menus
            mp.setattr(default_solver, "UNREPEATED_WORK", -1)
            plan = rk.solve(graph, frac)
    except rk.InfeasibleBudgetError as e:
        assert e.smallest_bytes - graph.constant_bytes > limit  # what it names does not fit either
        return
    assert rk.simulate(graph, plan).activation_bytes == plan.predicted_activation_bytes <= limit
    assert best is not None and costs.of(_codes_of(graph, plan)) >= best[0]


def test_a_block_too_big_for_the_op_level_program_gets_a_menu():
    """One block of 600 values: one program over it would pass milp.MAX_VARIABLES (the lm1b
    failure: "the program has 121719 variables"); the default solver plans it from the ladder."""
    graph = random_chain(3, num_blocks=1, per_block=600)
    from remat_kit._core.solve import op_level_blocks

    assert not op_level_blocks(graph)
    floor = rk.smallest_activation_bytes(graph) / baseline_activation_bytes(graph)
    for frac in (0.7, 0.9):
        if frac < floor:
            with pytest.raises(rk.InfeasibleBudgetError):
                rk.solve(graph, frac)
            continue
        plan = rk.solve(graph, frac)
        assert rk.simulate(graph, plan).activation_fraction <= frac


@settings(max_examples=30, deadline=None)
@given(seed=seeds)
def test_thinned_dp_states_still_give_plans_that_fit(seed):
    """Past MAX_STATES the DP keeps the cheapest state per range of kept bytes: no longer exact,
    but every path it returns fits, with the simulator's peak."""
    graph = random_chain(seed, num_blocks=4)
    costs = Costs(graph, rk.DeviceSpec())
    menus = _every_block_plan(graph, costs)
    for frac in FRACTIONS:
        limit = math.floor(frac * baseline_activation_bytes(graph))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(chain_dp, "MAX_STATES", 2)
            found = chain_dp.solve_chain(menus, limit)
        if found is not None:
            codes = _path_codes(graph, menus, found[0])
            assert _run(graph, codes, False)[0] == found[3] <= limit


def test_whole_graph_program_is_built_once_and_dropped_where_it_loses_to_the_dp(monkeypatch):
    """The default solver builds the whole-graph program once per graph and costs (a budget
    search solves one graph at many limits), and a program stopped by its time limit and beaten
    by the DP is not solved again on that graph: on equinox's transformer each 1 s incumbent cost
    1.4-6x the DP's plan. The answers are the DP's, as they were."""
    from remat_kit._core import default_solver, milp

    graph = rk.transformer_graph(num_layers=4, seq_len=256, batch=1, hidden=128, num_heads=4)
    assert default_solver._whole_graph_affordable(graph, default_solver.NO_CONSTRAINTS)
    costs = Costs(graph, rk.DeviceSpec())
    base = baseline_activation_bytes(graph)
    built, solved = [], []
    real_init, real_solve = milp.Program.__init__, milp.Program.solve
    whole = set()  # the whole-graph programs (the DP's menus build per-block ones)

    def init(self, *a, **k):
        if k.get("blocks") is None:
            built.append(1)
            whole.add(id(self))
        real_init(self, *a, **k)

    def solve(self, *a, **k):
        if id(self) in whole:
            solved.append(1)
        return real_solve(self, *a, **k)

    monkeypatch.setattr(milp.Program, "__init__", init)
    monkeypatch.setattr(milp.Program, "solve", solve)
    # A time limit HiGHS cannot prove anything within: its incumbent (if any) loses to the DP.
    monkeypatch.setattr(default_solver, "WHOLE_GRAPH_SECONDS", 1e-6)
    spans = (1, frozenset())
    first = default_solver.solve_default(graph, int(0.5 * base), costs, False, spans)
    assert (len(built), len(solved)) == (1, 1)
    second = default_solver.solve_default(graph, int(0.4 * base), costs, False, spans)
    assert (len(built), len(solved)) == (1, 1), "the losing program was solved again"
    for limit, got in ((int(0.5 * base), first), (int(0.4 * base), second)):
        dp = default_solver.solve_dp(graph, limit, costs, False, spans)
        assert costs.of(got[0]) == costs.of(dp[0])
    # Where the program proves its optimum in time it is kept, and built once.
    fresh = rk.transformer_graph(num_layers=4, seq_len=256, batch=1, hidden=128, num_heads=4)
    monkeypatch.setattr(default_solver, "WHOLE_GRAPH_SECONDS", 60.0)
    built.clear(), solved.clear()
    for frac in (0.5, 0.4, 0.6):
        default_solver.solve_default(fresh, int(frac * base), Costs(fresh, rk.DeviceSpec()), False, spans)
    assert (len(built), len(solved)) == (1, 3)


def test_a_whole_graph_program_proven_infeasible_where_segments_fit_is_not_dropped():
    """Only a program stopped by its time limit is dropped after losing to the DP: one proven
    infeasible at a limit the DP's segments reach may still be the optimum at another limit."""
    from remat_kit._core import default_solver
    from remat_kit._core.solve import smallest_activation_bytes

    graph = random_chain(13)  # its segments reach under every per-block plan
    per_block, segments = smallest_activation_bytes(graph), smallest_activation_bytes(graph, max_segment_blocks=4)
    assert segments < per_block
    costs = Costs(graph, rk.DeviceSpec())
    key = default_solver._costs_key(costs, False, default_solver.NO_CONSTRAINTS)
    found = default_solver.solve_default(graph, segments, costs, False, (4, frozenset()))
    assert found is not None and found[1], "the DP's segments fit"
    program = default_solver._whole_program(graph, key, costs, False, default_solver.NO_CONSTRAINTS)
    assert program.solve(segments, warn=False) is None and not program.stopped  # proven infeasible
    assert ("whole_program_lost", key) not in graph._cache
