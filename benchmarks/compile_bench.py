"""Compiled remat strategies side by side: step time, saved bytes, peak memory, graph breaks.

    python -m benchmarks.compile_bench                      # writes reports/torch/compile.md
    python -m benchmarks.compile_bench --layers 2 --d 64    # smaller

Every strategy is `torch.compile`d (Inductor by default) in one process and timed interleaved
with compiled no remat: each round runs one step of every strategy, in an order that rotates by
round, and a step's time is the process CPU time it took (`time.process_time`: on a machine
shared with other jobs, time another job holds the cores does not count); ratios are medians
over rounds, to compiled none. Memory is measured independently of remat_kit's cost model, two
ways: the bytes of the distinct storages the compiled forward saves for its backward
(`torch.autograd.graph.saved_tensors_hooks` around the forward; parameters and inputs left out),
and the step's peak memory, the rise of the process's resident set over one step (`VmHWM` reset
through `/proc/self/clear_refs`; glibc told, while the peaks are read, to mmap every block of
16 KiB or more so a freed block leaves the resident set, and for the timed rounds after them to
serve blocks from its heap as its defaults settle in a training process, `steady_heap`;
parameters and inputs allocated before the step,
gradients set to None before it as `zero_grad(set_to_none=True)` leaves them in a training loop).
That peak holds the parameter gradients the backward has made by then; the peak less all of them
(distinct storages) is reported beside it, so the activation peak lies between the two. Each is
measured the same way for the eager step of the same model, which is what the budget bounds.
A third, exact reading: the activation peak of the compiled graphs from the code Inductor
generated for them (benchmarks/inductor_memory.py), which is what the budget is held to under
compile.

Strategies: compiled none; per-layer `checkpoint` (non-reentrant); torchtitan-style SAC op list
(save mm / addmm / SDPA, recompute the rest); torch's own `activation_memory_budget` (the
partitioner's knapsack, with its gradient error against compiled none: pytorch#190758); and
`remat_kit.auto` at `--budgets` and at per-layer checkpoint's eager activation fraction (the
smallest budget that compares the two at equal eager memory), as planned layers compile today
(selective-checkpoint policies, `after`) and, with `--before`, as they ran before issue 12 (each
planned layer a graph break running the eager replay: `REMAT_KIT_COMPILE_EAGER=1`, in a
subprocess).
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
from torch._inductor.codecache import PyCodeCache
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import remat_kit
from benchmarks import inductor_memory
from benchmarks._compile_report import section, write_section
from benchmarks.models.torch_gpt import GPT, add_shape_args

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


_EXACT = False  # whether exact_rss's thresholds are the process's now


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL("libc.so.6")


def exact_rss() -> None:
    """From here on glibc unmaps every freed block of 16 KiB or more (its default threshold grows
    to 32 MiB and keeps freed blocks resident), so the resident set follows the live allocations
    and its high-water mark is a step's peak."""
    global _EXACT
    _libc().mallopt(-3, 16 * 1024)  # M_MMAP_THRESHOLD (setting it also stops glibc raising it)
    _libc().mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    _EXACT = True


def steady_heap() -> None:
    """From here on glibc serves blocks up to 32 MiB from its heap and keeps up to 64 MiB of freed
    heap: where its defaults settle in a process that has freed blocks that large (the mmap
    threshold rises to each freed mapped block's size, up to 32 MiB, the trim threshold to twice
    it), as a training loop's has after its first steps. Steps timed under `exact_rss` pay a fresh
    mapping and its page faults for every block of 16 KiB or more, so a step is charged by how
    many buffers it allocates (compiled `auto`'s regions reuse none) rather than by its work."""
    global _EXACT
    _libc().mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
    _libc().mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD
    _EXACT = False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field))


def peak_rss_bytes(step: Callable[[], Any]) -> int:
    """How far the process's resident set rises above where it stood while `step()` runs (Linux:
    the high-water mark is reset through /proc/self/clear_refs; the kernel batches its RSS counts
    per thread, so the figure is good to tens of pages)."""
    if not _EXACT:
        exact_rss()
    _libc().malloc_trim(0)  # free heap pages, resident since steps run under glibc's defaults, given back
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS:")
    step()
    return _status_bytes("VmHWM:") - before


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


def eager_activation_bytes(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> int:
    """The eager step's peak activation bytes as remat_kit's budget counts them."""
    return remat_kit.measure.torch_step(
        model, (idx, tgt), loss_fn=lambda loss: loss, count_flops=False
    ).activation_bytes


def strategies(args: argparse.Namespace, eager_regions: bool, at_checkpoint: float | None) -> dict[str, tuple]:
    """name -> (apply to a GPT, torch's activation_memory_budget or None)."""
    out: dict[str, tuple[Callable[[GPT], GPT], Any]] = {"none": (lambda m: m, None)}
    if not eager_regions:
        out["per-layer checkpoint"] = (per_layer_checkpoint, None)
        out["SAC op list (save mm/SDPA)"] = (sac_op_list, None)
        out["compile memory budget 0.5"] = (lambda m: m, 0.5)
    budgets = sorted(set(args.budgets) | ({at_checkpoint} if at_checkpoint else set()))
    for b in budgets:
        label = f"auto({b})" + (" = per-layer checkpoint's eager fraction" if b == at_checkpoint else "")
        out[label] = (functools.partial(remat_kit.auto, budget=b), None)
    return out


def _compile(model: GPT, budget: Any, args: argparse.Namespace, idx: torch.Tensor, tgt: torch.Tensor) -> tuple:
    """(the step of compiled `model`, its cell: graph breaks, saved bytes, gradients)."""
    # A fresh dynamo per strategy, so its graph breaks are counted from a first trace (auto models
    # share _RootForward._run's code: a later one's breaks went uncounted). The other strategies
    # recompile in the untimed warm-up round.
    torch._dynamo.reset()
    with memory_budget(budget) if budget is not None else contextlib.nullcontext():
        compiled = torch.compile(model, backend=args.backend)

        def step(set_to_none: bool = True) -> torch.Tensor:
            model.zero_grad(set_to_none=set_to_none)
            loss = compiled(idx, tgt)
            loss.backward()
            return loss

        def eager_step() -> None:
            model.zero_grad(set_to_none=True)
            model(idx, tgt).backward()

        step.model, step.eager = model, eager_step  # type: ignore[attr-defined]

        torch.manual_seed(1)
        PyCodeCache.cache_clear()  # the modules loaded from here on are this strategy's graphs
        breaks = graph_breaks(step)
        code_peak = _code_peak(args.backend)
        torch.manual_seed(2)
        step()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.manual_seed(3)
        saved = saved_bytes(lambda: compiled(idx, tgt), list(model.parameters()) + [idx, tgt])
    return step, {"breaks": breaks, "saved_bytes": saved, "grads": grads, "budget": budget, "code_peak": code_peak}


def _code_peak(backend: str) -> int | str | None:
    """The compiled step's activation peak read from Inductor's generated code (None for another
    backend; the reason where the code cannot be read)."""
    if backend != "inductor":
        return None
    try:
        return inductor_memory.step_peak(inductor_memory.loaded_sources())
    except inductor_memory.UnreadableCode as e:
        return str(e)


def _rounds(steps: dict[str, tuple], rounds: int, measure_one: Callable[[Callable], float]) -> dict[str, list[float]]:
    """`measure_one(step)` for every strategy in each of `rounds` rounds (after one untimed round),
    the order rotated by one each round so no strategy always follows the same one."""
    names = list(steps)
    out: dict[str, list[float]] = {n: [] for n in names}
    for k in range(rounds + 1):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            step, budget = steps[name]
            with memory_budget(budget) if budget is not None else contextlib.nullcontext():
                value = measure_one(step)
            if k:
                out[name].append(value)
    return out


def _cpu_seconds(step: Callable[[], Any]) -> float:
    t0 = time.process_time()
    step()
    return time.process_time() - t0


def grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters' gradients one step leaves (distinct storages: tied weights once)."""
    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())


def _peak(step: Callable[..., Any]) -> float:
    """The compiled step's rise, gradients set to None before it (and before the reading it rises from)."""
    step()  # warm: the first call after another strategy's may still allocate caches
    step.model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    return float(peak_rss_bytes(step))


def _eager_peak(step: Callable[..., Any]) -> float:
    """The same model's eager step by the same measure (where the budget is planned and held)."""
    step.eager()  # type: ignore[attr-defined]
    step.model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    return float(peak_rss_bytes(step.eager))  # type: ignore[attr-defined]


def measure(args: argparse.Namespace, eager_regions: bool) -> dict[str, dict[str, Any]]:
    # One cache entry per strategy on the code objects they share (_RootForward._run).
    torch._dynamo.config.recompile_limit = 64
    exact_rss()  # before any step: no heap grown under glibc's defaults stays resident
    base, idx, tgt = build(args)
    none_eager = eager_activation_bytes(copy.deepcopy(base), idx, tgt)
    checkpoint_eager = eager_activation_bytes(per_layer_checkpoint(copy.deepcopy(base)), idx, tgt)
    # Rounded up: the smallest budget at per-layer checkpoint's eager memory that names it.
    at_checkpoint = None if eager_regions else -(-checkpoint_eager * 10_000 // none_eager) / 10_000
    cells: dict[str, dict[str, Any]] = {}
    steps: dict[str, tuple] = {}
    for name, (apply, budget) in strategies(args, eager_regions, at_checkpoint).items():
        try:
            model = apply(_own_code(copy.deepcopy(base), len(cells)))
            plan_step(model, idx, tgt)
        except remat_kit.InfeasibleBudgetError as e:
            cells[name] = {"infeasible": str(e).split(" for ")[0]}
            continue
        eager = eager_activation_bytes(model, idx, tgt) if budget is None else none_eager
        step, cells[name] = _compile(model, budget, args, idx, tgt)
        cells[name]["eager_ratio"] = eager / none_eager
        cells[name]["auto_budget"] = getattr(apply, "keywords", {}).get("budget")
        steps[name] = (step, budget)
    ref = cells["none"]["grads"]
    for cell in cells.values():
        if "infeasible" not in cell:
            cell["grad_err"] = remat_kit.measure.rel_err(cell.pop("grads"), ref)
    peaks = _rounds(steps, 5, _peak)
    eager_peaks = _rounds({n: (s, b) for n, (s, b) in steps.items() if b is None}, 5, _eager_peak)
    steady_heap()  # timed as a training process runs, after the peaks (which need exact_rss)
    times = _rounds(steps, args.steps, _cpu_seconds)
    grads = grad_bytes(base)
    none_t = statistics.median(times["none"])
    none_act = statistics.median(peaks["none"]) - grads
    for name in steps:
        c = cells[name]
        c.update(cpu_s=statistics.median(times[name]), peak_bytes=int(statistics.median(peaks[name])))
        c["grad_bytes"] = grads
        c["peak_less_grads"] = c["peak_bytes"] - grads
        if name in eager_peaks:
            c["eager_peak_bytes"] = int(statistics.median(eager_peaks[name]))
        c["time_ratio"] = c["cpu_s"] / none_t
        c["saved_ratio"] = c["saved_bytes"] / cells["none"]["saved_bytes"]
        c["peak_ratio"] = c["peak_less_grads"] / none_act if none_act > 0 else float("nan")
        if c["auto_budget"] is not None:
            c["budget_bytes"] = int(c["auto_budget"] * none_eager)
    return cells


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p, layers=4, d=256, heads=4, seq=256, vocab=2048, batch=4)
    p.add_argument("--steps", type=int, default=20, help="timed rounds")
    p.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=list(BUDGETS))
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", action="store_true", help="also run auto as before issue 12, in a subprocess")
    p.add_argument("--out", default="reports/torch/compile.md")
    p.add_argument("--json", action="store_true", help="print this process's cells as JSON (the `before` run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells = measure(args, os.environ.get("REMAT_KIT_COMPILE_EAGER") == "1")
    if args.json:
        print("JSON" + json.dumps(cells))
        return
    before = None
    if args.before:
        flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--before"]
        run = subprocess.run(
            [sys.executable, "-m", "benchmarks.compile_bench", *flags, "--json"],
            env=dict(os.environ, REMAT_KIT_COMPILE_EAGER="1"),
            capture_output=True,
            text=True,
            check=True,
        )
        before = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("JSON"))[4:])
    cmd = "python -m benchmarks.compile_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = section(args, cmd, cells, before)
    write_section(args.out, f"{args.layers}x{args.d}x{args.seq}x{args.batch}", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
