"""Framework-neutral measuring: step-time statistics and the process's peak RSS."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable


def time_steps(step: Callable[[], None], *, steps: int, warmup: int) -> dict[str, float | int]:
    """Median and spread of `steps` timed calls after `warmup` untimed ones (step must synchronize)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "step_time_s": statistics.median(times),
        "step_time_iqr_s": q[2] - q[0],
        "step_time_min_s": min(times),
        "num_steps": steps,
    }


def rss_peak_bytes(step: Callable[[], None]) -> int:
    """Peak resident set size of this process while `step` runs (memory_profiler samples it)."""
    from memory_profiler import memory_usage

    with warnings.catch_warnings():
        # memory_profiler forks a sampler; JAX warns that fork and threads do not mix. The sampler
        # only reads /proc of its parent, so the warning does not apply.
        warnings.simplefilter("ignore", RuntimeWarning)
        mib = memory_usage((step, (), {}), interval=0.005, max_usage=True, include_children=False)
    mib = mib[0] if isinstance(mib, (list, tuple)) else mib
    return int(float(mib) * 2**20)


def reference_grads(path: str | None, compute: Callable[[], tuple[float, list]]) -> tuple[float, list]:
    """`none`'s loss and gradients (numpy): read from `path` if an earlier cell saved them, else
    computed (and saved, when `path` is given). Saves a compile per cell of a sweep."""
    import os

    import numpy as np

    if path and os.path.exists(path):
        with np.load(path) as f:
            return float(f["loss"]), [f[f"g{i}"] for i in range(len(f.files) - 1)]
    loss, grads = compute()
    grads = [np.asarray(g) for g in grads]
    if path:
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, loss=np.float64(loss), **{f"g{i}": g for i, g in enumerate(grads)})
        os.replace(tmp, path)
    return loss, grads


def max_rel_err(loss: float, grads: list, ref_loss: float, ref_grads: list) -> float:
    """Largest gradient difference over the largest reference gradient (and the loss's relative error)."""
    import numpy as np

    if len(grads) != len(ref_grads):
        raise ValueError(f"gradient check: {len(grads)} gradients against {len(ref_grads)} of the reference.")
    num = max(float(np.max(np.abs(np.asarray(g) - r))) for g, r in zip(grads, ref_grads))
    den = max(float(np.max(np.abs(r))) for r in ref_grads)
    return max(num / max(den, 1e-30), abs(loss - ref_loss) / max(abs(ref_loss), 1e-30))
