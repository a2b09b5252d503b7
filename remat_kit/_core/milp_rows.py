"""The memory rows of the op-level 0-1 program (`milp.py`): one row per moment of the simulator's
schedule (the forward moments; per block: reload, one recompute moment per value, the backward
moments), each bounding the bytes alive then by the memory limit, plus the auxiliaries that keep
a value alive for recomputing its consumers. Their bound moves between solves (`milp.Program`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from remat_kit._core.graph import CostGraph
from remat_kit._core.simulate import shared_with_own_block


class Builder:
    """A 0-1 program under construction: its variables (by key), their bounds and its rows."""

    def __init__(self, graph: CostGraph, blocks: Sequence[int], allow_offload: bool, limited: bool):
        self.graph = graph
        self.blocks = tuple(blocks)
        self.allow_offload = allow_offload
        self.limited = limited  # whether memory rows are built (their bound moves: `Program.solve`)
        self.num_vars = 0
        self.var: dict[tuple[str, int], int] = {}
        self.integral: list[int] = []
        self.upper: list[float] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []  # (coefs, lo, hi)
        self.limit_rows: list[tuple[int, float]] = []  # (row, constant): hi = limit - constant

    def new_var(self, key: tuple[str, int], integral: bool, upper: float = 1.0) -> int:
        j = self.num_vars
        self.var[key] = j
        self.num_vars += 1
        self.integral.append(1 if integral else 0)
        self.upper.append(upper)
        return j

    def add(self, coefs: dict[int, float], lo: float = -np.inf, hi: float = np.inf) -> None:
        self.rows.append((coefs, lo, hi))


def add_term(expr: dict[int, float], j: int, c: float) -> None:
    if c:
        expr[j] = expr.get(j, 0.0) + c


def _limit_row(b: Builder, expr: dict[int, float], const: float, prefix: int | None) -> None:
    """A memory row, its bound (the limit less `const`) set per solve; none in an unlimited program."""
    if not b.limited:
        return
    if prefix is not None:
        add_term(expr, prefix, 1.0)
    b.limit_rows.append((len(b.rows), const))
    b.add(expr, hi=np.inf)


def forward_rows(b: Builder, blk: int, size: list[int], prefix: int | None) -> None:
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
            elif g.is_residual[u] or rc_consumers(g, u, blk):
                add_term(expr, b.var[("s", u)], size[u])
        _limit_row(b, expr, const, prefix)


def rc_consumers(g: CostGraph, u: int, blk: int) -> list[int]:
    """Consumers of u in block `blk` that a plan may recompute."""
    return [w for w in g.consumers[u] if g.values[w].block == blk and not g.is_forced[w]]


def _pseudo_block(g: CostGraph, u: int) -> int:
    """The block whose backward start a kept value must survive to (see simulate)."""
    own = g.values[u].block
    later = [g.values[c].block for c in (*g.consumers[u], *g.bwd_readers[u]) if g.values[c].block > own]
    return min(later, default=own)


def backward_rows(b: Builder, blk: int, size: list[int], prefix: int | None, backward_bytes: int = 0) -> None:
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
            rc_consumers(g, u, blk),
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
                    add_term(expr, b.var[("s", u)], size[u])
                    if b.allow_offload:
                        add_term(expr, b.var[("o", u)], size[u])
                else:
                    const += size[u]
                continue
            later = [w for w in consumers if m == 0 or (t_rc is not None and m <= n and pos[w] >= pos[t_rc])]
            _alive_for_recompute(b, expr, u, size[u], later, free_u and t_rc == u, before_own)
        _limit_row(b, expr, const, prefix)


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
    b: Builder, expr: dict[int, float], u: int, size: int, later: list[int], own_rc: bool, before_own: bool
) -> None:
    """`u`'s bytes at a moment where only the plan keeps it alive: an auxiliary a >= r_w for each
    consumer w recomputed at or after the moment (and >= r_u at its own recompute)."""
    if not later and not own_rc:
        return
    a = b.new_var(("a", b.num_vars), False)
    add_term(expr, a, size)
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
