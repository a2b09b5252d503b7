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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from remat_kit._core.budget import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from remat_kit._torch import StepMeasurement

__all__ = ["format_bytes", "hf_kv_cache_configs", "jax_auto_flops_unrolled", "jax_flops", "torch_step"]


def torch_step(model: Any, args: tuple = (), kwargs: dict | None = None, loss_fn: Callable[[Any], Any] | None = None,
               *, count_flops: bool = True) -> StepMeasurement:
    """Run ``loss_fn(model(*args, **kwargs)).backward()`` once and measure it: a `StepMeasurement`
    of `activation_bytes`, `flops` (0 with ``count_flops=False``; a second step counts them) and
    `cuda_peak_bytes` (None off a GPU). Parameter gradients are zeroed first and hold the step's
    gradients afterwards. `loss_fn` defaults to the output's ``.loss`` / ``["loss"]``, else its sum."""
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
