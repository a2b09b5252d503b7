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
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from remat_kit._core.graph import CostGraph, Role, Value
from remat_kit._core.simulate import _SAVE, _run

MAX_STATES = 20_000  # states per block boundary before the cheapest per range of kept bytes are kept (_thin)


@dataclasses.dataclass(frozen=True)
class BlockOption:
    label: str
    codes: tuple[tuple[int, int], ...]  # (value index, decision code) for the block's free values
    kept_bytes: int  # K: what the block holds from its forward to its backward
    local_peak: int  # L: its peak above the bytes earlier blocks keep, at its position
    cost: int  # integer cost units (picoseconds of roofline time)
    num_ops: int
    span: int = 1  # blocks it covers: > 1 is a segment of blocks checkpointed as one (rotor, √n)
    # L's two parts, without the gradient seeds of earlier blocks' outputs (which depend on the
    # position, not the option): L = max(forward_peak, backward_peak + those seeds).
    forward_peak: int = 0
    backward_peak: int = 0

    def at(self, graph: CostGraph, block: int, shift: int = 0) -> BlockOption:
        """The same option for an identical block at `block`, value indices moved by `shift`."""
        seeds = _window_index(graph)[1][block]
        return dataclasses.replace(
            self,
            codes=tuple((i + shift, c) for i, c in self.codes),
            local_peak=max(self.forward_peak, self.backward_peak + seeds),
        )


def measure_option(
    graph: CostGraph,
    block: int,
    codes: dict[int, int],
    unit_cost: Callable[[Mapping[int, int]], tuple[int, int]],
    label: str,
    *,
    last: int | None = None,
    windowed: bool = True,
) -> BlockOption:
    """K and L of one block option (or of blocks block..last merged into one segment), read off
    the simulator with every other block kept.

    By the decomposition, only the block and its neighbours matter; `windowed` simulates just
    them (the same numbers, tested, at a fraction of the cost on long chains).
    """
    last = block if last is None else last
    cost, num_ops = unit_cost(codes)
    if windowed:
        win = window(graph, block, last)
        sub_codes = [_SAVE] * len(win.graph)
        for i, c in codes.items():
            sub_codes[win.index_map[i]] = c
        local = block - win.offset
        forward, backward, kept_by_block = _block_peaks(win.graph, sub_codes, local)
        seeds_in_trace = _window_index(graph)[1][block] - win.earlier_seed_bytes  # the window's earlier blocks'
    else:
        full = [_SAVE] * len(graph)
        for i, c in codes.items():
            full[i] = c
        merged = (
            graph
            if last == block
            else graph.regroup(
                [[n] for n in graph.block_names[:block]]
                + [list(graph.block_names[block : last + 1])]
                + [[n] for n in graph.block_names[last + 1 :]]
            )
        )
        forward, backward, kept_by_block = _block_peaks(merged, full, block)
        local = block
        seeds_in_trace = _window_index(graph)[1][block]
    prefix = sum(kept_by_block[:local])
    option = BlockOption(
        label=label,
        codes=tuple(sorted((i, c) for i, c in codes.items() if c != _SAVE)),
        kept_bytes=kept_by_block[local],
        local_peak=0,
        cost=cost,
        num_ops=num_ops,
        span=last - block + 1,
        forward_peak=forward - prefix,
        backward_peak=backward - prefix - seeds_in_trace,
    )
    return option.at(graph, block)


@dataclasses.dataclass(frozen=True)
class Window:
    graph: CostGraph  # the blocks that touch one block, as a graph of their own
    offset: int  # index of its first block in the whole graph
    index_map: dict[int, int]  # whole-graph value index -> window index
    earlier_seed_bytes: int  # gradient seeds of outputs in blocks before the window (left out of it)


def window(graph: CostGraph, block: int, last: int | None = None) -> Window:
    """The blocks that touch `block` (what it reads, what reads it, what skips over it); with
    `last`, blocks block..last merged into one segment and the blocks that touch any of them.

    Activations of earlier blocks that the window reads become inputs (constants); later blocks
    are dropped. The block's local memory is the same in its window as in the whole graph,
    once the gradient seeds of outputs before the window (`earlier_seed_bytes`, which the window
    leaves out because they depend on the position, not the block) are added to its backward.
    """
    last = block if last is None else last
    key = ("window", block, last)
    if key in graph._cache:
        return graph._cache[key]
    vals = graph.values
    lo_of, seeds_before = _window_index(graph)
    touched = {block, last, *(lo_of[b] for b in range(block, last + 1))}
    for i in (i for b in range(block, last + 1) for i in graph.block_members[b]):
        for d in (*vals[i].deps, *vals[i].bwd_reads):
            j = graph.index(d)
            if vals[j].is_activation:
                touched.add(vals[j].block)
                touched.update(vals[r].block for r in graph.bwd_readers[j])
    lo, hi = min(touched), last
    for b in range(lo, last + 1):
        for u in graph.block_members[b]:
            hi = max([hi, *(vals[c].block for c in (*graph.consumers[u], *graph.bwd_readers[u]))])
    inside = [i for b in range(lo, hi + 1) for i in graph.block_members[b]]
    referenced = {graph.index(d) for i in inside for d in (*vals[i].deps, *vals[i].bwd_reads, *vals[i].holds)}
    chosen = sorted(set(inside) | referenced)
    keep: list[Value] = []
    index_map: dict[int, int] = {}
    to_sink: list[str] = []
    for i in chosen:
        v = vals[i]
        if v.is_activation and v.block < lo:
            v = _replace(v, role=Role.INPUT, deps=(), bwd_reads=(), holds=(), block=0)
        elif v.is_activation:
            # Gradients flow as in the whole graph: what gets none there gets none here, and what
            # gets one from beyond the window gets it from a zero-byte sink in a block of its own.
            # Outputs of the window's earlier blocks stay seeded here: un-seeding one would take the
            # gradient from the values it is computed from, and with it the backward ops whose reads
            # keep them alive (a shared value read by its own backward was freed early).
            merged = min(v.block, block) if v.block <= last else v.block - (last - block)
            v = _replace(v, block=merged - lo, requires_grad=graph.gets_grad[i])
            if graph.gets_grad[i] and any(vals[c].block > hi and graph.gets_grad[c] for c in graph.consumers[i]):
                to_sink.append(v.name)
        index_map[i] = len(keep)
        keep.append(v)
    names = [
        *graph.block_names[lo:block],
        "+".join(graph.block_names[block : last + 1]),
        *graph.block_names[last + 1 : hi + 1],
    ]
    if to_sink:
        keep.append(Value("__window_sink__", 0, deps=tuple(to_sink), block=len(names)))
        names.append("__window_sink__")
    graph._cache[key] = Window(CostGraph(keep, block_names=names), lo, index_map, seeds_before[lo])
    return graph._cache[key]


def _replace(v: Value, **changes) -> Value:
    """`dataclasses.replace` without its per-call field introspection (windows copy thousands of
    values); Value is a plain frozen dataclass, so its state is its __dict__."""
    new = object.__new__(Value)
    new.__dict__.update(v.__dict__, **changes)
    return new


def _window_index(graph: CostGraph) -> tuple[list[int], list[int]]:
    """Per block: the first block with a value that skips over it into a later block; and the
    bytes of gradient seeds of outputs in the blocks before it."""
    key = "window_index"
    if key not in graph._cache:
        vals = graph.values
        lo_of = list(range(graph.num_blocks))
        seeds = [0] * (graph.num_blocks + 1)
        for u in graph.activations:
            b = vals[u].block
            last = max([b, *(vals[c].block for c in (*graph.consumers[u], *graph.bwd_readers[u]))])
            for k in range(b + 2, last + 1):  # b + 1 reads it directly: already in its window
                lo_of[k] = min(lo_of[k], b)
            if graph.is_output[u] and graph.gets_grad[u]:
                seeds[b + 1] += vals[u].num_bytes
        for b in range(graph.num_blocks):
            seeds[b + 1] += seeds[b]
        graph._cache[key] = (lo_of, seeds)
    return graph._cache[key]


def _block_peaks(graph: CostGraph, codes: list[int], block: int) -> tuple[int, int, list[int]]:
    """(forward peak, backward peak) over the moments of `block`, and bytes kept per block."""
    _, _, kept, peaks = _run(graph, codes, "raw", hold_shared=True)
    forward, backward = peaks[block]
    return forward, backward, kept


def solve_chain(
    options: Sequence[Sequence[BlockOption]], limit: int
) -> tuple[list[tuple[int, int]], int, int, int] | None:
    """Least (cost, num_ops) path of options over the chain with max_b (P_b + L_b) <= limit.

    `options[b]` are the options starting at block b (a segment option covers `span` blocks).
    Returns ([(start block, option index), ...], cost, num_ops, predicted peak) or None when
    nothing fits. States at each block boundary are kept bytes P with their best (cost, ops); a
    state with more kept bytes and no better (cost, ops) than another can never win and is
    pruned. Vectorized with numpy.
    """
    num_blocks = len(options)
    zero = np.zeros(1, dtype=np.int64)
    # Columns: kept bytes, cost, ops, peak so far, parent block, parent state, option index.
    pending: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(num_blocks + 1)]
    pending[0].append((zero, zero, zero, zero, zero - 1, zero - 1, zero - 1))
    back: list[tuple[np.ndarray, ...] | None] = [None] * (num_blocks + 1)
    for pos in range(num_blocks + 1):
        if not pending[pos]:
            continue
        cols = _prune([np.concatenate(col) for col in zip(*pending[pos])])
        pending[pos] = []
        p, cost, ops, peak = cols[:4]
        back[pos] = tuple(cols[4:])
        if pos == num_blocks:
            break
        for k, o in enumerate(options[pos]):
            ok = np.nonzero(p + o.local_peak <= limit)[0]
            if ok.size and pos + o.span <= num_blocks:
                pending[pos + o.span].append(
                    (
                        p[ok] + o.kept_bytes,
                        cost[ok] + o.cost,
                        ops[ok] + o.num_ops,
                        np.maximum(peak[ok], p[ok] + o.local_peak),
                        np.full(ok.size, pos),
                        ok,
                        np.full(ok.size, k),
                    )
                )
    if back[num_blocks] is None:
        return None
    best = int(np.lexsort((ops, cost))[0])
    return (_path(back, num_blocks, best), int(cost[best]), int(ops[best]), int(peak[best]))


def _prune(cols: list[np.ndarray]) -> list[np.ndarray]:
    """The states at one block boundary sorted by kept bytes, without those another state beats
    (no more kept bytes and a better (cost, ops)), thinned to MAX_STATES."""
    p, cost, ops, peak = cols[:4]
    rank = _combined_rank(cost, ops)  # one integer ordered as (cost, ops)
    order = np.lexsort((peak, rank, p))
    cols = [c[order] for c in cols]
    rank = rank[order]
    running = np.minimum.accumulate(rank)
    keep = np.ones(rank.size, dtype=bool)
    keep[1:] = rank[1:] < running[:-1]
    cols = [c[keep] for c in cols]
    return _thin(cols) if cols[0].size > MAX_STATES else cols


def _path(back: list[tuple[np.ndarray, ...] | None], num_blocks: int, best: int) -> list[tuple[int, int]]:
    """[(start block, option index), ...] of the state `best` at the end, by its back-pointers."""
    path, pos, idx = [], num_blocks, best
    while pos > 0:
        step = back[pos]
        if step is None:  # every position on a path from the end was reached
            raise RuntimeError(f"chain DP: no back-pointer at block {pos}; this is a remat_kit bug")
        parent_pos, parent, ks = step
        path.append((int(parent_pos[idx]), int(ks[idx])))
        pos, idx = int(parent_pos[idx]), int(parent[idx])
    return path[::-1]


def _thin(cols: list[np.ndarray]) -> list[np.ndarray]:
    """At most MAX_STATES states (sorted by kept bytes, cheapest first among equals): the
    cheapest state in each of MAX_STATES equal ranges of kept bytes. The states kept keep their
    exact kept bytes, so every peak check stays exact and a path found still fits; only paths
    through a dropped state are lost (the DP is then no longer exact over its menus)."""
    p, cost, ops = cols[:3]
    lo, hi = int(p[0]), int(p[-1])
    bucket = (p - lo) * (MAX_STATES - 1) // max(hi - lo, 1)
    best = np.lexsort((ops, cost, bucket))  # by bucket, then cheapest
    first = np.ones(best.size, dtype=bool)
    first[1:] = bucket[best][1:] != bucket[best][:-1]
    keep = np.sort(best[first])  # back in kept-bytes order
    return [c[keep] for c in cols]


def _combined_rank(cost: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """cost * (max ops + 1) + ops where that fits in int64 (it orders like (cost, ops)), else the
    dense lexicographic rank (a sort more)."""
    span = int(ops.max()) + 1 if ops.size else 1
    if not cost.size or int(cost.max()) < (2**62) // span:
        return cost * span + ops
    return _dense_rank(cost, ops)


def _dense_rank(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Rank of each (major, minor) pair in lexicographic order; equal pairs share a rank."""
    order = np.lexsort((minor, major))
    a, b = major[order], minor[order]
    new = np.ones(a.size, dtype=np.int64)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    rank = np.empty(a.size, dtype=np.int64)
    rank[order] = np.cumsum(new)
    return rank


def min_peak(options: Sequence[Sequence[BlockOption]]) -> int:
    """The smallest peak any path of options reaches (min over paths of max_b P_b + L_b)."""
    num_blocks = len(options)
    pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(num_blocks + 1)]
    pending[0].append((np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)))
    for pos in range(num_blocks + 1):
        if not pending[pos]:
            continue  # no path stops here (a block inside every segment that covers it)
        p, peak = (np.concatenate(col) for col in zip(*pending[pos]))
        order = np.lexsort((peak, p))
        p, peak = p[order], peak[order]
        running = np.minimum.accumulate(peak)
        keep = np.ones(p.size, dtype=bool)
        keep[1:] = peak[1:] < running[:-1]
        p, peak = p[keep], peak[keep]
        if pos == num_blocks:
            return int(peak.min())
        for o in options[pos]:
            if pos + o.span <= num_blocks:
                pending[pos + o.span].append((p + o.kept_bytes, np.maximum(peak, p + o.local_peak)))
    raise AssertionError("unreachable: no path of options covers the chain")


def block_signature(graph: CostGraph, block: int) -> tuple:
    """Blocks with equal signatures have equal option menus (relative to their positions)."""
    members = graph.block_members[block]
    if not members:
        return ("empty",)
    base = members[0]
    vals = graph.values

    def rel(name: str) -> object:
        j = graph.index(name)
        if j >= base and vals[j].is_activation:
            return j - base
        if not vals[j].is_activation:
            return ("in", vals[j].num_bytes, vals[j].role.value)
        # An earlier block's value read here. Where its life and its gradient's life end depends
        # on the position (a mask or rotary table read by every layer is released only in the
        # first layer's backward; a shared input's gradient is allocated in the last layer's).
        producer = vals[j].block
        readers = [vals[c].block for c in (*graph.consumers[j], *graph.bwd_readers[j]) if vals[c].block > producer]
        alive_after = min(readers, default=block) < block or any(vals[r].block < block for r in graph.bwd_readers[j])
        grad_from = [vals[c].block for c in graph.consumers[j] if graph.gets_grad[c]]
        grad = (
            "none"
            if not graph.gets_grad[j]
            else (
                "here"
                if max(grad_from, default=-1) == block
                else ("alive" if max(grad_from, default=-1) > block else "later")
            )
        )
        return ("in", vals[j].num_bytes, vals[j].role.value, alive_after, grad)

    rows = []
    for i in members:
        v = vals[i]
        rows.append(
            (
                v.num_bytes,
                v.flops,
                v.bytes_moved,
                v.kind.value,
                graph.gets_grad[i],
                graph.is_forced[i],
                graph.is_residual[i],
                tuple(rel(d) for d in v.deps),
                tuple(rel(d) for d in v.bwd_reads),
                tuple(rel(d) for d in v.holds),
                tuple(sorted({vals[c].block - block for c in (*graph.consumers[i], *graph.bwd_readers[i])})),
            )
        )
    return tuple(rows)
