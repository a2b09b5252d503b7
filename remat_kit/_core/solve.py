"""Budget solvers: the least-recompute plan whose simulated activation peak fits the budget.

* ``"dp"`` (default): the whole-graph op-level 0-1 program where the graph is small enough for it
  to finish quickly (`WHOLE_GRAPH_WORK`, `WHOLE_GRAPH_SECONDS`), and the chain DP over per-block
  menus (menus.py, chain_dp.py); the cheaper of the two answers wins. The program is exact under
  the same model (also tried on larger graphs of mostly distinct blocks, `UNREPEATED_WORK`); the
  DP runs where it would not finish in time (deep stacks) and where
  multi-block segments are allowed (the program does not model them). The DP's menus hold each
  block's (kept bytes, cost) hull vertices, and an answer a Lagrangian bound does not prove within
  `WITHIN_OPTIMUM` of the optimum is refined once over denser menus around it (frontier.py); so
  the DP alone is within 1.02x of the whole-graph optimum on 24-96-layer stacks (it was 1.04-1.34x
  with menus of evenly spaced kept-bytes caps). See reports/solver_quality.md.
* ``"milp"``: one op-level 0-1 program over the whole graph (exact under the memory model; for
  graphs up to a few thousand values).
* ``"greedy"``: recompute the values with the most bytes per unit of recompute time first;
  a fast baseline.

Every solver returns a Plan whose prediction the simulator produced; a plan over the limit is
never returned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from remat_kit._core import chain_dp, frontier
from remat_kit._core.budget import Budget, InfeasibleBudgetError, format_bytes, parse_budget
from remat_kit._core.constraints import NO_CONSTRAINTS, PlanConstraints, honours
from remat_kit._core.costs import Costs
from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.menus import (
    MILP_LAYER_WORK,
    MILP_MENU_WORK,
    block_menus,
    codes_from_milp,
    fill_options,
    op_level_blocks,
    op_level_work,
    segment_cap,
    segment_options,
    signatures,
)
from remat_kit._core.milp import solve_milp
from remat_kit._core.plan import DecisionCode, Plan
from remat_kit._core.simulate import _OFFLOAD, _RECOMPUTE, _SAVE, _run, baseline_activation_bytes

__all__ = [  # re-exported for the adapters, which import them from here
    "MILP_LAYER_WORK",
    "MILP_MENU_WORK",
    "SOLVERS",
    "Costs",
    "InfeasibleBudgetError",
    "PlanConstraints",
    "block_menus",
    "check_solver",
    "codes_from_milp",
    "op_level_blocks",
    "op_level_work",
    "segment_cap",
    "segment_options",
    "smallest_activation_bytes",
    "solve",
]

SOLVERS = ("dp", "milp", "greedy")
# The default solver's whole-graph program: up to this much work (sum over blocks of (free
# values)², what building the program costs; a 12-layer transformer_graph is ~4,300) and this
# long in HiGHS. Past either the DP's answer stands alone (a 96-layer stack is ~35,000: its DP is
# as good and faster, reports/solver_quality.md).
WHOLE_GRAPH_WORK = 16_000
WHOLE_GRAPH_SECONDS = 1.0
# ... and up to this much where most blocks do not repeat (_whole_graph_affordable): 4,000 ops
# with no repeated layer are ~170,000 (the program's variables are ~0.2x this; milp.MAX_VARIABLES).
UNREPEATED_WORK = 200_000
# The chain DP's answer is refined around its options unless a lower bound on the optimum
# (frontier.lower_bound) puts it within this factor of it: issue 12's target is 1.02, and the
# bound holds only where menus hold their blocks' hull vertices (op-level menus), so half the slack.
WITHIN_OPTIMUM = 1.01


def solve(
    graph: CostGraph,
    budget: object,
    *,
    solver: str | None = None,
    offload: bool = False,
    device: DeviceSpec | None = None,
    max_segment_blocks: int = 1,
    fixed_blocks: Collection[str] = (),
    constraints: PlanConstraints | None = None,
) -> Plan:
    """The plan with the least recompute time whose activation memory fits `budget`.

    Args:
      graph: the cost graph of one training step.
      budget: a float in (0, 1] (fraction of no-remat activation memory), or bytes for the whole
        step's peak (an int or a string such as ``"12GiB"``).
      solver: ``"dp"`` (default), ``"milp"`` or ``"greedy"``.
      offload: allow OFFLOAD decisions (host memory) besides SAVE and RECOMPUTE.
      device: roofline constants pricing recompute time; ``DeviceSpec()`` by default.
      max_segment_blocks: with ``solver="dp"``, also consider checkpointing up to this many
        consecutive blocks as one segment (dropping the boundaries inside it, as √n and rotor
        do). The plan's `segments` then says which blocks go together; 1 = one block each.
      fixed_blocks: names of blocks that never join a multi-block segment (code a framework runs
        outside any checkpoint region: embeddings, head, loss).
      constraints: values the plan must save or recompute and groups of values that share one
        fate (`PlanConstraints`); every solver's plan honours them as it comes.

    Raises:
      ValueError: a malformed budget, solver name or constraint.
      InfeasibleBudgetError: the budget is below what full recompute (and offload, if allowed)
        reaches under the constraints; the message names the smallest feasible budget.
    """
    parsed = parse_budget(budget)
    solver = check_solver(solver)
    spans = _check_args(graph, solver, offload, max_segment_blocks, fixed_blocks, constraints)
    constraints = constraints or NO_CONSTRAINTS
    device = device or DeviceSpec()
    costs = Costs(graph, device)
    baseline = baseline_activation_bytes(graph)
    limit = parsed.limit_activation_bytes(baseline, graph.constant_bytes)
    found = _solve_codes(graph, solver, parsed, limit, costs, offload, spans, constraints)
    if found is None:
        raise _infeasible(graph, budget, costs, offload, baseline, spans, constraints)
    codes, segments = found
    target = graph if segments is None else graph.regroup(segments)
    decisions = {target.values[i].name: DecisionCode(codes[i]).decision for i in target.free_values}
    plan = Plan.from_decisions(target, decisions, device=device, budget=str(parsed), solver=solver)
    # The solvers' contract; never hand out an over-budget plan, nor one the framework cannot run.
    broken = honours(target, codes, constraints)
    if plan.predicted_activation_bytes > limit or broken is not None:
        raise RuntimeError(
            f"solver {solver!r} returned a plan of {plan.predicted_activation_bytes} activation bytes (limit "
            f"{limit}){'' if broken is None else ' that breaks its constraints: ' + broken}; this is a remat_kit "
            "bug, please report it with the graph."
        )
    return plan


def _solve_codes(
    graph: CostGraph,
    solver: str,
    parsed: Budget,
    limit: int,
    costs: Costs,
    offload: bool,
    spans: tuple[int, frozenset[str]],
    constraints: PlanConstraints,
) -> tuple[list[int], list[list[str]] | None] | None:
    """(decision codes, segments or None) of `solver`'s plan within `limit`, or None if none fits."""
    if parsed.kind == "fraction" and parsed.value == 1.0 and not constraints:
        return [_SAVE] * len(graph), None  # no remat fits its own memory by definition
    if solver == "dp":
        return _solve_default(graph, limit, costs, offload, spans, constraints)
    if solver == "milp":
        off_cost = costs.offload if offload else None
        res = solve_milp(graph, limit=limit, rec_cost=costs.recompute, off_cost=off_cost, constraints=constraints)
        return None if res is None else (codes_from_milp(graph, res, constraints), None)
    codes = _solve_greedy(graph, limit, costs, constraints)
    return None if codes is None else (codes, None)


def _check_args(
    graph: CostGraph,
    solver: str,
    offload: object,
    max_segment_blocks: object,
    fixed_blocks: Collection[str],
    constraints: object,
) -> tuple[int, frozenset[str]]:
    """Validate `solve`'s arguments; (max blocks per segment, fixed blocks)."""
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r} must be True or False.")
    if not isinstance(max_segment_blocks, int) or isinstance(max_segment_blocks, bool) or max_segment_blocks < 1:
        raise ValueError(f"max_segment_blocks={max_segment_blocks!r} must be an int >= 1 (1 = one block per segment).")
    if max_segment_blocks > 1 and solver != "dp":
        raise ValueError(f"max_segment_blocks={max_segment_blocks} needs solver='dp', not solver={solver!r}.")
    unknown = set(fixed_blocks) - set(graph.block_names)
    if unknown:
        raise ValueError(
            f"fixed_blocks={sorted(fixed_blocks)!r} names blocks the graph does not have: {sorted(unknown)!r} "
            f"(blocks: {list(graph.block_names)!r})."
        )
    if constraints is not None:
        if not isinstance(constraints, PlanConstraints):
            raise ValueError(f"constraints={constraints!r} must be a PlanConstraints or None.")
        constraints.check(graph)
    return max_segment_blocks, frozenset(fixed_blocks)


def check_solver(solver: str | None) -> str:
    if solver is None:
        return "dp"
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not a solver; pass one of {list(SOLVERS)} or None (= 'dp').")
    return solver


def whole_graph_work(graph: CostGraph) -> int:
    """What the whole-graph program costs to build, in (free values)² summed over blocks: it has
    a variable per value and moment of each block's backward."""
    return sum(op_level_work(graph, blk) for blk in range(graph.num_blocks))


def _solve_default(
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
    model, and a program stopped by its time limit holds an incumbent only, so then both run.
    """
    whole = None
    if _whole_graph_affordable(graph, constraints):
        res = solve_milp(
            graph,
            limit=limit,
            rec_cost=costs.recompute,
            off_cost=costs.offload if offload else None,
            time_limit=WHOLE_GRAPH_SECONDS,
            warn=False,
            constraints=constraints,
        )
        # The program leaves out what the simulator adds on some traced graphs (backward
        # workspaces, values read across several blocks); its answer counts only where the
        # simulator confirms it fits.
        if res is not None and _run(graph, codes_from_milp(graph, res, constraints), False)[0] <= limit:
            whole = codes_from_milp(graph, res, constraints)
            if res.optimal and spans[0] == 1:
                return whole, None
    found = _solve_dp(graph, limit, costs, offload, spans, constraints)
    if whole is None:
        return found
    if found is None or costs.of(whole) <= costs.of(found[0]):
        return whole, None
    return found


def _whole_graph_affordable(graph: CostGraph, constraints: PlanConstraints) -> bool:
    """Whether the default tries the whole-graph program: up to `WHOLE_GRAPH_WORK`, or up to
    `UNREPEATED_WORK` where most blocks are unlike any other. There the DP's menus are mostly
    ladders (op-level menus are affordable for repeated blocks only), 1.2x the optimum on 96
    distinct blocks (reports/planning_speed.md), while the program solved them in about a second;
    a stack of repeated layers plans faster and as well with the DP (hull-vertex menus)."""
    work = whole_graph_work(graph)
    if work <= WHOLE_GRAPH_WORK:
        return True
    if work > UNREPEATED_WORK:
        return False
    count = Counter(signatures(graph, constraints))
    return sum(n for n in count.values() if n > 1) * 2 < graph.num_blocks


def _solve_dp(
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
    options = _dp_options(graph, costs, offload, spans, constraints)
    found = chain_dp.solve_chain(options, limit)
    if found is None:
        return None
    # The bound is over plans of one block each, the whole-graph program's: segments may go below.
    per_block = [[o for o in menu if o.span == 1] for menu in options]
    if found[1] > WITHIN_OPTIMUM * frontier.lower_bound(per_block, limit):
        found, options = _refined(graph, limit, costs, offload, constraints, options, found)
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
    costs: Costs,
    offload: bool,
    constraints: PlanConstraints,
    options: list[list[chain_dp.BlockOption]],
    found: tuple,
) -> tuple[tuple, list[list[chain_dp.BlockOption]]]:
    """(answer, options it indexes): `found` (a chain DP answer over `options`), or the DP's
    answer where some blocks' one-block menus are the denser ones `fill_options` builds around
    the options `found` chose (their segment options stay), where cheaper."""
    denser = fill_options(graph, costs, offload, constraints, [(start, options[start][k]) for start, k in found[0]])
    if not denser:
        return found, options
    local = [
        [*denser[blk], *(o for o in menu if o.span > 1)] if blk in denser else menu for blk, menu in enumerate(options)
    ]
    refined = chain_dp.solve_chain(local, limit)
    if refined is None or refined[1:3] >= found[1:3]:  # (cost, ops); `found` is a path of `local` too
        return found, options
    return refined, local


def _dp_options(
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


# -- greedy -----------------------------------------------------------------------------------
def _solve_greedy(
    graph: CostGraph, limit: int, costs: Costs, constraints: PlanConstraints = NO_CONSTRAINTS
) -> list[int] | None:
    """Recompute the top-k residuals by bytes per cost; the least k that fits (binary search).
    Under `constraints` each prefix is settled to them (must-save values and their groups never
    join it; a recomputed value's group joins with it)."""
    bound = constraints.on(graph)
    kept = bound.save | bound.saved_groups
    order = sorted(
        (i for i in graph.free_values if graph.is_residual[i] and i not in kept),
        key=lambda i: (-graph.values[i].num_bytes / (costs.recompute[i] + 1), i),
    )

    def codes_for(k: int) -> list[int]:
        codes = [_SAVE] * len(graph)
        chosen = {i: _RECOMPUTE for i in order[:k]}
        if bound:
            settled = bound.settle(graph, chosen, graph.activations)
            if settled is None:  # unreachable: nothing chosen shares a group with a must-save value
                raise RuntimeError("greedy: a prefix cannot be settled; this is a remat_kit bug")
            chosen = settled
        for i, c in chosen.items():
            codes[i] = c
        return codes

    def fits(k: int) -> bool:
        return _run(graph, codes_for(k), False)[0] <= limit

    if not fits(len(order)):
        # The peak is not monotone in k (recompute transients); try every k before giving up.
        k = next((k for k in range(len(order)) if fits(k)), None)
        return None if k is None else codes_for(k)
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return codes_for(lo)


# -- infeasible budgets -----------------------------------------------------------------------
def smallest_activation_bytes(
    graph: CostGraph,
    *,
    offload: bool = False,
    device: DeviceSpec | None = None,
    max_segment_blocks: int = 1,
    fixed_blocks: Collection[str] = (),
    constraints: PlanConstraints | None = None,
) -> int:
    """The least activation peak remat_kit's plans reach (keep-all, full recompute, selective,
    offload, segments of up to `max_segment_blocks` blocks) under `constraints`."""
    costs = Costs(graph, device or DeviceSpec())
    spans = (max_segment_blocks, frozenset(fixed_blocks))
    return chain_dp.min_peak(_dp_options(graph, costs, offload, spans, constraints or NO_CONSTRAINTS))


def _offload_all(graph: CostGraph, costs: Costs, blk: int, constraints: PlanConstraints) -> list[chain_dp.BlockOption]:
    members = graph.block_members[blk]
    codes: dict[int, int] | None = {i: _OFFLOAD for i in members if graph.is_residual[i] and not graph.is_forced[i]}
    if codes and constraints:
        codes = constraints.on(graph).settle(graph, codes, members)
    return [chain_dp.measure_option(graph, blk, codes, costs.of, "offload all")] if codes else []


def _infeasible(
    graph: CostGraph,
    raw: object,
    costs: Costs,
    offload: bool,
    baseline: int,
    spans: tuple[int, frozenset[str]],
    constraints: PlanConstraints = NO_CONSTRAINTS,
) -> InfeasibleBudgetError:
    max_span, fixed = spans
    options = _dp_options(graph, costs, offload, spans, constraints)
    smallest = chain_dp.min_peak(options)
    # The remedies are checked on cheap options only (every block offloaded; segments where the
    # chain repeats, so their options are shared): on hundreds of distinct blocks a full check
    # would cost more than the plan itself. What is not checked is said as a possibility.
    if (
        not offload
        and chain_dp.min_peak([m + _offload_all(graph, costs, b, constraints) for b, m in enumerate(options)])
        < smallest
    ):
        remedy = "pass offload=True"
    elif max_span == 1 and len(set(chain_dp.block_signature(graph, b) for b in range(graph.num_blocks))) > 16:
        remedy = "let segments span blocks (max_segment_blocks=4 or more), which may go lower"
    elif max_span == 1 and chain_dp.min_peak(_dp_options(graph, costs, offload, (4, fixed), constraints)) < smallest:
        remedy = "let segments span blocks (max_segment_blocks=4)"
    else:
        remedy = "make the blocks smaller (their boundaries and one block's backward are the floor)"
    fraction = smallest / baseline if baseline else 1.0
    return InfeasibleBudgetError.below(
        raw,
        smallest_activation_bytes=smallest,
        baseline_activation_bytes=baseline,
        constant_bytes=graph.constant_bytes,
        where=f" ({format_bytes(smallest)} of activations, {fraction:.1%} of no remat, "
        f"{format_bytes(graph.constant_bytes)} of parameters, gradients and inputs)",
        why="no plan of these blocks goes lower",
        remedies=[remedy],
    )
