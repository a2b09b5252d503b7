"""What differs between the jax versions remat_kit supports, in one place.

`scan`'s parameters: up to jax 0.11 an equation states `num_consts` and `num_carry`; from 0.12 it
states the flat trees of its operands instead (`ft_in`: consts, carry, xs), and loop-invariant
carries may arrive among the consts. Both give the same split of the equation's operands.
"""

from __future__ import annotations

from typing import Any


def scan_counts(params: dict[str, Any]) -> tuple[int, int]:
    """(number of constant operands, number of carry operands) of a `scan` equation."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].elts
    return len(list(consts.vals)), len(list(carry.vals))
