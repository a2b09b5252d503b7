"""Measure a training step on any device: live activation storage and FLOPs (recompute included).

`LiveStorageTracker` is a TorchDispatchMode that sees every storage an op allocates during the
step and the moment it dies (a weakref on the storage). Activation memory is its peak, leaving out
parameters, inputs (allocated before the step) and the parameter gradients the step leaves
behind, which is the budget's definition (DESIGN.md). It works on CPU, where
`torch.cuda.max_memory_allocated` does not exist; on a GPU both are reported.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from remat_kit._core.plan import Plan
from remat_kit._torch._plan import _profile, compile_plan


class LiveStorageTracker(TorchDispatchMode):
    """Timeline of storages allocated under the mode: (alloc id, +bytes) and (alloc id, -bytes).

    It also records which storages an `add` summed into another of the same size (`summed`): a
    weight used twice (a tied embedding and head) gets its gradient as partial gradients that
    autograd adds up before it stores `.grad`. Those partials are parameter gradients too, so
    `peak_bytes` leaves them out with the `.grad` they were summed into (as the GPU figure,
    peak minus gradient bytes, does)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self.current: dict[int, int] = {}  # storage key -> alloc id of the storage alive now
        self.refs: dict[int, Any] = {}
        self.summed: dict[int, list[int]] = {}  # alloc id -> alloc ids an add summed into it

    def _free(self, alloc_id: int, nbytes: int, key: int, _ref: Any) -> None:
        self.events.append((alloc_id, -nbytes))
        if self.current.get(key) == alloc_id:
            del self.current[key]
        self.refs.pop(alloc_id, None)

    def _ids_of_same_size(self, tensors: list[Any], nbytes: int) -> list[int]:
        out = []
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                alloc = self.current.get(t.untyped_storage()._cdata)
                if alloc is not None and t.untyped_storage().nbytes() == nbytes:
                    out.append(alloc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.add_.Tensor and out.device.type != "meta":
            # An in-place add sums into its first argument's storage (an add makes a new one:
            # recorded below once it is tracked).
            target = out.untyped_storage()
            if target._cdata in self.current:
                self.summed.setdefault(self.current[target._cdata], []).extend(
                    self._ids_of_same_size(list(args[1:2]), target.nbytes())
                )
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place ops allocate nothing (and may alias a parameter)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            if st.device.type == "meta":  # a fake tensor (planning under FakeTensorMode)
                continue
            key = st._cdata
            if key in self.current:
                continue
            alloc_id, nbytes = len(self.events), st.nbytes()
            if func is torch.ops.aten.add.Tensor:
                self.summed[alloc_id] = self._ids_of_same_size(list(args[:2]), nbytes)
            self.events.append((alloc_id, nbytes))
            self.current[key] = alloc_id
            self.refs[alloc_id] = weakref.ref(st, functools.partial(self._free, alloc_id, nbytes, key))
        return out

    def peak_bytes(self, exclude: Any = ()) -> int:
        """Peak live bytes, leaving out the storages of the tensors in `exclude` (alive now) and the
        partial sums added into them (see the class doc)."""
        skip = {
            self.current[t.untyped_storage()._cdata]
            for t in exclude
            if t is not None and t.untyped_storage()._cdata in self.current
        }
        todo = list(skip)
        while todo:
            for part in self.summed.get(todo.pop(), ()):
                if part not in skip:
                    skip.add(part)
                    todo.append(part)
        live = peak = 0
        for alloc_id, delta in self.events:
            if alloc_id in skip:
                continue
            live += delta
            peak = max(peak, live)
        return peak


@dataclasses.dataclass(frozen=True)
class StepMeasurement:
    activation_bytes: int  # peak live activation storage (tracker)
    flops: int  # forward + backward, recompute included (FlopCounterMode)
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated over the step, on a GPU


def default_loss(out: Any) -> torch.Tensor:
    """A scalar from whatever the forward returned: `.loss` / `["loss"]` if present, else a sum."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is not None:
        return loss
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise ValueError("the forward returned no floating-point tensor to take a loss of; pass loss_fn=...")
    return sum(t.float().sum() for t in tensors)


def measure_step(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    count_flops: bool = True,
) -> StepMeasurement:
    """Run forward + backward once and measure it. Parameter gradients are zeroed first."""
    kwargs = kwargs or {}
    loss_fn = loss_fn or default_loss
    model.zero_grad(set_to_none=True)
    cuda = any(p.is_cuda for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # Memory and FLOPs in separate runs: FlopCounterMode's module hooks hold tensors alive.
    tracker = LiveStorageTracker()
    with tracker:
        loss = loss_fn(model(*args, **kwargs))
        loss.backward()
        del loss
    grads = [p.grad for p in model.parameters()]
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize()
        grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
        cuda_peak = torch.cuda.max_memory_allocated() - base - grad_bytes
    activation_bytes = tracker.peak_bytes(exclude=grads)
    flops = 0
    if count_flops:
        model.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False)
        with counter:
            loss_fn(model(*args, **kwargs)).backward()
        flops = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return StepMeasurement(activation_bytes, flops, cuda_peak)


@dataclasses.dataclass(frozen=True)
class Planning:
    """What planning a module on one input made, as `auto` plans it (`remat_kit.measure.torch_plan`)."""

    plan: Plan
    num_ops: int  # ops in the profile the plan was made from
    num_values: int  # values in its cost graph
    replicated_from: int  # >0: the profile was built from this many layers (see _replicate.py)


def plan_inputs(
    module: torch.nn.Module, args: tuple, kwargs: dict | None, budget: object, *, profile: str = "replicate"
) -> Planning:
    """Profile `module` on these inputs and plan it under `budget`, as `auto`'s first call does,
    without running a step. `profile`: "replicate" (from four layers of a long identical stack
    where it can, as auto does), "fake" (every op under FakeTensorMode) or "real"."""
    compiled = compile_plan(module, args, kwargs or {}, budget, mode=_profile_mode(profile))
    return Planning(
        plan=compiled.plan,
        num_ops=len(compiled.profile.ops),
        num_values=len(compiled.tg.graph),
        replicated_from=compiled.profile.replicated_from,
    )


def profile_ops(module: torch.nn.Module, args: tuple, kwargs: dict | None, *, profile: str = "replicate") -> int:
    """Profile `module` on these inputs as `plan_inputs` does, and nothing more: the number of ops
    profiled (a benchmark times this to split planning into profiling and solving)."""
    return len(_profile(module, args, kwargs or {}, mode=_profile_mode(profile)).ops)


def _profile_mode(profile: str) -> str:
    if profile not in ("replicate", "fake", "real"):
        raise ValueError(f"profile={profile!r} must be 'replicate', 'fake' or 'real'.")
    return profile


@dataclasses.dataclass(frozen=True)
class PredictedParts:
    """A rematted module's predicted extra step time, split as a measurement can split it."""

    ops_seconds: float  # the ops its recomputes run
    frame_seconds: float  # the recomputes' fixed costs: checkpoint's frame and hooks, replay mode, views
    forward_seconds: float  # the selective regions' forward mode


def predicted_parts(model: torch.nn.Module) -> PredictedParts:
    """The terms of `plan.predicted_extra_step_seconds` of every plan `model` (an `auto` module)
    has made (`_layerplan.run_costs`, at the constants this process calibrated)."""
    from remat_kit._torch._api import state_of
    from remat_kit._torch._device import default_device, device_of
    from remat_kit._torch._layerplan import run_costs

    device, kind = default_device(model), device_of(model).type
    recompute = frame = forward = 0.0
    for entry in state_of(model).plans.values():
        _flops, _extra, fixed, fw = run_costs(entry.regions, device, kind)
        recompute, frame, forward = recompute + entry.plan.predicted_recompute_seconds, frame + fixed, forward + fw
    return PredictedParts(recompute - frame, frame, forward)
