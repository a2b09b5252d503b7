"""Block menus without the op-level program: a ladder of recompute sets, each priced by the simulator.

The op-level 0-1 program (milp.py) gives each block the least-recompute option under several
kept-bytes caps; that is worth its ~20 ms per program where blocks repeat (one menu serves every
identical layer) but not on a chain of hundreds of distinct blocks, nor on a block too big for the
program. There the menu is this ladder: recompute the values that are cheapest to recompute per
byte first, in growing prefixes, plus the two stock selective plans (save only matmul outputs;
save matmul and attention-core outputs). Every rung is measured by the simulator like any option,
so the chain DP's answer still fits the limit exactly; only the least-recompute claim becomes
"least over these menus" (figures against the op-level menus: reports/planning_speed.md).
"""

from __future__ import annotations

from collections.abc import Callable

from remat_kit._core.graph import CostGraph, OpKind
from remat_kit._core.simulate import _RECOMPUTE

NUM_RUNGS = 10  # prefixes of the cheapest-per-byte order, evenly spaced in the bytes they drop
_SAVED_BY_PRESET = (
    ("save matmuls", frozenset({OpKind.MATMUL})),
    ("save matmuls and attention", frozenset({OpKind.MATMUL, OpKind.ATTENTION})),
)


def ladder(
    graph: CostGraph, blocks: range, recompute_cost: list[int], is_free: Callable[[int], bool]
) -> list[tuple[dict[int, int], str]]:
    """Recompute sets over the values of `blocks` (one block, or a segment's blocks) that
    `is_free`, as {value index: RECOMPUTE} with a label; keep-all and full recompute excluded
    (callers add them)."""
    vals = graph.values
    free = [i for b in blocks for i in graph.block_members[b] if is_free(i)]
    if not free:
        return []
    out: list[tuple[dict[int, int], str]] = []
    for label, saved in _SAVED_BY_PRESET:
        chosen = {i: _RECOMPUTE for i in free if vals[i].kind not in saved}
        if 0 < len(chosen) < len(free):
            out.append((chosen, label))
    # Cheapest per byte first; values of no bytes last (recomputing them saves nothing by
    # itself, but a recomputed consumer needs them: the prefix that drops its consumer takes them
    # in once the budget pushes that far).
    order = sorted(free, key=lambda i: (vals[i].num_bytes == 0, recompute_cost[i] / max(vals[i].num_bytes, 1), i))
    total = sum(vals[i].num_bytes for i in order) or 1
    taken, dropped, rung = 0, 0, 1
    for i in order:
        dropped += vals[i].num_bytes
        taken += 1
        if rung < NUM_RUNGS and dropped * NUM_RUNGS >= rung * total and taken < len(order):
            out.append(({j: _RECOMPUTE for j in order[:taken]}, f"cheapest {taken} of {len(order)} recomputed"))
        while rung < NUM_RUNGS and dropped * NUM_RUNGS >= rung * total:
            rung += 1
    return out
