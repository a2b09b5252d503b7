"""Op-level 0-1 program over the simulator's memory model, solved with scipy's HiGHS.

Variables per free activation u: s_u (keep), r_u (recompute), o_u (offload, when allowed).
The simulator's memory at every moment is linear in them once the moments are enumerated (the
forward moments, and per block: reload, one recompute moment per value, the backward moments).
What depends on the plan beyond s/r/o is only how long a value stays alive for recomputing its
consumers; an auxiliary a_{u,m} >= r_w (consumer w recomputed at or after moment m) models it.
Every auxiliary only appears on the left of <= memory constraints, so at the optimum it takes the
simulator's exact value: the program's optimum is the simulator's optimum (tested against brute
force). Costs are integers (picoseconds of roofline time), with a tie-break for fewer ops.

Checkmate (Jain et al., MLSys 2020) solves the same problem with a schedule-level MILP; this
formulation is smaller because the schedule is fixed (block-granular recompute, as jax.checkpoint
and non-reentrant torch checkpoint run it).

The memory rows are built in `milp_rows.py`. `Program` builds a program once and solves it under
several limits, caps and prices (a block's menu search asks for dozens).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from remat_kit._core.constraints import NO_CONSTRAINTS, BoundConstraints, PlanConstraints
from remat_kit._core.graph import CostGraph
from remat_kit._core.milp_rows import Builder, add_term, backward_rows, forward_rows, rc_consumers

MAX_VARIABLES = 60_000  # beyond this HiGHS takes minutes; the chain DP is the tool for big graphs


@dataclasses.dataclass(frozen=True)
class MilpResult:
    keep: frozenset[int]
    recompute: frozenset[int]
    offload: frozenset[int]
    objective: float
    optimal: bool = True  # False: HiGHS stopped at its time limit with this incumbent


def solve_milp(
    graph: CostGraph,
    *,
    limit: int | None,
    rec_cost: Sequence[int],
    off_cost: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    kept_cap: int | None = None,
    kept_price: float = 0.0,
    backward_bytes: int = 0,
    time_limit: float = 60.0,
    warn: bool = True,
    constraints: PlanConstraints | None = None,
) -> MilpResult | None:
    """Least-cost decisions for the values of `blocks` (default all) keeping memory <= `limit`.

    With all blocks, `limit` bounds the simulator's activation peak. With a subset (one block,
    as the chain DP asks), memory is counted relative to the bytes the earlier blocks keep,
    and `kept_cap` bounds the bytes the block itself keeps; `kept_price` adds that many cost units
    per byte the blocks keep to the objective (a Lagrangian price: the chain DP's menus read the
    lower convex hull of a block's (kept bytes, cost) trade off it); `backward_bytes` is a constant alive in
    every backward moment (gradient seeds of outputs outside a window). `constraints` (values that
    must be saved or recomputed, groups sharing one fate) hold exactly in the answer. Returns None
    when infeasible (or when `time_limit` passed before any plan was found); `warn`: warn when the
    time limit stops HiGHS with a plan that may not be optimal (callers comparing it with another
    plan don't). One program solved once: `Program` solves one under several limits and caps.
    """
    program = Program(
        graph,
        rec_cost=rec_cost,
        off_cost=off_cost,
        blocks=blocks,
        backward_bytes=backward_bytes,
        constraints=constraints,
        limited=limit is not None,
        capped=kept_cap is not None,
    )
    return program.solve(limit, kept_cap, kept_price, time_limit=time_limit, warn=warn)


class Program:
    """The 0-1 program of `solve_milp`, built once and solved under several memory limits, kept-bytes
    caps and prices per kept byte: those change only row bounds and the objective, so a block's
    menu search (several prices, a bisection over caps) pays for building the rows once.

    `limited` / `capped`: whether the memory rows / the kept-bytes rows exist. A solve under the
    same (limit given, cap given) pattern hands HiGHS the matrix `solve_milp` would have built
    for it, so the answers are the same (tests/test_solvers.py)."""

    def __init__(
        self,
        graph: CostGraph,
        *,
        rec_cost: Sequence[int],
        off_cost: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        backward_bytes: int = 0,
        constraints: PlanConstraints | None = None,
        limited: bool = True,
        capped: bool = False,
    ):
        blocks = tuple(range(graph.num_blocks)) if blocks is None else tuple(blocks)
        b = Builder(graph, blocks, off_cost is not None, limited)
        size = [v.num_bytes for v in graph.values]
        free = [i for blk in blocks for i in graph.block_members[blk] if not graph.is_forced[i]]
        bound = (constraints or NO_CONSTRAINTS).on(graph)
        _decision_vars(b, free, bound)
        cost = _objective(b, free, rec_cost, off_cost)
        _coverage_rows(b, free)
        _group_rows(b, bound, set(free))
        prefix_vars = _prefix_vars(b, len(blocks) == graph.num_blocks, size)
        for blk in blocks:
            forward_rows(b, blk, size, prefix_vars.get(blk))
            backward_rows(b, blk, size, prefix_vars.get(blk), backward_bytes)
        self.kept = [_kept_expr(b, blk, size) for blk in blocks]  # per block: (coefs, constant)
        self.cap_rows = [_cap_row(b, expr) for expr, _ in self.kept] if capped else []
        if b.num_vars > MAX_VARIABLES:
            raise ValueError(
                f"solver='milp': the program has {b.num_vars} variables (max {MAX_VARIABLES}); use solver='dp' "
                "(per-block programs chained by dynamic programming) for a graph this size."
            )
        self.builder, self.free, self.capped = b, free, capped
        self.cost = np.concatenate([cost, np.zeros(b.num_vars - len(cost))])
        self.matrix, self.lo, self.hi = _matrix(b)
        self.stopped = False  # whether the last solve ended unproven (its time limit, or HiGHS failed)

    def solve(
        self,
        limit: int | None,
        kept_cap: int | None = None,
        kept_price: float = 0.0,
        *,
        time_limit: float = 60.0,
        warn: bool = True,
    ) -> MilpResult | None:
        """`solve_milp`'s answer under `limit`, `kept_cap` and `kept_price` (see there)."""
        b = self.builder
        if (limit is not None) != b.limited or (kept_cap is not None) != self.capped:
            raise ValueError(
                f"Program built with limited={b.limited}, capped={self.capped}; got limit={limit!r}, "
                f"kept_cap={kept_cap!r}"
            )
        hi = self.hi.copy()
        for row, const in b.limit_rows:
            hi[row] = limit - const  # type: ignore[operator]
        for row, (_, const) in zip(self.cap_rows, self.kept):
            hi[row] = kept_cap - const  # type: ignore[operator]
        cost = self.cost.copy()
        if kept_price:
            for expr, _ in self.kept:
                for j, c in expr.items():
                    cost[j] += kept_price * c
        res = _highs(b, cost, self.matrix, self.lo, hi, time_limit)
        # scipy's milp status: 0 optimal, 1 stopped by the time limit, 2 proven infeasible.
        self.stopped = res.status not in (0, 2)
        if res.x is None:
            return None
        if res.status != 0 and warn:  # stopped by the time limit with an incumbent: feasible, maybe not optimal
            warnings.warn(
                f"solve_milp: HiGHS stopped after {time_limit} s ({res.message}); the plan fits the limit but "
                "may not be the least-recompute one. Use solver='dp' for large graphs.",
                RuntimeWarning,
                stacklevel=3,
            )
        x = np.round(res.x).astype(int)
        free = self.free
        keep = frozenset(i for i in free if x[b.var[("s", i)]])
        off = frozenset(i for i in free if b.allow_offload and x[b.var[("o", i)]] and i not in keep)
        rec = frozenset(i for i in free if x[b.var[("r", i)]] and i not in keep and i not in off)
        return MilpResult(keep, rec, off, float(res.fun), optimal=res.status == 0)


def _cap_row(b: Builder, expr: dict[int, float]) -> int:
    """A block's kept-bytes row; its bound (the cap less the forced bytes) is set per solve."""
    b.add(expr, hi=np.inf)
    return len(b.rows) - 1


def _decision_vars(b: Builder, free: Sequence[int], bound: BoundConstraints) -> None:
    """s, r (and o) per free value; what the constraints forbid is bounded to 0."""
    for i in free:
        b.new_var(("s", i), True, 0.0 if i in bound.recompute else 1.0)
        b.new_var(("r", i), True, 0.0 if i in bound.save else 1.0)
        if b.allow_offload:
            b.new_var(("o", i), True, 0.0 if i in bound.save or i in bound.recompute else 1.0)


def _objective(b: Builder, free: Sequence[int], rec_cost: Sequence[int], off_cost: Sequence[int] | None) -> np.ndarray:
    cost = np.zeros(b.num_vars)
    # Tie-break: fewer recomputed ops, worth less than one cost unit in total.
    tiny = 1.0 / (len(free) + 2)
    for i in free:
        cost[b.var[("r", i)]] = rec_cost[i] + tiny
        if off_cost is not None:  # exactly when b.allow_offload
            cost[b.var[("o", i)]] = off_cost[i]
    return cost


def _coverage_rows(b: Builder, free: Sequence[int]) -> None:
    """A needed value is kept, recomputed or offloaded. Residuals are always needed; other values
    are needed when a consumer is recomputed."""
    graph = b.graph
    for i in free:
        cover = {b.var[("s", i)]: 1.0, b.var[("r", i)]: 1.0}
        if b.allow_offload:
            cover[b.var[("o", i)]] = 1.0
        if graph.is_residual[i]:
            b.add(cover, lo=1.0)
        else:
            for w in rc_consumers(graph, i, graph.values[i].block):
                row = dict(cover)
                add_term(row, b.var[("r", w)], -1.0)
                b.add(row, lo=0.0)


def _group_rows(b: Builder, bound: BoundConstraints, free: set[int]) -> None:
    """Outputs of one op share a fate: no member is recomputed while another is kept or offloaded
    (r_u + s_v + o_v <= 1). A member nothing needs takes no variable at the optimum, so it is free."""
    for g in bound.groups:
        if not all(u in free for u in g):
            continue  # a group of another block than those planned here
        for u in g:
            for v in g:
                if u != v:
                    row = {b.var[("r", u)]: 1.0, b.var[("s", v)]: 1.0}
                    if b.allow_offload:
                        row[b.var[("o", v)]] = 1.0
                    b.add(row, hi=1.0)


def _matrix(b: Builder) -> tuple[Any, np.ndarray, np.ndarray]:
    """The constraint matrix (CSR, None without rows) and its row bounds."""
    rows, cols, data, lo, hi = [], [], [], [], []
    for r, (coefs, rlo, rhi) in enumerate(b.rows):
        for j, c in coefs.items():
            rows.append(r)
            cols.append(j)
            data.append(c)
        lo.append(rlo)
        hi.append(rhi)
    if not b.rows:
        return None, np.array(lo, dtype=float), np.array(hi, dtype=float)
    a = coo_matrix((data, (rows, cols)), shape=(len(b.rows), b.num_vars)).tocsr()
    return a, np.array(lo, dtype=float), np.array(hi, dtype=float)


def _highs(b: Builder, cost: np.ndarray, matrix: Any, lo: np.ndarray, hi: np.ndarray, time_limit: float) -> Any:
    constraints = [] if matrix is None else [LinearConstraint(matrix, lo, hi)]
    return milp(
        cost,
        constraints=constraints,
        integrality=np.array(b.integral),
        bounds=Bounds(np.zeros(b.num_vars), np.array(b.upper)),
        options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True},
    )


def _kept_expr(b: Builder, blk: int, size: list[int]) -> tuple[dict[int, float], float]:
    g = b.graph
    expr: dict[int, float] = {}
    const = 0.0
    for i in g.block_members[blk]:
        if g.is_forced[i]:
            const += size[i]
        else:
            add_term(expr, b.var[("s", i)], size[i])
    return expr, const


def _prefix_vars(b: Builder, whole: bool, size: list[int]) -> dict[int, int]:
    """Continuous variables P_blk = bytes kept by blocks before blk (whole-graph programs only)."""
    if not whole:
        return {}
    g = b.graph
    upper = float(sum(size)) + 1.0
    out: dict[int, int] = {}
    prev = None
    for blk in range(g.num_blocks):
        p = b.new_var(("P", blk), False, upper)
        out[blk] = p
        row = {p: 1.0}
        if prev is not None:
            expr, const = _kept_expr(b, blk - 1, size)
            add_term(row, out[prev], -1.0)
            for j, c in expr.items():
                add_term(row, j, -c)
            b.add(row, lo=const, hi=const)
        else:
            b.add(row, lo=0.0, hi=0.0)
        prev = blk
    return out
