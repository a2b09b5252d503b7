"""Helpers shared by the JAX tests (collected only with jax installed: conftest.py)."""

from __future__ import annotations

import jax

from remat_kit.measure import rel_err as rel_err  # the one gradient check, shared with the benchmarks

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """Backend compiles seen through jax.monitoring while the context is open."""

    def __init__(self) -> None:
        self.count = 0
        self.on = False
        jax.monitoring.register_event_duration_secs_listener(self._seen)

    def _seen(self, event: str, duration: float, **_) -> None:
        if self.on and event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        self.count, self.on = 0, True
        return self

    def __exit__(self, *exc) -> None:
        self.on = False


COMPILES = Compiles()  # one listener for the process: `with COMPILES as seen: ...; seen.count`
