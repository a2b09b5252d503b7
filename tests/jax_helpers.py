"""Helpers shared by the JAX tests (collected only with jax installed: conftest.py)."""

from __future__ import annotations

from remat_kit.measure import rel_err as rel_err  # the one gradient check, shared with the benchmarks
