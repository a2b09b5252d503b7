"""Measure one PyTorch cell: live activation storage, FLOPs, step time, RSS, gradients vs `none`.

`LiveBytes` is a TorchDispatchMode that adds every storage an op allocates and subtracts it when
the storage dies (weakref); its peak over forward + backward, less the parameter gradients still
alive at the end, is activation memory (DESIGN.md). FLOPs come from `FlopCounterMode`, which sees
recomputed ops because they run through the dispatcher again.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    checkpoint_sequential,
    create_selective_checkpoint_contexts,
)
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._cell import time_with_none
from benchmarks._cells import COMPILED, Cell
from benchmarks._measure import max_rel_err, reference_grads, rss_peak_bytes
from benchmarks.models.torch_zoo import ZooModel, build

_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.convolution.default,
}


class LiveBytes(TorchDispatchMode):
    """Timeline of storages allocated under the mode: +bytes when allocated, -bytes when freed."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (allocation id, +/- bytes)
        self.alive: dict[int, tuple[int, int, Any]] = {}  # storage key -> (allocation id, bytes, weakref)

    def _free(self, key: int, _ref: Any) -> None:
        alloc_id, nbytes, _ = self.alive.pop(key)
        self.events.append((alloc_id, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place results allocate nothing new
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st._cdata not in self.alive:
                    alloc_id = len(self.events)
                    self.alive[st._cdata] = (
                        alloc_id,
                        st.nbytes(),
                        weakref.ref(st, functools.partial(self._free, st._cdata)),
                    )
                    self.events.append((alloc_id, st.nbytes()))
        return out

    def peak_bytes(self, exclude: list[torch.Tensor]) -> int:
        """Peak live bytes over the timeline, leaving out the storages of `exclude` (alive now)."""
        skip = {self.alive[k][0] for t in exclude if t is not None and (k := t.untyped_storage()._cdata) in self.alive}
        live = peak = 0
        for alloc_id, delta in self.events:
            if alloc_id not in skip:
                live += delta
                peak = max(peak, live)
        return peak


def _sac_mm(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def _ckpt(block: torch.nn.Module, context_fn: Any = None) -> Any:
    kw = {"context_fn": context_fn} if context_fn else {}
    return lambda x: checkpoint(block, x, use_reentrant=False, **kw)


def apply(model: ZooModel, cell: Cell, solver: str | None = None) -> Any:
    """The callable `(inputs, targets) -> loss` that runs `cell.strategy` on `model`."""
    s = cell.strategy
    n = len(model.blocks)
    if s in ("all", "every_2", "sac_mm"):
        ctx = functools.partial(create_selective_checkpoint_contexts, _sac_mm) if s == "sac_mm" else None
        every = 2 if s == "every_2" else 1
        model.run_blocks = lambda blocks, x: functools.reduce(
            lambda h, ib: (_ckpt(ib[1], ctx) if ib[0] % every == 0 else ib[1])(h), enumerate(blocks), x
        )
    elif s == "sqrt_n":
        segments = max(1, round(math.sqrt(n)))
        model.run_blocks = lambda blocks, x: checkpoint_sequential(blocks, segments, x, use_reentrant=False)
    elif s == "attn_core":
        for block in model.blocks:
            block.attn.checkpoint_core = True
    elif s == "auto":
        import remat_kit as rk

        return rk.auto(model, budget=cell.budget, solver=solver)
    elif s != "none":
        raise ValueError(f"strategy={s!r} has no PyTorch implementation.")
    return model


def _predicted(model: ZooModel, cell: Cell) -> int | None:
    if cell.strategy != "auto":
        return None
    import remat_kit as rk

    plans = rk.plan_of(model)
    return int(plans[-1].predicted_activation_bytes) if plans else None


def _saved_bytes(fn: Any, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes autograd packs for backward during one forward (distinct storages), as
    `saved_tensors_hooks` sees them: a checkpoint's own saved inputs count, its inside does not."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(inputs, targets)
    loss.backward()
    return sum(seen.values())


def _grads(model: ZooModel) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()]


def _reference(cell: Cell, device: str) -> tuple[float, list]:
    ref_model, (inputs, targets) = build(cell.model, cell.size)
    ref_model = ref_model.to(device)
    loss = ref_model(inputs.to(device), targets.to(device))
    loss.backward()
    return loss.item(), [p.grad.cpu().numpy() for p in ref_model.parameters()]


def _none_step(cell: Cell, device: str) -> Any:
    """A step of no remat on a copy of the cell's model, built in this process: the time ratio's base."""
    none_model, (inputs, targets) = build(cell.model, cell.size)
    none_model, inputs, targets = none_model.to(device), inputs.to(device), targets.to(device)

    def none_step() -> None:
        none_model.zero_grad(set_to_none=False)
        none_model(inputs, targets).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return none_step


def run(
    cell: Cell, *, steps: int, warmup: int, grad_tol: float, ref_path: str | None = None, solver: str | None = None
) -> dict[str, Any]:
    if cell.strategy in COMPILED:
        from benchmarks import _compiled_cell

        return _compiled_cell.run(cell, steps=steps, warmup=warmup, grad_tol=grad_tol, ref_path=ref_path, solver=solver)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, (inputs, targets) = build(cell.model, cell.size)
    model, inputs, targets = model.to(device), inputs.to(device), targets.to(device)
    fn = apply(model, cell, solver)

    def one_step() -> None:
        model.zero_grad(set_to_none=False)
        fn(inputs, targets).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    one_step()  # first call: plans (auto) or compiles (torch.compile)
    loss = fn(inputs, targets)
    model.zero_grad(set_to_none=False)
    loss.backward()
    err = max_rel_err(
        loss.item(),
        [g.cpu().numpy() for g in _grads(model)],
        *reference_grads(ref_path, lambda: _reference(cell, device)),
    )
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    tracker = LiveBytes()
    with tracker:
        fn(inputs, targets).backward()
    activation = tracker.peak_bytes(exclude=_grads(model))
    peak = activation + 2 * params + inputs.nbytes + targets.nbytes
    counter = FlopCounterMode(display=False)
    with counter:
        fn(inputs, targets).backward()
    flops = float(counter.get_total_flops())
    saved = _saved_bytes(fn, inputs, targets)
    none_step = None if cell.strategy == "none" else _none_step(cell, device)
    times = time_with_none(one_step, none_step, steps=steps, warmup=warmup)
    return {
        "device": device if device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
        "activation_bytes": activation,
        "peak_bytes": peak,
        "saved_bytes": saved,
        "param_bytes": int(params),
        "flops": flops,
        "predicted_activation_bytes": _predicted(model, cell),
        "rss_peak_bytes": rss_peak_bytes(one_step),
        "grad_max_rel_err": err,
        "grad_ok": bool(err <= grad_tol),
        "device_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        **times,
    }
