"""Stock remat strategies as functions from a cost graph to a Plan.

They are what users pick by hand today, expressed as plans so that `none`, `full`,
`megatron_selective` and `solve(...)` are compared on equal terms by the same simulator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from remat_kit._core.graph import CostGraph, OpKind
from remat_kit._core.plan import Decision, Plan


def none(graph: CostGraph) -> Plan:
    """No remat: keep every residual."""
    return Plan.from_decisions(graph, {}, solver="none")


def full(graph: CostGraph) -> Plan:
    """Checkpoint every block: keep only block boundaries, recompute everything else."""
    return Plan.from_decisions(
        graph, {graph.values[i].name: Decision.RECOMPUTE for i in graph.free_values}, solver="full"
    )


def every_k(graph: CostGraph, k: int) -> Plan:
    """Checkpoint (fully recompute) every k-th block, keep the others (torch's `checkpoint every k`)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"every_k(k={k!r}): k must be a positive int (1 = every block).")
    return Plan.from_decisions(
        graph,
        {graph.values[i].name: Decision.RECOMPUTE for i in graph.free_values if graph.values[i].block % k == 0},
        solver=f"every_{k}",
    )


def sqrt_n(graph: CostGraph, num_segments: int | None = None) -> Plan:
    """Chen et al. (2016), "Training deep nets with sublinear memory cost": split the chain into
    about √n segments (torch's `checkpoint_sequential`) and keep only the segment boundaries."""
    n = graph.num_blocks
    if num_segments is None:
        num_segments = max(1, round(math.sqrt(n)))
    if not isinstance(num_segments, int) or isinstance(num_segments, bool) or not 1 <= num_segments <= n:
        raise ValueError(f"sqrt_n(num_segments={num_segments!r}): must be an int in [1, {n}] (the number of blocks).")
    bounds = [round(k * n / num_segments) for k in range(num_segments + 1)]
    segments = [graph.block_names[bounds[k] : bounds[k + 1]] for k in range(num_segments)]
    merged = graph.regroup(segments)
    return Plan.from_decisions(
        merged,
        {merged.values[i].name: Decision.RECOMPUTE for i in merged.free_values},
        solver=f"sqrt_n({num_segments})",
    )


def recompute_kinds(graph: CostGraph, kinds: Iterable[OpKind | str], *, label: str = "") -> Plan:
    """Recompute every free value of the given op kinds, keep the rest."""
    wanted = {OpKind(k) for k in kinds}
    return Plan.from_decisions(
        graph,
        {graph.values[i].name: Decision.RECOMPUTE for i in graph.free_values if graph.values[i].kind in wanted},
        solver=label or "recompute:" + ",".join(sorted(k.value for k in wanted)),
    )


def save_only_kinds(graph: CostGraph, kinds: Iterable[OpKind | str], *, label: str = "") -> Plan:
    """Keep only values of the given kinds, recompute the rest (JAX's `dots_saveable` is MATMUL + ATTENTION
    matmuls; `dots_with_no_batch_dims_saveable` is MATMUL alone)."""
    wanted = {OpKind(k) for k in kinds}
    return Plan.from_decisions(
        graph,
        {graph.values[i].name: Decision.RECOMPUTE for i in graph.free_values if graph.values[i].kind not in wanted},
        solver=label or "save:" + ",".join(sorted(k.value for k in wanted)),
    )


def megatron_selective(graph: CostGraph) -> Plan:
    """Korthikanti et al. (2022) selective recompute: the attention core (scores, softmax, its
    dropout) is recomputed; its output and everything else is kept."""
    vals = graph.values
    core = {OpKind.ATTENTION, OpKind.RNG}
    decisions = {}
    for i in graph.free_values:
        v = vals[i]
        consumers = [vals[c] for c in graph.consumers[i]]
        if v.kind in core and consumers and all(c.kind is OpKind.ATTENTION for c in consumers):
            decisions[v.name] = Decision.RECOMPUTE
    return Plan.from_decisions(graph, decisions, solver="megatron_selective")
