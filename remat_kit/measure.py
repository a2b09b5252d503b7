"""Measure a training step as remat_kit does: the supported API for benchmarks and harnesses.

The benchmarks and the conformance harness use these instead of the adapters' internals, so the
adapters can change inside while what the harness measures stays put. Each function loads its
framework's adapter on first use: `import remat_kit.measure` works without jax or torch.

- PyTorch: `torch_step` runs forward + backward once and returns its peak live activation storage
  (a `TorchDispatchMode` storage tracker, parameters, inputs and parameter gradients left out, as
  the budget defines it) and its FLOPs, recompute included (`FlopCounterMode`); on a GPU also
  `torch.cuda.max_memory_allocated` over the step. `hf_kv_cache_configs` finds the Hugging Face
  configs `auto` runs with the KV cache off.
- JAX: `jax_flops` reads XLA's cost analysis; `jax_auto_flops_unrolled` counts the FLOPs of the
  plan `auto` made with its scans unrolled (XLA counts a scan body once).
- Either: `rel_err` is the gradient check the benchmarks report and the tests assert on.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from remat_kit._core.budget import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from remat_kit._torch import StepMeasurement

__all__ = ["format_bytes", "hf_kv_cache_configs", "jax_auto_flops_unrolled", "jax_flops", "rel_err", "torch_step"]


def rel_err(got: Any, want: Any) -> float:
    """The worst relative error of any one array: the largest ``max|got - want| / max|want|`` over
    the leaves of two structures of arrays (pytrees, lists or dicts of jax / numpy arrays or torch
    tensors), in float64. A leaf whose `want` is all zeros counts its absolute error. Per leaf, not
    over the whole tree, so an error in a small gradient is not hidden by a large one elsewhere.
    Returns inf when either side holds a NaN or an infinity (a NaN must never pass a tolerance)."""
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    if len(got_leaves) != len(want_leaves) or not want_leaves:
        raise ValueError(
            f"rel_err: {len(got_leaves)} arrays against {len(want_leaves)}; "
            "pass two structures of the same shape holding at least one array"
        )
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves):
        x, y = _float64(a), _float64(b)
        if x.shape != y.shape:
            raise ValueError(f"rel_err: an array of shape {x.shape} against one of shape {y.shape}")
        if not y.size:
            continue
        diff, scale = float(np.max(np.abs(x - y))), float(np.max(np.abs(y)))
        err = diff / scale if scale else diff
        if not math.isfinite(err) or not np.isfinite(x).all():
            return math.inf
        worst = max(worst, err)
    return worst


def _leaves(tree: Any) -> list[Any]:
    jax = sys.modules.get("jax")
    if jax is not None:  # any pytree (flax states, dataclasses); torch tensors are leaves to it
        return list(jax.tree.leaves(tree))
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [] if tree is None else [tree]


def _float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: convert in torch)
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def torch_step(
    model: Any,
    args: tuple = (),
    kwargs: dict | None = None,
    loss_fn: Callable[[Any], Any] | None = None,
    *,
    count_flops: bool = True,
) -> StepMeasurement:
    """Run ``loss_fn(model(*args, **kwargs)).backward()`` once and measure it: a `StepMeasurement`
    of `activation_bytes`, `flops` (0 with ``count_flops=False``; a second step counts them) and
    `cuda_peak_bytes` (None off a GPU). Parameter gradients are zeroed first; with
    ``count_flops=False`` they hold the step's gradients afterwards, else they are cleared.
    `loss_fn` defaults to the output's ``.loss`` / ``["loss"]``, else its sum."""
    from remat_kit import _torch

    return _torch.measure_step(model, args, kwargs, loss_fn, count_flops=count_flops)


def hf_kv_cache_configs(model: Any) -> list[Any]:
    """The Hugging Face configs of `model` and its submodules (each once) with ``use_cache`` on.

    `auto` runs training steps with the KV cache off (a cache is no activation); set
    ``use_cache = False`` on these to measure no remat the same way."""
    from remat_kit import _torch

    return _torch.kv_cache_configs(model)


def jax_flops(stage: Any) -> float:
    """FLOPs of a lowered or compiled JAX stage (``jax.jit(f).lower(...)`` or its ``.compile()``)
    by XLA's cost analysis, which counts a scan body once."""
    from remat_kit import _jax

    return _jax.compiled_flops(stage)


def jax_auto_flops_unrolled(wrapped: Any, params: Any, batch: Any) -> float:
    """FLOPs of one ``jax.value_and_grad`` step (gradients with respect to `params`) of the plan
    `auto` made for ``wrapped(params, batch)``, its scans unrolled so each layer's recompute counts."""
    from remat_kit import _jax

    return _jax.auto_flops_unrolled(wrapped, params, batch)
