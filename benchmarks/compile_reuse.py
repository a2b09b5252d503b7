"""What turning Inductor's buffer reuse off in planned frames costs: compiled `auto` with and without it.

    python -m benchmarks.compile_reuse                  # writes reports/torch/compile_reuse.md
    python -m benchmarks.compile_reuse --d 128 --seq 128 --steps 5

Frames holding planned layers compile with `allow_buffer_reuse` off (remat_kit/_torch/_compiled.py,
`region_settings`): a buffer past its last read is freed instead of held for a later allocation
of its size, which held a recomputed qkv projection across a layer's backward peak and put
compiled `auto` over its budget (reports/torch/compile_budget.md). This prices that setting: the
same GPT, compiled by Inductor, as no remat, as `auto(b)` (reuse off, as shipped) and as `auto(b)`
compiled through a backend that turns reuse back on inside those frames' compile. Each compiled
model is warmed, then timed interleaved with the others: each round runs one step of each, in an
order rotating by round; a step's time is the process CPU time it took (`time.process_time`);
figures are medians over rounds, as ratios to compiled no remat from the same run. Beside them:
the activation peak of each compiled step read from Inductor's code (benchmarks/inductor_memory.py),
which also shows the reuse backend took effect.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch._inductor.codecache import PyCodeCache
from torch._inductor.compile_fx import compile_fx

import remat_kit
from benchmarks import inductor_memory
from benchmarks.models.torch_gpt import GPT, add_shape_args


def inductor_with_buffer_reuse(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """Inductor with buffer reuse on, whatever the settings around the compile say."""
    with inductor_config.patch(allow_buffer_reuse=True):
        return compile_fx(gm, example_inputs)


def compiled_step(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor, backend: Any) -> tuple:
    """(one training step of `model` compiled with `backend`, its activation peak in Inductor's code)."""
    compiled = torch.compile(model, backend=backend)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compiled(idx, tgt).backward()

    PyCodeCache.cache_clear()
    with inductor_config.patch(compile_threads=1):
        step()
    return step, inductor_memory.step_peak(inductor_memory.loaded_sources())


def interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median process CPU seconds per step over `rounds` rounds, after one untimed round."""
    names, times = list(steps), {n: [] for n in steps}
    for k in range(rounds + 1):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            t0 = time.process_time()
            steps[name]()
            if k:
                times[name].append(time.process_time() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def run(args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    base = GPT(layers=args.layers, d=args.d, heads=args.heads, vocab=args.vocab, seq=args.seq)
    base.train()
    idx = torch.randint(0, args.vocab, (args.batch, args.seq))
    tgt = torch.roll(idx, -1, 1)
    torch._dynamo.config.recompile_limit = 64  # one cache entry per model on the code they share
    steps, peaks = {}, {}
    steps["none"], peaks["none"] = compiled_step(copy.deepcopy(base), idx, tgt, "inductor")
    for b in args.budgets:
        for label, backend in (("reuse off (shipped)", "inductor"), ("reuse on", inductor_with_buffer_reuse)):
            model = remat_kit.auto(copy.deepcopy(base), b)
            model(idx, tgt).backward()  # plans eagerly
            name = f"auto({b}), {label}"
            steps[name], peaks[name] = compiled_step(model, idx, tgt, backend)
    cpu = interleaved(steps, args.steps)
    lines = ["| compiled | step time / none | activation peak (Inductor's code) |", "|---|---|---|"]
    for name in steps:
        lines.append(f"| {name} | {cpu[name] / cpu['none']:.3f} | {peaks[name]:,} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p, layers=4, d=256, heads=4, seq=256, vocab=2048, batch=4)
    p.add_argument("--steps", type=int, default=15, help="timed rounds")
    p.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=[0.3, 0.5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="reports/torch/compile_reuse.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = run(args)
    cmd = " ".join(["python -m benchmarks.compile_reuse", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Compiled `auto` with and without Inductor's buffer reuse",
        "",
        f"Command: `REMAT_KIT_CALIBRATE={os.environ.get('REMAT_KIT_CALIBRATE', '1')} {cmd}` (CPU, Inductor, torch {torch.__version__}, {args.threads} thread(s), "
        f"GPT {args.layers}x{args.d}, seq {args.seq}, batch {args.batch}, {args.steps} rounds). "
        "Generated by benchmarks/compile_reuse.py; its docstring says how each figure is measured. "
        "CPU times on a shared machine: ratios within this run, not GPU figures.",
        "",
        *table,
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
