"""The default solver ("dp"): the whole-graph op-level 0-1 program where it is affordable, and the
chain DP over block menus, refined once around its answer where a bound does not prove it near
the optimum. `solve.solve` validates the arguments and hands the default solver's work here.

The program is exact under the memory model; the DP is exact over its menus, which hold each
block's (kept bytes, cost) hull vertices (frontier.py). Figures: reports/solver_quality.md and
reports/planning_speed.md.
"""

from __future__ import annotations

from collections import Counter

from remat_kit._core import chain_dp, frontier
from remat_kit._core.constraints import NO_CONSTRAINTS, PlanConstraints
from remat_kit._core.costs import Costs
from remat_kit._core.graph import CostGraph
from remat_kit._core.menus import (
    block_menus,
    codes_from_milp,
    fill_options,
    op_level_work,
    segment_options,
    signatures,
)
from remat_kit._core.milp import Program
from remat_kit._core.simulate import _SAVE, _run

# The default solver's whole-graph program: up to this much work (sum over blocks of (free
# values)², what building the program costs; a 12-layer transformer_graph is ~4,300) and this
# long in HiGHS. Past either the DP's answer stands alone (a 96-layer stack is ~35,000: its DP is
# as good and faster, reports/solver_quality.md).
WHOLE_GRAPH_WORK = 16_000
WHOLE_GRAPH_SECONDS = 1.0
# ... and up to this much where most blocks do not repeat (_whole_graph_affordable): 4,000 ops
# with no repeated layer are ~170,000 (the program's variables are ~0.2x this; milp.MAX_VARIABLES).
UNREPEATED_WORK = 200_000
# Building the program also reads every value once per block (the gradient buffers alive in each
# block's backward, milp_rows._static_grads): blocks x values of 4.3 M (600 distinct blocks of 12) took
# seconds; the chains of distinct blocks in reports/planning_speed.md are ~0.27 M.
UNREPEATED_SCAN = 1_000_000
# The chain DP's answer is refined around its options unless a lower bound on the optimum
# (frontier.lower_bound) puts it within this factor of it: issue 12's target is 1.02, and the
# bound holds only where menus hold their blocks' hull vertices (op-level menus), so half the slack.
WITHIN_OPTIMUM = 1.01


def whole_graph_work(graph: CostGraph) -> int:
    """What the whole-graph program costs to build, in (free values)² summed over blocks: it has
    a variable per value and moment of each block's backward."""
    return sum(op_level_work(graph, blk) for blk in range(graph.num_blocks))


def solve_default(
    graph: CostGraph,
    limit: int,
    costs: Costs,
    offload: bool,
    spans: tuple[int, frozenset[str]],
    constraints: PlanConstraints = NO_CONSTRAINTS,
):
    """(codes, segments or None) of the cheaper of the whole-graph program's answer (where it is
    affordable) and the chain DP's, or None when neither fits.

    The program's optimum is the optimum over every per-block plan, so with one block per
    segment a proven optimum makes the DP redundant; segments reach plans the program does not
    model, and a program stopped by its time limit holds an incumbent only, so then both run;
    one stopped by its time limit and beaten by the DP is not tried again on that graph.
    """
    whole, timed_out = None, False
    key = _costs_key(costs, offload, constraints)
    if _whole_graph_affordable(graph, constraints) and ("whole_program_lost", key) not in graph._cache:
        program = _whole_program(graph, key, costs, offload, constraints)
        res = program.solve(limit, time_limit=WHOLE_GRAPH_SECONDS, warn=False)
        # Proven infeasible at this limit is no loss: segments may reach it, the program may
        # still win at another limit.
        timed_out = program.stopped
        # The program leaves out what the simulator adds on some traced graphs (backward
        # workspaces, values read across several blocks); its answer counts only where the
        # simulator confirms it fits.
        if res is not None and _run(graph, codes_from_milp(graph, res, constraints), False)[0] <= limit:
            whole = codes_from_milp(graph, res, constraints)
            if res.optimal and spans[0] == 1:
                return whole, None
    found = solve_dp(graph, limit, costs, offload, spans, constraints)
    if whole is not None and (found is None or costs.of(whole) <= costs.of(found[0])):
        return whole, None
    if timed_out and found is not None:
        # Stopped by its time limit and beaten by the DP: on this graph the program is too big to
        # pay for itself, and later solves (a budget search solves the same graph many times) skip
        # it. Measured on equinox's transformer (work ~59,000): each 1 s incumbent cost 1.4-6x
        # the DP's plan, which took 0.02 s.
        graph._cache["whole_program_lost", key] = True
    return found


def _costs_key(costs: Costs, offload: bool, constraints: PlanConstraints) -> tuple:
    return (tuple(costs.recompute), tuple(costs.offload) if offload else None, constraints)


def _whole_program(graph: CostGraph, key: tuple, costs: Costs, offload: bool, constraints: PlanConstraints) -> Program:
    """The whole-graph program under these costs (`key`: `_costs_key`), built once per graph: a
    search over budgets (`_jax._fit`, the sweep) solves it at several limits, which change only
    row bounds."""
    if ("whole_program", key) not in graph._cache:
        off_cost = costs.offload if offload else None
        graph._cache["whole_program", key] = Program(
            graph, rec_cost=costs.recompute, off_cost=off_cost, constraints=constraints
        )
    return graph._cache["whole_program", key]


def _whole_graph_affordable(graph: CostGraph, constraints: PlanConstraints) -> bool:
    """Whether the default tries the whole-graph program: up to `WHOLE_GRAPH_WORK`, or up to
    `UNREPEATED_WORK` where most blocks are unlike any other. There the DP's menus are mostly
    ladders (op-level menus are affordable for repeated blocks only), 1.2x the optimum on 96
    distinct blocks (reports/planning_speed.md), while the program solved them in about a second;
    a stack of repeated layers plans faster and as well with the DP (hull-vertex menus)."""
    work = whole_graph_work(graph)
    if work <= WHOLE_GRAPH_WORK:
        return True
    if work > UNREPEATED_WORK or graph.num_blocks * len(graph.activations) > UNREPEATED_SCAN:
        return False
    count = Counter(signatures(graph, constraints))
    return sum(n for n in count.values() if n > 1) * 2 < graph.num_blocks


def solve_dp(
    graph: CostGraph,
    limit: int,
    costs: Costs,
    offload: bool,
    spans: tuple[int, frozenset[str]],
    constraints: PlanConstraints = NO_CONSTRAINTS,
):
    """(codes, segments or None) of the least-cost path, or None when nothing fits.

    A path over the block menus that a Lagrangian bound on the whole-graph program's optimum
    (`frontier.lower_bound`) does not prove within `WITHIN_OPTIMUM` of it is refined once: the
    frontier plans around the options it chose join the menus (`fill_options`) and the DP runs
    again over them.
    """
    options = dp_options(graph, costs, offload, spans, constraints)
    found = chain_dp.solve_chain(options, limit)
    if found is None:
        return None
    # The bound is over plans of one block each, the whole-graph program's: segments may go below.
    per_block = [[o for o in menu if o.span == 1] for menu in options]
    bound, price = frontier.lower_bound(per_block, limit)
    if found[1] > WITHIN_OPTIMUM * bound:
        found, options = _refined(graph, limit, (costs, offload, constraints), options, found, price)
    path = found[0]
    codes = [_SAVE] * len(graph)
    segments = []
    for start, k in path:
        option = options[start][k]
        for i, c in option.codes:
            codes[i] = c
        segments.append(list(graph.block_names[start : start + option.span]))
    merged = any(len(seg) > 1 for seg in segments)
    return codes, (segments if merged else None)


def _refined(
    graph: CostGraph,
    limit: int,
    setting: tuple[Costs, bool, PlanConstraints],
    options: list[list[chain_dp.BlockOption]],
    found: tuple,
    price: float,
) -> tuple[tuple, list[list[chain_dp.BlockOption]]]:
    """(answer, options it indexes): `found` (a chain DP answer over `options`), or the DP's
    answer where some blocks' one-block menus are the denser ones `fill_options` builds around
    the options `found` chose and the hull vertices `price` supports (their segment options
    stay), where cheaper. `setting`: (costs, offload allowed, constraints)."""
    costs, offload, constraints = setting
    chosen = [(start, options[start][k]) for start, k in found[0]]
    denser = fill_options(graph, costs, offload, constraints, chosen, price)
    if not denser:
        return found, options
    local = [
        [*denser[blk], *(o for o in menu if o.span > 1)] if blk in denser else menu for blk, menu in enumerate(options)
    ]
    refined = chain_dp.solve_chain(local, limit)
    if refined is None or refined[1:3] >= found[1:3]:  # (cost, ops); `found` is a path of `local` too
        return found, options
    return refined, local


def dp_options(
    graph: CostGraph,
    costs: Costs,
    offload: bool,
    spans: tuple[int, frozenset[str]],
    constraints: PlanConstraints = NO_CONSTRAINTS,
) -> list[list[chain_dp.BlockOption]]:
    """Block menus, plus segment options when `spans` = (max blocks per segment, fixed blocks)
    allows; every option honours `constraints`."""
    max_span, fixed = spans
    menus = block_menus(graph, costs, offload, constraints)
    if max_span <= 1:
        return menus
    key = ("segments", max_span, fixed, tuple(costs.recompute)) + ((constraints,) if constraints else ())
    if key not in graph._cache:
        graph._cache[key] = segment_options(graph, costs, max_span, fixed, constraints)
    return [menu + extra for menu, extra in zip(menus, graph._cache[key])]
