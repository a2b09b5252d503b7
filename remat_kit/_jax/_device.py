"""The time constants `auto` plans with on JAX: measured on the default backend's first device.

A short microbenchmark of compiled programs (a matmul, an elementwise op over a large array, a
chain of small elementwise ops on a tiny array) gives the roofline rates and what one more op in
a compiled step costs beyond its bytes and FLOPs: the recompute of a jaxpr op runs inside XLA's
fusions, so this is near zero where XLA fuses the chain (unlike eager torch, which dispatches
every op). `remat_kit._core.calibration` caches the result in the process and on disk
(``REMAT_KIT_CALIBRATE=0`` turns measuring off). The torch adapter's twin is `_torch/_device.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from remat_kit._core.calibration import Measurement, calibrated_spec
from remat_kit._core.graph import DeviceSpec

REPEATS = 5
CHAIN_OPS = 16  # ops in the chain whose per-op time beyond one op's is the per-op overhead


def default_device() -> DeviceSpec:
    """Calibrated constants for the default backend's first device (measured once, cached)."""
    dev = jax.devices()[0]
    kind = f"jax-{jax.__version__}-{dev.platform}-{dev.device_kind}"
    return calibrated_spec(kind, lambda: _measure_outside_trace(dev))


def _measure_outside_trace(dev: jax.Device) -> Measurement:
    # `auto` plans while the user's `jit(grad(...))` traces it: without this, the benchmark's
    # arrays would be tracers of that trace, and nothing would run to be timed.
    with jax.ensure_compile_time_eval():
        return measure(dev)


def _least_seconds(fn: Callable[..., jax.Array], *args: jax.Array, repeats: int = REPEATS) -> float:
    for _ in range(2):  # compile, then warm the allocator
        fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    # The least of a few: load from other processes only ever slows a run down, and the constants
    # are cached on disk, so they should describe the device, not the moment.
    return min(times)


def measure(dev: jax.Device) -> Measurement:
    """Least times (of a few runs) of a compiled matmul, a large elementwise op and a chain of small ops."""
    gpu = dev.platform != "cpu"
    n = 4096 if gpu else 512
    dtype = jnp.bfloat16 if gpu else jnp.float32
    key = jax.random.PRNGKey(0)
    a = jax.device_put(jax.random.normal(key, (n, n), dtype), dev)
    matmul_seconds = _least_seconds(jax.jit(lambda a: a @ a), a)
    x = jax.device_put(jnp.ones(((64 if gpu else 4) * 2**20,), jnp.float32), dev)
    copy_seconds = _least_seconds(jax.jit(lambda x: x * 2.0), x)

    def chain(y: jax.Array, steps: int) -> jax.Array:
        for _ in range(steps):
            y = jnp.sin(y) * 1.5
        return y

    tiny = jax.device_put(jnp.ones((8,), jnp.float32), dev)
    long = _least_seconds(jax.jit(lambda y: chain(y, CHAIN_OPS)), tiny)
    short = _least_seconds(jax.jit(lambda y: chain(y, 1)), tiny)  # the call's own cost, taken out
    return Measurement(
        matmul_flops=2.0 * n**3,
        matmul_seconds=matmul_seconds,
        copy_bytes=2.0 * x.size * x.dtype.itemsize,
        copy_seconds=copy_seconds,
        op_overhead_seconds=max(long - short, 0.0) / (CHAIN_OPS - 1),
    )
