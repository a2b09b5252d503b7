"""Plans that recompute some layers whole and keep the rest, the family `jax.checkpoint` on a
subset of layers gives: searched on unrolled chains where the cost model's plans miss.

On an unrolled chain XLA can rebuild cheap residuals of no remat from their operands in the
backward (both passes are one module), which a plan's saved values, behind checkpoint's barriers,
cannot; and it fuses a wholly recomputed layer into that layer's backward, storing none of its
values. So the model's selective plans may compile far over their figures there, while a layer
recomputed whole frees close to what it keeps. Measured (ad hoc, equinox's transformer blocks, 4
layers, d 256, seq 256, batch 2): the model's plans at model fractions 0.70 down to its floor
compiled to 0.94 - 0.73 of no remat, and 1, 2, 3 layers recomputed whole to 0.84, 0.68, 0.52.
`_verify.verified` turns to this family where the model's search finds no plan (that search
stops after its first plan when it misses by more than `_fit.REACH`), before the least-memory
plans (`reports/jax/first_call_outside.md`). The search is over k, the number of layers
recomputed whole in a fixed order (least recompute per byte kept first), so the plans are nested
and their compiled memory falls with k, nearly: XLA's schedule can move it by a little either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from remat_kit._core.plan import Decision, Plan
from remat_kit._core.simulate import simulate
from remat_kit._jax._fit import TOLERANCE, Search, _priced
from remat_kit._jax._graph import Traced

MAX_COMPILES = 3  # plans of this family measured per budget, past the one every block recomputed


def applies(traced: Traced) -> bool:
    """An unrolled chain of at least two blocks (a scan's layers are planned by `_scanplan`)."""
    return not traced.scans and traced.graph.num_blocks >= 2


def order(traced: Traced, search: Search) -> list[int]:
    """The blocks that keep anything in no remat, cheapest recompute per byte kept first."""
    graph = traced.graph
    kept = simulate(graph, Plan.from_decisions(graph, {})).kept_bytes_by_block
    cost = {
        b: _priced(_whole(traced, (b,)), traced, search.model).predicted_recompute_seconds
        for b in range(graph.num_blocks)
    }
    return sorted((b for b in range(graph.num_blocks) if kept[b] > 0), key=lambda b: (cost[b] / kept[b], b))


def _whole(traced: Traced, blocks: tuple[int, ...]) -> Plan:
    graph = traced.graph
    chosen = set(blocks)
    return Plan.from_decisions(
        graph,
        {graph.values[i].name: Decision.RECOMPUTE for i in graph.free_values if graph.values[i].block in chosen},
        solver="whole-layers",
    )


def fit(traced: Traced, search: Search) -> Plan | None:
    """The plan of this family with the fewest layers recomputed whole that compiles within the
    goal, searched from every layer recomputed (the family's least memory; None where even that
    misses) by interpolation on the measured points, kept within the bracket, stopping at a plan in
    the `TOLERANCE` band; at most `MAX_COMPILES` more plans."""
    blocks = order(traced, search)
    if not blocks:
        return None
    plans: dict[int, Plan] = {}

    def plan(k: int) -> Plan:
        if k not in plans:
            plans[k] = _priced(_whole(traced, tuple(blocks[:k])), traced, search.model)
        return plans[k]

    def fraction(k: int) -> float:
        return 1.0 if k == 0 else search.measured(plan(k)) / max(search.none_bytes, 1)

    goal = search.goal_bytes / max(search.none_bytes, 1)
    k = fewest(
        len(blocks),
        fraction,
        lambda k: fraction(k) <= goal and plan(k).activation_fraction <= search.budget_fraction,
        aim=search.aim(),
        low=goal - TOLERANCE,
    )
    return None if k is None else plan(k)


def fewest(
    n: int, fraction: Callable[[int], float], fits: Callable[[int], bool], *, aim: float, low: float
) -> int | None:
    """The fewest of `n` nested choices found to fit, None where all `n` do not: `fraction(k)` the
    compiled fraction with the first k (1.0 at k = 0), falling with k; `fits(k)` whether it is
    kept. From k = n, each next k is where the chord between the largest miss and the smallest fit
    meets `aim`, kept strictly inside them; it stops at a fit of at least `low`, at adjacent miss
    and fit, or after `MAX_COMPILES` more k measured."""
    miss, fit_k = 0, n
    if not fits(fit_k):
        return None
    for _ in range(MAX_COMPILES):
        if fit_k - miss <= 1 or fraction(fit_k) >= low:
            break
        f_miss, f_fit = fraction(miss), fraction(fit_k)
        k = miss + math.ceil((f_miss - aim) / max(f_miss - f_fit, 1e-9) * (fit_k - miss))
        k = min(max(k, miss + 1), fit_k - 1)
        if fits(k):
            fit_k = k
        else:
            miss = k
    return fit_k
