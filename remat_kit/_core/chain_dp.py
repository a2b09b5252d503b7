"""Exact dynamic program over a chain of blocks, each with a menu of options.

The simulator's memory decomposes over blocks (see simulate.py): at every moment of block b,

    memory = sum(kept_bytes[j] for j < b) + local_b(moment),

where kept_bytes[j] depends only on block j's option and local_b only on block b's option
(boundaries are always kept, and everything a later block holds is released before block b's
backward). So the peak is max_b (P_b + L_b(o_b)) with P_b the running sum of kept bytes, and a
forward DP over the running sum P finds the least-cost options whose peak fits the limit. This is
rotor's DP (Beaumont et al., "Optimal checkpointing for heterogeneous chains", 2019) with block
options in place of per-stage checkpoint choices; it is exact over the given menus (tested
against brute force). Menus come from the op-level program (milp.py) at several caps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from remat_kit._core.graph import CostGraph
from remat_kit._core.simulate import _OFFLOAD, _RECOMPUTE, _SAVE, _run

MAX_STATES = 20_000  # states per block before kept sizes are rounded up (then no longer exact)


@dataclasses.dataclass(frozen=True)
class BlockOption:
    label: str
    codes: tuple[tuple[int, int], ...]  # (value index, decision code) for the block's free values
    kept_bytes: int  # K: what the block holds from its forward to its backward
    local_peak: int  # L: its peak above the bytes earlier blocks keep
    cost: int  # integer cost units (picoseconds of roofline time)
    num_ops: int


def measure_option(graph: CostGraph, block: int, codes: dict[int, int], unit_cost: Callable[[list[int]], tuple[int, int]], label: str) -> BlockOption:
    """K and L of one block option, read off the simulator with every other block kept."""
    full = [_SAVE] * len(graph)
    for i, c in codes.items():
        full[i] = c
    peak_of_block, kept_by_block = _block_peaks(graph, full, block)
    prefix = sum(kept_by_block[:block])
    cost, num_ops = unit_cost(full)
    return BlockOption(
        label=label,
        codes=tuple(sorted((i, c) for i, c in codes.items() if c != _SAVE)),
        kept_bytes=kept_by_block[block],
        local_peak=peak_of_block - prefix,
        cost=cost,
        num_ops=num_ops,
    )


def _block_peaks(graph: CostGraph, codes: list[int], block: int) -> tuple[int, list[int]]:
    _, _, kept, trace = _run(graph, codes, True)
    peak = max((mem for _, b, mem in trace if b == block), default=0)
    return peak, kept


def solve_chain(options: Sequence[Sequence[BlockOption]], limit: int) -> tuple[list[int], int, int, int] | None:
    """Least (cost, num_ops) choice of one option per block with max_b (P_b + L_b) <= limit.

    Returns (option index per block, cost, num_ops, predicted peak) or None when nothing fits.
    """
    # state: P -> (cost, num_ops, peak so far); back[b][P] = (previous P, option index)
    states: dict[int, tuple[int, int, int]] = {0: (0, 0, 0)}
    back: list[dict[int, tuple[int, int]]] = []
    for menu in options:
        nxt: dict[int, tuple[int, int, int]] = {}
        ptr: dict[int, tuple[int, int]] = {}
        for p, (cost, ops, peak) in states.items():
            for k, o in enumerate(menu):
                here = p + o.local_peak
                if here > limit:
                    continue
                q = p + o.kept_bytes
                cand = (cost + o.cost, ops + o.num_ops, max(peak, here))
                if q not in nxt or cand < nxt[q]:
                    nxt[q] = cand
                    ptr[q] = (p, k)
        nxt, ptr = _prune(nxt, ptr)
        if not nxt:
            return None
        states = nxt
        back.append(ptr)
    best_p = min(states, key=lambda p: states[p])
    cost, ops, peak = states[best_p]
    choice = []
    p = best_p
    for ptr in reversed(back):
        p, k = ptr[p]
        choice.append(k)
    return choice[::-1], cost, ops, peak


def _prune(states: dict[int, tuple[int, int, int]], ptr: dict[int, tuple[int, int]]):
    """Drop states with more kept bytes and no better (cost, ops) than a smaller one."""
    kept: dict[int, tuple[int, int, int]] = {}
    best = None
    for p in sorted(states):
        key = states[p][:2]
        if best is None or key < best:
            kept[p] = states[p]
            best = key
    if len(kept) > MAX_STATES:
        raise RuntimeError(
            f"chain DP: {len(kept)} states in one block (max {MAX_STATES}); the blocks are too "
            "heterogeneous for the exact DP. Use solver='greedy', or coarser blocks."
        )
    return kept, {p: ptr[p] for p in kept}


def min_peak(options: Sequence[Sequence[BlockOption]]) -> int:
    """The smallest peak any choice of options reaches (min over choices of max_b P_b + L_b)."""
    states: dict[int, int] = {0: 0}  # P -> least peak so far
    for menu in options:
        nxt: dict[int, int] = {}
        for p, peak in states.items():
            for o in menu:
                q, cand = p + o.kept_bytes, max(peak, p + o.local_peak)
                if cand < nxt.get(q, cand + 1):
                    nxt[q] = cand
        pruned, best = {}, None
        for q in sorted(nxt):
            if best is None or nxt[q] < best:
                pruned[q] = best = nxt[q]
        states = pruned
    return min(states.values())


def block_signature(graph: CostGraph, block: int) -> tuple:
    """Blocks with equal signatures have equal option menus (relative to their positions)."""
    members = graph.block_members[block]
    if not members:
        return ("empty",)
    base = members[0]
    vals = graph.values

    def rel(name: str) -> object:
        j = graph.index(name)
        return ("in", vals[j].num_bytes, vals[j].role.value) if j < base or not vals[j].is_activation else j - base

    rows = []
    for i in members:
        v = vals[i]
        rows.append((
            v.num_bytes, v.flops, v.bytes_moved, v.kind.value, graph.gets_grad[i], graph.is_forced[i],
            graph.is_residual[i], tuple(rel(d) for d in v.deps), tuple(rel(d) for d in v.bwd_reads),
            tuple(sorted({vals[c].block - block for c in (*graph.consumers[i], *graph.bwd_readers[i])})),
        ))
    return tuple(rows)


__all__ = ["BlockOption", "measure_option", "solve_chain", "min_peak", "block_signature", "_RECOMPUTE", "_OFFLOAD"]
