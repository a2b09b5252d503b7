"""Measure a training step as remat_kit does: the supported API for benchmarks and harnesses.

The benchmarks and the conformance harness use these instead of the adapters' internals, so the
adapters can change inside while what the harness measures stays put. Each function loads its
framework's adapter on first use: `import remat_kit.measure` works without jax or torch.

- PyTorch: `torch_step` runs forward + backward once and returns its peak live activation storage
  (a `TorchDispatchMode` storage tracker, parameters, inputs and parameter gradients left out, as
  the budget defines it) and its FLOPs, recompute included (`FlopCounterMode`); on a GPU also
  `torch.cuda.max_memory_allocated` over the step. `hf_kv_cache_configs` finds the Hugging Face
  configs `auto` runs with the KV cache off. `torch_plan` plans a module on one input as `auto`'s
  first call does, without running a step, and `torch_profile` only profiles it (a benchmark
  times the two to split planning time). `torch_predicted_parts` splits an `auto` module's
  predicted extra step time into its recomputed ops, the recomputes' fixed costs and the forward
  mode, as a benchmark can split the measured one.
- JAX: `jax_flops` reads XLA's cost analysis; `jax_auto_flops_unrolled` counts the FLOPs of the
  plan `auto` made with its scans unrolled (XLA counts a scan body once). `jax_trace` traces a
  function as `auto` does and gives its cost graph, the cost model's plan at a budget (no
  verifying compile) and the function run under any plan (a preset's, such as
  `remat_kit.presets.megatron_selective(step.graph)`, or `auto`'s from `remat_kit.plan_of`).
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

    from remat_kit._jax import TracedStep
    from remat_kit._torch import Planning, PredictedParts, StepMeasurement

__all__ = [
    "format_bytes",
    "hf_kv_cache_configs",
    "jax_auto_flops_unrolled",
    "jax_flops",
    "jax_trace",
    "rel_err",
    "torch_plan",
    "torch_predicted_parts",
    "torch_profile",
    "torch_step",
]


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


def torch_plan(
    model: Any, args: tuple = (), kwargs: dict | None = None, *, budget: object, profile: str = "replicate"
) -> Planning:
    """Profile `model` on these inputs and plan it under `budget` as `auto`'s first call does,
    without running a step: a `Planning` of the `plan`, `num_ops` profiled, `num_values` in its
    cost graph and `replicated_from` (>0: the profile was built from that many layers of a long
    identical stack). `profile`: "replicate" (as auto does), "fake" (every op under
    FakeTensorMode; a model on the meta device plans from shapes) or "real".

    Raises:
      InfeasibleBudgetError: as `auto` would, naming the smallest feasible budget.
    """
    from remat_kit import _torch

    return _torch.plan_inputs(model, args, kwargs, budget, profile=profile)


def torch_predicted_parts(model: Any) -> PredictedParts:
    """The terms of the predicted extra step time of the plans an `auto` module has made:
    `ops_seconds` (what its recomputes run), `frame_seconds` (the recomputes' fixed costs:
    checkpoint's frame and hooks, the replay mode, views) and `forward_seconds` (the selective
    regions' forward mode). They add up to `sum(p.predicted_extra_step_seconds for p in
    remat_kit.plan_of(model))`."""
    from remat_kit import _torch

    return _torch.predicted_parts(model)


def torch_profile(model: Any, args: tuple = (), kwargs: dict | None = None, *, profile: str = "replicate") -> int:
    """Profile `model` on these inputs as `torch_plan` does, and nothing more; the number of ops."""
    from remat_kit import _torch

    return _torch.profile_ops(model, args, kwargs, profile=profile)


def jax_trace(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TracedStep:
    """Trace ``fn(*args, **kwargs)`` (its first argument the parameters) as `auto` does. The
    `TracedStep` has the cost `graph`, `scan_blocks` (per scan over layers, the graph block of
    each iteration), ``plan(budget)``: the cost model's plan, before `auto` verifies it by
    compiling, and ``run(plan, unroll=1)``: `fn` run under a plan made for that graph, called
    with the same arguments (`unroll` > 1 runs that many layers per loop step, for counting
    FLOPs: XLA's cost analysis counts a loop body once)."""
    from remat_kit import _jax

    return _jax.trace_step(fn, args, kwargs)
