"""Helpers shared by the JAX tests (import after `pytest.importorskip("jax")`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rel_err(a, b) -> float:
    """Largest |a - b| over the largest |b|, across every leaf of two pytrees of the same structure."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / den
