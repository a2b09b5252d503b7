"""Measure one torch.compile cell: saved-for-backward bytes and step time against compiled none.

A TorchDispatchMode (the eager cells' `LiveBytes`, `FlopCounterMode`) makes dynamo run the frame
eagerly, so it would measure eager PyTorch, not the compiled step. Memory here is what the compiled
forward saves for its backward, through `saved_tensors_hooks` (`compile_bench.saved_bytes`:
parameters and inputs left out), measured independently of remat_kit's cost model and set beside
compiled none's in this process; time is interleaved with compiled none, in this process too.
FLOPs are not counted (FlopCounterMode would count the eager step).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from benchmarks._cell import time_with_none
from benchmarks._cells import Cell
from benchmarks._measure import max_rel_err, reference_grads, rss_peak_bytes
from benchmarks.compile_bench import _own_code, graph_breaks, memory_budget, saved_bytes
from benchmarks.models.torch_zoo import build

_EAGER = {"compile+checkpoint": "all", "compile+sac_mm": "sac_mm", "compile+auto": "auto"}


def _model(cell: Cell, device: str, code_id: int, solver: str | None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The cell's model with the eager strategy applied (auto planned by one eager step), as an
    instance with its own forward code: dynamo caches per code object, and compiled none would
    otherwise share one graph with a model compiled under another memory budget."""
    from benchmarks._torch_cell import apply

    model, (inputs, targets) = build(cell.model, cell.size)
    model, inputs, targets = _own_code(model, code_id).to(device), inputs.to(device), targets.to(device)
    if cell.strategy in _EAGER:
        model = apply(model, Cell(cell.framework, cell.model, cell.size, _EAGER[cell.strategy], cell.budget), solver)
    if cell.strategy == "compile+auto":  # plans (or names an infeasible budget) before compiling
        model(inputs, targets).backward()
        model.zero_grad(set_to_none=True)
    return model, inputs, targets


def _step(model: Any, compiled: Any, inputs: torch.Tensor, targets: torch.Tensor, budget: float | None) -> Any:
    def step() -> None:
        # Every call under the cell's config: a recompile on a guard miss must see the same budget.
        with memory_budget(budget) if budget is not None else contextlib.nullcontext():
            model.zero_grad(set_to_none=False)
            compiled(inputs, targets).backward()
        if inputs.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _saved(model: Any, compiled: Any, inputs: torch.Tensor, targets: torch.Tensor, budget: float | None) -> int:
    with memory_budget(budget) if budget is not None else contextlib.nullcontext():
        return saved_bytes(lambda: compiled(inputs, targets), [*model.parameters(), inputs, targets])


def run(
    cell: Cell, *, steps: int, warmup: int, grad_tol: float, ref_path: str | None = None, solver: str | None = None
) -> dict[str, Any]:
    from benchmarks._torch_cell import _predicted, _reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.config.recompile_limit = 64
    budget = cell.budget if cell.strategy == "compile_budget" else None
    model, inputs, targets = _model(cell, device, 1, solver)
    none_model, _, _ = _model(Cell(cell.framework, cell.model, cell.size, "none"), device, 0, None)
    compiled, compiled_none = torch.compile(model), torch.compile(none_model)
    one_step = _step(model, compiled, inputs, targets, budget)
    none_step = _step(none_model, compiled_none, inputs, targets, None)
    breaks = graph_breaks(one_step)  # the first call compiles
    none_step()
    model.zero_grad(set_to_none=True)
    with memory_budget(budget) if budget is not None else contextlib.nullcontext():
        loss = compiled(inputs, targets)
        loss.backward()
    err = max_rel_err(
        loss.item(),
        [p.grad.cpu().numpy() for p in model.parameters()],
        *reference_grads(ref_path, lambda: _reference(cell, device)),
    )
    saved = _saved(model, compiled, inputs, targets, budget)
    none_saved = _saved(none_model, compiled_none, inputs, targets, None)
    times = time_with_none(one_step, none_step, steps=steps, warmup=warmup)
    return {
        "device": device if device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
        "saved_bytes": saved,
        "none_saved_bytes": none_saved,
        "saved_vs_none": saved / none_saved if none_saved else None,
        "graph_breaks": breaks,
        "memory_note": "torch.compile (inductor): saved-for-backward bytes and step time against compiled none",
        "param_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters())),
        "predicted_activation_bytes": _predicted(model, Cell(cell.framework, cell.model, cell.size, "auto"))
        if cell.strategy == "compile+auto"
        else None,
        "rss_peak_bytes": rss_peak_bytes(one_step),
        "grad_max_rel_err": err,
        "grad_ok": bool(err <= grad_tol),
        **times,
    }
