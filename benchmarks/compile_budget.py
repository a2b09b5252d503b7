"""Compiled `auto` against its budget, across models: the activation peak of the compiled step read
from Inductor's generated code (benchmarks/inductor_memory.py), beside the budget in bytes.

    python -m benchmarks.compile_budget                          # writes reports/torch/compile_budget.md
    python -m benchmarks.compile_budget --models hf-llama --budgets 0.3
    python -m benchmarks.compile_budget --models "gpt 4x128 seq 128 batch 4" --budgets 0.2721 --live --out /tmp/x.md

The budget is a fraction of the eager no-remat step's activation peak (remat_kit's live-storage
tracker, DESIGN.md); `auto` plans from the eager profile, and the compiled step must hold it.
Models: the benchmark GPT at three shapes, and HF Llama and x-transformers as
benchmarks/models/outside_torch.py builds them for conformance (test size, dropout on, no download). Each cell is a fresh `torch._dynamo.reset()` and
Inductor compile (1 thread); memory only, no timing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

import remat_kit
from benchmarks import inductor_memory
from benchmarks.models import outside_torch
from benchmarks.models.torch_gpt import GPT

Case = tuple[torch.nn.Module, tuple, dict, Callable[[Any], torch.Tensor]]


def _gpt(layers: int, d: int, seq: int, vocab: int, batch: int) -> Case:
    torch.manual_seed(0)
    model = GPT(layers=layers, d=d, heads=4, vocab=vocab, seq=seq)
    idx = torch.randint(0, vocab, (batch, seq))
    return model, (idx, torch.roll(idx, -1, 1)), {}, lambda out: out


def _outside(name: str) -> Case:
    """A model written elsewhere, as benchmarks/models/outside_torch.py builds it for conformance."""
    case = outside_torch.cases()[name]
    torch.manual_seed(0)
    return case.build(), (), case.kwargs(), case.loss


MODELS: dict[str, Callable[[], Case]] = {
    "gpt 4x128 seq 128 batch 4": lambda: _gpt(4, 128, 128, 1024, 4),
    "gpt 4x64 seq 128 batch 2": lambda: _gpt(4, 64, 128, 256, 2),
    "gpt 6x128 seq 256 batch 2": lambda: _gpt(6, 128, 256, 256, 2),
    "hf-llama": lambda: _outside("hf-llama"),
    "x-transformers": lambda: _outside("x-transformers"),
}


def cell(make: Callable[[], Case], budget: float) -> dict[str, Any]:
    """One model at one budget: eager none's activation, the eager plan's, the compiled plan's."""
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    model, args, kwargs, loss = make()
    model.train()
    none = remat_kit.measure.torch_step(copy.deepcopy(model), args, kwargs, loss, count_flops=False)
    try:
        remat_kit.auto(model, budget)
        loss(model(*args, **kwargs)).backward()
    except remat_kit.InfeasibleBudgetError as e:
        return {"budget": budget, "infeasible": str(e).split(" for ")[0]}
    eager = remat_kit.measure.torch_step(model, args, kwargs, loss, count_flops=False)
    torch._dynamo.reset()
    PyCodeCache.cache_clear()
    with inductor_config.patch(compile_threads=1):
        loss(torch.compile(model)(*args, **kwargs)).backward()
    # The step's peak is its largest graph's (the backward's inputs include what the forward saved).
    top = max((p for s in inductor_memory.loaded_sources() for p in inductor_memory.module_peaks(s)), key=_bytes)
    budget_bytes = budget * none.activation_bytes
    return {
        "budget": budget,
        "budget_bytes": int(budget_bytes),
        "eager": eager.activation_bytes,
        "compiled": top.peak_bytes,
        "ratio": top.peak_bytes / budget_bytes,
        "peak_line": top.line,
        "live": top.live,
    }


def _bytes(peak: inductor_memory.GraphPeak) -> int:
    return peak.peak_bytes


def live_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What is live at each compiled peak: the generated line it follows and its storages."""
    out = []
    for name, cells in results.items():
        for c in cells:
            if "live" in c:
                out.append(f"{name} at {c['budget']}: {c['compiled']:,} bytes after `{c['peak_line']}`")
                out += [f"    {names}: {nbytes:,}" for names, nbytes in c["live"]]
    return out


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| model | budget | budget (bytes) | eager plan | compiled plan (Inductor's code) | compiled / budget | held |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cells in results.items():
        for c in cells:
            if "infeasible" in c:
                lines.append(f"| {name} | {c['budget']} | {c['infeasible']} (InfeasibleBudgetError) | | | | |")
                continue
            held = "yes" if c["compiled"] <= c["budget_bytes"] else "**no**"
            lines.append(
                f"| {name} | {c['budget']} | {c['budget_bytes']:,} | {c['eager']:,} | {c['compiled']:,} | "
                f"{c['ratio']:.3f} | {held} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda t: t.split(","), default=list(MODELS))
    p.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=[0.2721, 0.3, 0.5, 0.7])
    p.add_argument("--out", default="reports/torch/compile_budget.md")
    p.add_argument("--live", action="store_true", help="print the storages live at each compiled peak")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {name: [cell(MODELS[name], b) for b in args.budgets] for name in args.models}
    cmd = "python -m benchmarks.compile_budget " + " ".join(argv if argv is not None else sys.argv[1:])
    calibrate = os.environ.get("REMAT_KIT_CALIBRATE", "1")
    lines = [
        "# Compiled `auto` against its budget",
        "",
        f"Command: `REMAT_KIT_CALIBRATE={calibrate} {cmd}` (CPU, Inductor, torch {torch.__version__}). "
        "Generated by benchmarks/compile_budget.py; its docstring says how each figure is measured.",
        "",
        *table(results),
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines + (live_lines(results) if args.live else [])))


if __name__ == "__main__":
    main()
