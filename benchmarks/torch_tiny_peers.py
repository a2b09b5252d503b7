"""`auto` against the per-layer and sqrt(n) checkpoints on the sweep's tiny torch models (issue 12).

On models this small the step time is mostly per-op and per-region overhead, not FLOPs: the
case where `auto`'s plan must count what running a plan costs, not only what it recomputes.
For each model (`benchmarks.models.torch_zoo`, size tiny) and strategy: activation memory of one
step (the live-storage tracker, `remat_kit.measure.torch_step`) as a fraction of no remat, the
gradients' largest relative difference from no remat, and the step's process CPU time as a ratio
to no remat's: every strategy steps in turn, round-robin in an order rotated by one each round
(`--steps` rounds after `--warmup`), ratio of medians, on one thread so that the ratio is not the
scheduler's.

    python -m benchmarks.torch_tiny_peers

Writes reports/torch/tiny_peers.md (with the command that produced it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import remat_kit as rk
from benchmarks._cells import Cell
from benchmarks._torch_cell import apply
from benchmarks.models.torch_zoo import build
from remat_kit.measure import torch_step

STRATEGIES = ("none", "all", "sqrt_n", "auto")


def _strategy(name: str, strategy: str, budget: float) -> tuple[Callable[[], None], torch.nn.Module, tuple]:
    model, batch = build(name, "tiny")
    fn = apply(model, Cell("torch", name, "tiny", strategy, budget if strategy == "auto" else None))

    def step() -> None:
        model.zero_grad(set_to_none=False)
        fn(*batch).backward()

    return step, model, batch


def _grads(model: torch.nn.Module, batch: tuple) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model(*batch).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _plan_label(model: torch.nn.Module) -> str:
    """The plan's solver, and its checkpoint regions over several layers (if any)."""
    plans = rk.plan_of(model)
    if not plans:
        return ""
    merged = ["+".join(seg) for seg in plans[-1].segments if len(seg) > 1]
    return plans[-1].solver + (f"; one region over {', '.join(merged)}" if merged else "")


def measure(name: str, budget: float, steps: int, warmup: int) -> list[dict]:
    runs = {s: _strategy(name, s, budget) for s in STRATEGIES}
    ref = _grads(runs["none"][1], runs["none"][2])
    base = torch_step(runs["none"][1], runs["none"][2], loss_fn=lambda x: x, count_flops=False).activation_bytes
    rows = []
    for s, (step, model, batch) in runs.items():
        step()  # auto plans on its first call
        grads = _grads(model, batch)
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads, ref))
        act = torch_step(model, batch, loss_fn=lambda x: x, count_flops=False).activation_bytes
        rows.append(
            dict(strategy=s, activation=act / base, grad_err=err, plan=_plan_label(model) if s == "auto" else "")
        )
    for _ in range(warmup):
        for step, _, _ in runs.values():
            step()
    times: dict[str, list[float]] = {s: [] for s in runs}
    names = list(runs)
    for k in range(steps):
        # The order rotates by one each round, so no strategy always follows the same one (the
        # one before leaves the caches in its state: a fixed order moved ratios by up to 0.05).
        for s in names[k % len(names) :] + names[: k % len(names)]:
            step = runs[s][0]
            t0 = time.process_time()
            step()
            times[s].append(time.process_time() - t0)
    none = statistics.median(times["none"])
    for row in rows:
        row["cpu_ratio"] = statistics.median(times[row["strategy"]]) / none
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt,mlp")
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="reports/torch/tiny_peers.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "# auto against per-layer and sqrt(n) checkpoint on the tiny torch models",
        "",
        f"Command: `{' '.join(['python -m benchmarks.torch_tiny_peers', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        f"CPU, 1 thread, torch {torch.__version__}; {args.steps} round-robin steps after {args.warmup} warm-up "
        "rounds; `cpu ratio`: median process CPU time per step over no remat's, in the same run. "
        f"`activation`: live-storage peak as a fraction of no remat's; `auto` at budget {args.budget:g}.",
        "",
        "| model | strategy | activation | cpu ratio | grad rel err | auto's plan |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.models.split(","):
        for row in measure(name, args.budget, args.steps, args.warmup):
            lines.append(
                f"| {name} | {row['strategy']} | {row['activation']:.3f} | {row['cpu_ratio']:.2f} | "
                f"{row['grad_err']:.1e} | {row['plan']} |"
            )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
