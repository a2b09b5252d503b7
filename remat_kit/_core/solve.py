"""Budget solvers: the least-recompute plan whose simulated activation peak fits the budget.

* ``"dp"`` (default): the whole-graph op-level 0-1 program where it is affordable, and the chain
  DP over per-block menus (menus.py, chain_dp.py), refined once around its answer where a bound
  does not prove it within 1.01x of the optimum; the cheaper answer wins (default_solver.py).
  Within 1.02x of the whole-graph optimum on every benchmarked graph, 24-96-layer stacks included
  (reports/solver_quality.md).
* ``"milp"``: one op-level 0-1 program over the whole graph (exact under the memory model; for
  graphs up to a few thousand values).
* ``"greedy"``: recompute the values with the most bytes per unit of recompute time first;
  a fast baseline.

Every solver returns a Plan whose prediction the simulator produced; a plan over the limit is
never returned.
"""

from __future__ import annotations

from collections.abc import Collection

from remat_kit._core import chain_dp, default_solver
from remat_kit._core.budget import Budget, InfeasibleBudgetError, format_bytes, parse_budget
from remat_kit._core.constraints import NO_CONSTRAINTS, PlanConstraints, honours
from remat_kit._core.costs import Costs
from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.menus import (
    MILP_LAYER_WORK,
    MILP_MENU_WORK,
    block_menus,
    codes_from_milp,
    op_level_blocks,
    op_level_work,
    segment_cap,
    segment_options,
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
        return default_solver.solve_default(graph, limit, costs, offload, spans, constraints)
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
    return chain_dp.min_peak(default_solver.dp_options(graph, costs, offload, spans, constraints or NO_CONSTRAINTS))


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
    options = default_solver.dp_options(graph, costs, offload, spans, constraints)
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
    elif (
        max_span == 1
        and chain_dp.min_peak(default_solver.dp_options(graph, costs, offload, (4, fixed), constraints)) < smallest
    ):
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
