"""Compiled remat strategies side by side: step time, saved bytes, graph breaks.

    python -m benchmarks.compile_bench                      # writes reports/torch/compile.md
    python -m benchmarks.compile_bench --layers 2 --d 64    # smaller

Every strategy is `torch.compile`d (Inductor by default) in one process and timed interleaved
with compiled no remat (medians of `--steps` steps, ratios to compiled none). The memory column
is measured independently of remat_kit's cost model: the bytes of the distinct storages the
compiled forward saves for its backward (`torch.autograd.graph.saved_tensors_hooks` around the
forward; parameters and inputs left out), as a fraction of what compiled none saves.

Strategies: compiled none; per-layer `checkpoint` (non-reentrant); torchtitan-style SAC op list
(save mm / addmm / SDPA, recompute the rest); torch's own `activation_memory_budget` (the
partitioner's knapsack, with its gradient error against compiled none: pytorch#190758); and
`remat_kit.auto` at 0.3 / 0.5 / 0.7, as planned layers compile today (selective-checkpoint
policies, `after`) and as they ran before (each planned layer a graph break running the eager
replay, `before`: `REMAT_KIT_COMPILE_EAGER=1`, in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import remat_kit
from benchmarks.models.torch_gpt import GPT

BUDGETS = (0.3, 0.5, 0.7)
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def saved_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages `step()`'s forward saves for backward, `exclude`d ones
    (parameters, inputs) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(seen.values())


def graph_breaks(fn: Callable[[], Any]) -> int:
    """Graph breaks dynamo counted while running `fn` (a first compiled call)."""
    from torch._dynamo.utils import counters

    before = sum(counters["graph_break"].values())
    fn()
    return sum(counters["graph_break"].values()) - before


def per_layer_checkpoint(model: GPT) -> GPT:
    for block in model.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def sac_op_list(model: GPT) -> GPT:
    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if func in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    context = functools.partial(create_selective_checkpoint_contexts, policy)
    for block in model.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, context_fn=context)
    return model


@contextlib.contextmanager
def memory_budget(value: float):
    import torch._functorch.config as fconfig

    old = fconfig.activation_memory_budget
    fconfig.activation_memory_budget = value
    try:
        yield
    finally:
        fconfig.activation_memory_budget = old


def _own_code(model: GPT, k: int) -> GPT:
    """`model` as an instance of a subclass whose forward has its own code object: dynamo caches
    compiled code per code object, and identical GPTs (none, the compile memory budget) would
    otherwise share one compiled graph whatever config each was compiled under."""
    base = type(model).forward
    code = base.__code__.replace(co_name=f"forward_{k}")
    fwd = types.FunctionType(code, base.__globals__, f"forward_{k}", base.__defaults__, base.__closure__)
    model.__class__ = type(f"{type(model).__name__}_{k}", (type(model),), {"forward": fwd})
    return model


def plan_step(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> None:
    """One eager step, so an `auto` model plans (and names an infeasible budget) before compiling."""
    model(idx, tgt).backward()
    model.zero_grad(set_to_none=True)


def build(args: argparse.Namespace) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(layers=args.layers, d=args.d, heads=args.heads, vocab=args.vocab, seq=args.seq)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq))
    return model, idx, torch.roll(idx, -1, 1)


def strategies(args: argparse.Namespace, eager_regions: bool) -> dict[str, tuple[Callable[[GPT], GPT], Any]]:
    out: dict[str, tuple[Callable[[GPT], GPT], Any]] = {
        "none": (lambda m: m, None),
    }
    if not eager_regions:
        out["per-layer checkpoint"] = (per_layer_checkpoint, None)
        out["SAC op list (save mm/SDPA)"] = (sac_op_list, None)
        out["compile memory budget 0.5"] = (lambda m: m, 0.5)
    for b in BUDGETS:
        out[f"auto({b})"] = (functools.partial(remat_kit.auto, budget=b), None)
    return out


def measure(args: argparse.Namespace, eager_regions: bool) -> dict[str, dict[str, Any]]:
    # One cache entry per strategy on the code objects they share (_RootForward._run).
    torch._dynamo.config.recompile_limit = 64
    base, idx, tgt = build(args)
    cells: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    for name, (apply, budget) in strategies(args, eager_regions).items():
        try:
            model = apply(_own_code(copy.deepcopy(base), len(cells)))
            plan_step(model, idx, tgt)
        except remat_kit.InfeasibleBudgetError as e:
            cells[name] = {"infeasible": str(e).split(" for ")[0]}
            continue
        # A fresh dynamo per strategy, so its graph breaks are counted from a first trace (auto
        # models share _RootForward._run's code: a later one's breaks went uncounted). The other
        # strategies recompile in the untimed warm-up round below.
        torch._dynamo.reset()
        ctx = memory_budget(budget) if budget is not None else contextlib.nullcontext()
        with ctx:
            compiled = torch.compile(model, backend=args.backend)

            def step(model=model, compiled=compiled) -> torch.Tensor:
                model.zero_grad(set_to_none=True)
                loss = compiled(idx, tgt)
                loss.backward()
                return loss

            torch.manual_seed(1)
            breaks = graph_breaks(step)
            torch.manual_seed(2)
            step()
            grads = [p.grad.clone() for p in model.parameters()]
            torch.manual_seed(3)
            saved = saved_bytes(lambda: compiled(idx, tgt), list(model.parameters()) + [idx, tgt])
        cells[name] = {"breaks": breaks, "saved_bytes": saved, "grads": grads, "budget": budget}
        steps[name] = (step, budget)
    ref = cells["none"]["grads"]
    for cell in cells.values():
        if "infeasible" in cell:
            continue
        pairs = zip(cell.pop("grads"), ref)
        cell["grad_err"] = max(float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in pairs)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for k in range(args.steps + 1):  # the first round warms up
        for name, (step, budget) in steps.items():  # interleaved: one round of every strategy per step
            with memory_budget(budget) if budget is not None else contextlib.nullcontext():
                t0 = time.perf_counter()
                step()
                if k:
                    times[name].append(time.perf_counter() - t0)
    none_t = statistics.median(times["none"])
    for name, ts in times.items():
        cells[name]["median_s"] = statistics.median(ts)
        cells[name]["time_ratio"] = statistics.median(ts) / none_t
        cells[name]["saved_ratio"] = cells[name]["saved_bytes"] / cells["none"]["saved_bytes"]
    return cells


def _table(cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| strategy | graph breaks | saved bytes | saved / compiled none | step time / compiled none | "
        "max grad error vs compiled none |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in cells.items():
        if "infeasible" in c:
            lines.append(f"| {name} | {c['infeasible']} (InfeasibleBudgetError) | | | | |")
            continue
        lines.append(
            f"| {name} | {c['breaks']} | {c['saved_bytes']:,} | {c['saved_ratio']:.3f} | "
            f"{c['time_ratio']:.2f} | {c['grad_err']:.1e} |"
        )
    return lines


NOTES = [
    "Reading the tables:",
    "",
    "- Before, saved bytes count only what the compiled graphs save: saved_tensors_hooks do not see inside the "
    "eager checkpoint regions, so the before figures are lower bounds, the same at every budget.",
    "- Before, the planned layers draw dropout from the eager generator while compiled none's dropout is "
    "Inductor's: the gradients are those of other masks (the grad-error column), not a wrong recompute. After, "
    "compiled auto draws what compiled none draws (errors at float rounding).",
    "- `compile memory budget` (torch._functorch.config.activation_memory_budget) recomputes dropout with fresh "
    "random numbers: its gradient error is pytorch#190758.",
    "- Step-time ratios come from a shared 2-core CPU under load from other jobs; ratios below 1 for a remat "
    "strategy are noise of that size.",
    "",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports/torch/compile.md")
    p.add_argument("--json", action="store_true", help="print this process's cells as JSON (the `before` run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    eager_regions = os.environ.get("REMAT_KIT_COMPILE_EAGER") == "1"
    cells = measure(args, eager_regions)
    if args.json:
        print("JSON" + json.dumps(cells))
        return
    env = dict(os.environ, REMAT_KIT_COMPILE_EAGER="1")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_bench", *(argv or sys.argv[1:]), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    before = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("JSON"))[4:])
    cmd = "python -m benchmarks.compile_bench " + " ".join(argv or sys.argv[1:])
    lines = [
        "# torch.compile: remat strategies compiled",
        "",
        f"Command: `{cmd}` (GPT {args.layers} layers, d {args.d}, seq {args.seq}, batch {args.batch}, dropout 0.1, "
        f"backend {args.backend}, {args.threads} threads, CPU, torch {torch.__version__}).",
        "",
        "Step time: medians of the steps, every strategy interleaved with compiled none in one process; saved bytes: "
        "distinct storages the compiled forward saves for backward (saved_tensors_hooks; parameters and inputs left "
        "out). The budget of `auto` bounds the eager step's activation peak (its plan is made from the eager "
        "profile); the saved/compiled-none column is the compiled figure.",
        "",
        "## After: planned layers compiled as selective-checkpoint policies",
        "",
        *_table(cells),
        "",
        "## Before: each planned layer a graph break running the eager replay (`REMAT_KIT_COMPILE_EAGER=1`, "
        "own process)",
        "",
        *_table(before),
        "",
        *NOTES,
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
