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
from remat_kit._core.simulate import shared_with_own_block

MAX_VARIABLES = 60_000  # beyond this HiGHS takes minutes; the chain DP is the tool for big graphs


@dataclasses.dataclass(frozen=True)
class MilpResult:
    keep: frozenset[int]
    recompute: frozenset[int]
    offload: frozenset[int]
    objective: float
    optimal: bool = True  # False: HiGHS stopped at its time limit with this incumbent


class _Builder:
    def __init__(self, graph: CostGraph, blocks: Sequence[int], allow_offload: bool):
        self.graph = graph
        self.blocks = tuple(blocks)
        self.allow_offload = allow_offload
        self.num_vars = 0
        self.var: dict[tuple[str, int], int] = {}
        self.integral: list[int] = []
        self.upper: list[float] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []  # (coefs, lo, hi)

    def new_var(self, key: tuple[str, int], integral: bool, upper: float = 1.0) -> int:
        j = self.num_vars
        self.var[key] = j
        self.num_vars += 1
        self.integral.append(1 if integral else 0)
        self.upper.append(upper)
        return j

    def add(self, coefs: dict[int, float], lo: float = -np.inf, hi: float = np.inf) -> None:
        self.rows.append((coefs, lo, hi))


def _add(expr: dict[int, float], j: int, c: float) -> None:
    if c:
        expr[j] = expr.get(j, 0.0) + c


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
    plan don't).
    """
    blocks = tuple(range(graph.num_blocks)) if blocks is None else tuple(blocks)
    b = _Builder(graph, blocks, off_cost is not None)
    size = [v.num_bytes for v in graph.values]
    free = [i for blk in blocks for i in graph.block_members[blk] if not graph.is_forced[i]]
    bound = (constraints or NO_CONSTRAINTS).on(graph)
    _decision_vars(b, free, bound)
    cost = _objective(b, free, rec_cost, off_cost)
    _coverage_rows(b, free)
    _group_rows(b, bound, set(free))
    prefix_vars = _prefix_vars(b, len(blocks) == graph.num_blocks, size)
    for blk in blocks:
        _forward_rows(b, blk, size, prefix_vars.get(blk), limit)
        _backward_rows(b, blk, size, prefix_vars.get(blk), limit, backward_bytes)
    _kept_terms(b, size, cost, kept_cap, kept_price)
    if b.num_vars > MAX_VARIABLES:
        raise ValueError(
            f"solver='milp': the program has {b.num_vars} variables (max {MAX_VARIABLES}); use solver='dp' "
            "(per-block programs chained by dynamic programming) for a graph this size."
        )
    res = _highs(b, np.concatenate([cost, np.zeros(b.num_vars - len(cost))]), time_limit)
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
    keep = frozenset(i for i in free if x[b.var[("s", i)]])
    off = frozenset(i for i in free if b.allow_offload and x[b.var[("o", i)]] and i not in keep)
    rec = frozenset(i for i in free if x[b.var[("r", i)]] and i not in keep and i not in off)
    return MilpResult(keep, rec, off, float(res.fun), optimal=res.status == 0)


def _kept_terms(b: _Builder, size: list[int], cost: np.ndarray, kept_cap: int | None, kept_price: float) -> None:
    """The bytes each planned block keeps: at most `kept_cap` (a row per block), and priced at
    `kept_price` per byte in `cost`."""
    if kept_cap is None and not kept_price:
        return
    for blk in b.blocks:
        expr, const = _kept_expr(b, blk, size)
        if kept_cap is not None:
            b.add(expr, hi=kept_cap - const)
        for j, c in expr.items():
            cost[j] += kept_price * c


def _decision_vars(b: _Builder, free: Sequence[int], bound: BoundConstraints) -> None:
    """s, r (and o) per free value; what the constraints forbid is bounded to 0."""
    for i in free:
        b.new_var(("s", i), True, 0.0 if i in bound.recompute else 1.0)
        b.new_var(("r", i), True, 0.0 if i in bound.save else 1.0)
        if b.allow_offload:
            b.new_var(("o", i), True, 0.0 if i in bound.save or i in bound.recompute else 1.0)


def _objective(b: _Builder, free: Sequence[int], rec_cost: Sequence[int], off_cost: Sequence[int] | None) -> np.ndarray:
    cost = np.zeros(b.num_vars)
    # Tie-break: fewer recomputed ops, worth less than one cost unit in total.
    tiny = 1.0 / (len(free) + 2)
    for i in free:
        cost[b.var[("r", i)]] = rec_cost[i] + tiny
        if off_cost is not None:  # exactly when b.allow_offload
            cost[b.var[("o", i)]] = off_cost[i]
    return cost


def _coverage_rows(b: _Builder, free: Sequence[int]) -> None:
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
            for w in _rc_consumers(graph, i, graph.values[i].block):
                row = dict(cover)
                _add(row, b.var[("r", w)], -1.0)
                b.add(row, lo=0.0)


def _group_rows(b: _Builder, bound: BoundConstraints, free: set[int]) -> None:
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


def _highs(b: _Builder, cost: np.ndarray, time_limit: float) -> Any:
    rows, cols, data, lo, hi = [], [], [], [], []
    for r, (coefs, rlo, rhi) in enumerate(b.rows):
        for j, c in coefs.items():
            rows.append(r)
            cols.append(j)
            data.append(c)
        lo.append(rlo)
        hi.append(rhi)
    constraints = []
    if b.rows:
        a = coo_matrix((data, (rows, cols)), shape=(len(b.rows), b.num_vars)).tocsr()
        constraints.append(LinearConstraint(a, np.array(lo), np.array(hi)))
    return milp(
        cost,
        constraints=constraints,
        integrality=np.array(b.integral),
        bounds=Bounds(np.zeros(b.num_vars), np.array(b.upper)),
        options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True},
    )


def _kept_expr(b: _Builder, blk: int, size: list[int]) -> tuple[dict[int, float], float]:
    g = b.graph
    expr: dict[int, float] = {}
    const = 0.0
    for i in g.block_members[blk]:
        if g.is_forced[i]:
            const += size[i]
        else:
            _add(expr, b.var[("s", i)], size[i])
    return expr, const


def _prefix_vars(b: _Builder, whole: bool, size: list[int]) -> dict[int, int]:
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
            _add(row, out[prev], -1.0)
            for j, c in expr.items():
                _add(row, j, -c)
            b.add(row, lo=const, hi=const)
        else:
            b.add(row, lo=0.0, hi=0.0)
        prev = blk
    return out


def _limit_row(b: _Builder, expr: dict[int, float], const: float, prefix: int | None, limit: int | None) -> None:
    if limit is None:
        return
    if prefix is not None:
        _add(expr, prefix, 1.0)
    b.add(expr, hi=limit - const)


def _forward_rows(b: _Builder, blk: int, size: list[int], prefix: int | None, limit: int | None) -> None:
    g = b.graph
    members = g.block_members[blk]
    for t in members:
        # Earlier blocks' values still read here are kept boundaries: they are in the prefix.
        expr: dict[int, float] = {}
        const = 0.0
        for u in members:
            if u > t:
                break
            if g.last_fwd_use[u] >= t or g.is_forced[u]:
                const += size[u]
            elif g.is_residual[u] or _rc_consumers(g, u, blk):
                _add(expr, b.var[("s", u)], size[u])
        _limit_row(b, expr, const, prefix, limit)


def _rc_consumers(g: CostGraph, u: int, blk: int) -> list[int]:
    """Consumers of u in block `blk` that a plan may recompute."""
    return [w for w in g.consumers[u] if g.values[w].block == blk and not g.is_forced[w]]


def _pseudo_block(g: CostGraph, u: int) -> int:
    """The block whose backward start a kept value must survive to (see simulate)."""
    own = g.values[u].block
    later = [g.values[c].block for c in (*g.consumers[u], *g.bwd_readers[u]) if g.values[c].block > own]
    return min(later, default=own)


def _backward_rows(
    b: _Builder, blk: int, size: list[int], prefix: int | None, limit: int | None, backward_bytes: int = 0
) -> None:
    """Rows for the reload, recompute and backward moments of one block, relative to its prefix."""
    g = b.graph
    vals = g.values
    members = g.block_members[blk]
    n = len(members)
    # Moments inside the block: 0 = reload, 1 + k = recompute of members[k],
    # 1 + n + k = backward of members[n - 1 - k]. Moments the simulator skips (nothing to
    # recompute, no gradient) are dominated by the moment before them, so they are harmless.
    bw_moment = {t: 1 + n + k for k, t in enumerate(reversed(members))}
    num_moments = 1 + 2 * n
    inputs = [i for i in g.activations if vals[i].block < blk and g.is_forced[i] and _pseudo_block(g, i) == blk]
    grads = _static_grads(g, blk, num_moments, bw_moment)
    for t in members:  # a backward op's workspace is held at its moment whatever the plan (simulate)
        if g.gets_grad[t]:
            grads[bw_moment[t]] += vals[t].bwd_workspace_bytes
    info = [
        (
            u,
            _static_last(g, u, blk, bw_moment, num_moments),
            _rc_consumers(g, u, blk),
            vals[u].block < blk,
            not g.is_forced[u],
        )
        for u in (*members, *inputs)
    ]
    pos = {t: k for k, t in enumerate(members)}
    for m in range(num_moments):
        t_rc = members[m - 1] if 1 <= m <= n else None
        expr: dict[int, float] = {}
        const = float(grads[m] + backward_bytes)
        for u, last, consumers, is_input, free_u in info:
            # Inputs are counted in the prefix; here only their release (alive - 1) shows.
            if is_input:
                const -= size[u]
            before_own = free_u and (m == 0 or (t_rc is not None and pos[t_rc] < pos[u]))
            if m <= last:
                if before_own:  # a recomputed copy does not exist yet
                    _add(expr, b.var[("s", u)], size[u])
                    if b.allow_offload:
                        _add(expr, b.var[("o", u)], size[u])
                else:
                    const += size[u]
                continue
            later = [w for w in consumers if m == 0 or (t_rc is not None and m <= n and pos[w] >= pos[t_rc])]
            _alive_for_recompute(b, expr, u, size[u], later, free_u and t_rc == u, before_own)
        _limit_row(b, expr, const, prefix, limit)


def _static_last(g: CostGraph, u: int, blk: int, bw_moment: dict[int, int], num_moments: int) -> int:
    """The last moment of block `blk` at which `u` is alive whatever the plan (-1: none;
    `num_moments`: past the block)."""
    vals = g.values
    if vals[u].block < blk and shared_with_own_block(g)[u]:
        return num_moments  # its own block may still need it: counted alive (see simulate.shared_with_own_block)
    last = -1
    for r in g.bwd_readers[u]:
        if vals[r].block == blk:
            last = max(last, bw_moment[r])
        elif vals[r].block < blk:
            return num_moments
    if g.is_forced[u]:
        pseudo = _pseudo_block(g, u)
        if pseudo == blk:
            last = max(last, 0)
        elif pseudo < blk:
            return num_moments
    return last


def _alive_for_recompute(
    b: _Builder, expr: dict[int, float], u: int, size: int, later: list[int], own_rc: bool, before_own: bool
) -> None:
    """`u`'s bytes at a moment where only the plan keeps it alive: an auxiliary a >= r_w for each
    consumer w recomputed at or after the moment (and >= r_u at its own recompute)."""
    if not later and not own_rc:
        return
    a = b.new_var(("a", b.num_vars), False)
    _add(expr, a, size)
    if own_rc:
        b.add({a: 1.0, b.var[("r", u)]: -1.0}, lo=0.0)
    for w in later:
        rw = b.var[("r", w)]
        if before_own:  # alive before its own recompute only if kept or offloaded
            b.add({a: 1.0, rw: -1.0, b.var[("s", u)]: -1.0}, lo=-1.0)
            if b.allow_offload:
                b.add({a: 1.0, rw: -1.0, b.var[("o", u)]: -1.0}, lo=-1.0)
        else:
            b.add({a: 1.0, rw: -1.0}, lo=0.0)


def _static_grads(g: CostGraph, blk: int, num_moments: int, bw_moment: dict[int, int]) -> list[int]:
    """Gradient-buffer bytes alive at each moment of this block (independent of the plan)."""
    vals = g.values
    size = [v.num_bytes for v in vals]
    # grad(u) lives from the backward of u's last consumer (first in backward order) to u's own backward.
    alloc_block_moment: dict[int, tuple[int, int]] = {}
    for u in g.activations:
        if not g.gets_grad[u]:
            continue
        if g.is_output[u]:
            alloc_block_moment[u] = (g.num_blocks, 0)  # seeded before the backward starts
            continue
        cons = [c for c in g.consumers[u] if g.gets_grad[c]]
        c = max(cons)
        alloc_block_moment[u] = (vals[c].block, c)
    out = [0] * num_moments
    for u, (cb, c) in alloc_block_moment.items():
        ub = vals[u].block
        if ub > blk or cb < blk:
            continue  # freed before this block, or allocated after it
        start = 0 if cb > blk else bw_moment[c]
        end = bw_moment[u] if ub == blk else num_moments - 1
        for m in range(start, end + 1):
            out[m] += size[u]
    return out
