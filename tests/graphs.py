"""Small random cost graphs and a brute-force oracle for solver tests."""

from __future__ import annotations

import itertools
import random

from remat_kit import CostGraph, value
from remat_kit._core.simulate import _OFFLOAD, _RECOMPUTE, _SAVE, _run

KINDS = ["matmul", "elementwise", "rng", "view", "attention", "norm"]


def random_chain(seed: int, *, num_blocks: int | None = None, per_block: int | None = None) -> CostGraph:
    """A chain of blocks; inside each a random DAG over the block input and earlier values.

    Random sizes (zeros included), FLOPs, what each backward reads (inputs, itself, nothing),
    ops that need no gradient, and block outputs consumed by the next block.
    """
    rng = random.Random(seed)
    num_blocks = num_blocks or rng.randint(1, 3)
    per_block = per_block or rng.randint(2, 3)
    vals = [value("x", rng.randint(1, 50), role="input"), value("w", 10, role="param")]
    prev = "x"
    for b in range(num_blocks):
        local = [prev]
        for k in range(per_block):
            deps = rng.sample(local, min(len(local), rng.randint(1, 2)))
            if rng.random() < 0.4:
                deps.append("w")
            name = f"b{b}.v{k}"
            reads = [d for d in deps if rng.random() < 0.7] + ([name] if rng.random() < 0.3 else [])
            kind = rng.choice(KINDS)
            vals.append(value(
                name, rng.choice([0, rng.randint(1, 100)]), kind=kind, flops=rng.randint(0, 1000),
                bytes_moved=rng.randint(0, 200), deps=deps, bwd_reads=reads, block=b,
                module=f"layer{b}.{kind}",
            ))
            local.append(name)
        out = f"b{b}.out"
        deps = [local[-1]] + ([local[0]] if rng.random() < 0.5 else [])
        vals.append(value(out, rng.randint(1, 50), kind="elementwise", flops=rng.randint(0, 100),
                          deps=deps, bwd_reads=[d for d in deps if rng.random() < 0.3], block=b))
        prev = out
    vals.append(value("loss", 4, kind="reduction", deps=[prev], bwd_reads=[], block=num_blocks - 1))
    return CostGraph(vals)


def all_codes(graph: CostGraph, *, offload: bool = False):
    choices = [_SAVE, _RECOMPUTE] + ([_OFFLOAD] if offload else [])
    free = list(graph.free_values)
    for combo in itertools.product(choices, repeat=len(free)):
        codes = [_SAVE] * len(graph)
        for i, c in zip(free, combo):
            codes[i] = c
        yield codes


def brute_force(graph: CostGraph, limit: int, costs, *, offload: bool = False):
    """(least (cost, ops), codes) over every plan whose simulated peak fits, or None."""
    best = None
    for codes in all_codes(graph, offload=offload):
        if _run(graph, codes, False)[0] <= limit:
            c = costs.of(codes)
            if best is None or c < best[0]:
                best = (c, codes)
    return best


def brute_min_peak(graph: CostGraph, *, offload: bool = False) -> int:
    return min(_run(graph, codes, False)[0] for codes in all_codes(graph, offload=offload))
