"""A per-call budget: what one call of a region keeps for its backward, chosen from its menu.

Where a traced step is one layer that its caller repeats (a decorated layer class in torch, a
function `auto` wraps inside the caller's loop or scan in JAX), remat cannot lower that call's own
peak much: its recompute runs at the start of its own backward. What adds up over the caller's
calls is what each one keeps, so the budget bounds that. Both adapters pick the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from remat_kit._core.budget import Budget
from remat_kit._core.chain_dp import BlockOption


def cheapest_within(menu: Sequence[BlockOption], budget: Budget, keep_all_bytes: int) -> BlockOption | None:
    """The least-cost option of one region's `menu` that keeps at most what `budget` allows per
    call (a fraction of `keep_all_bytes`, what no remat keeps, or bytes); ties go to fewer
    recomputed ops, then fewer kept bytes. None when no option fits."""
    limit = budget.limit_activation_bytes(keep_all_bytes, 0)
    fits = [o for o in menu if o.kept_bytes <= limit]
    return min(fits, key=lambda o: (o.cost, o.num_ops, o.kept_bytes), default=None)
