"""Layers recomputed whole, searched on unrolled chains where the cost model's plans all miss
(`remat_kit/_jax/_wholelayers.py`): the search over k, the number of nested layers recomputed.
On an outside model: `tests/test_jax_unrolled_outside.py::test_lm1b_under_the_ci_vm_s_calibration_fits_a_budget_another_pricing_fits`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")

from remat_kit._jax._wholelayers import MAX_COMPILES, fewest  # noqa: E402


@st.composite
def falling(draw):
    """Compiled fractions with 0..n layers recomputed, non-increasing from 1.0, and a goal."""
    n = draw(st.integers(1, 40))
    drops = draw(st.lists(st.floats(0.0, 0.2), min_size=n, max_size=n))
    fractions = [1.0]
    for d in drops:
        fractions.append(max(0.0, fractions[-1] - d))
    return fractions, draw(st.floats(0.05, 0.99))


@settings(max_examples=300, deadline=None)
@given(falling())
def test_fewest_returns_a_fit_within_its_compiles_and_none_only_when_all_layers_miss(case):
    fractions, goal = case
    n, measured = len(fractions) - 1, []

    def fraction(k):
        if k and k not in measured:
            measured.append(k)
        return fractions[k]

    k = fewest(n, fraction, lambda k: fraction(k) <= goal, aim=goal - 0.02, low=goal - 0.05)
    if fractions[n] > goal:
        assert k is None
        return
    assert k is not None and fractions[k] <= goal
    assert len(measured) <= MAX_COMPILES + 1  # every layer, then at most MAX_COMPILES more
    assert measured[0] == n
    # It stopped in the band, beside a miss (or no remat), or out of compiles.
    adjacent_miss = k == 1 or (k - 1 in measured and fractions[k - 1] > goal)
    assert fractions[k] >= goal - 0.05 or adjacent_miss or len(measured) == MAX_COMPILES + 1
