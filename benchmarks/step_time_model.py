"""Predicted recompute time beside measured extra step time, on the eager GPT.

    python -m benchmarks.step_time_model [--rounds 8] [--budgets 0.3 0.5 0.7]

`benchmarks.models.torch_gpt.GPT` (6 layers, d 512, seq 512, dropout), torch threads 2, one
process. `auto` plans with the device constants calibrated on this machine (matmul, copy and
per-op dispatch: remat_kit/_torch/_device.py). Each round steps no remat and every budget once,
in turn (interleaved, so load drifts hit all alike); the extra step time of a budget is the
median over rounds of (its step - that round's no-remat step). The prediction is the plan's
`predicted_recompute_seconds`. Target (issue 12): within 20% of each other at 0.3 / 0.5 / 0.7.
Figures go to reports/step_time_model.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import remat_kit as rk
from benchmarks._report import write
from benchmarks.models.torch_gpt import GPT


def step(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step. On a shared machine the CPU
    time is the steadier figure (other processes' load stretches wall time, not this one's work)."""
    model.zero_grad(set_to_none=True)
    start, cpu = time.perf_counter(), time.process_time()
    model(*inputs).backward()
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    # Calibrate in this process, under the load the steps then run under (a shared machine's
    # load moves its rates several-fold; the disk cache would hold whatever the first run saw).
    os.environ.setdefault("REMAT_KIT_CALIBRATE", "fresh")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = GPT(args.layers, args.d, args.heads, args.vocab, seq=args.seq).train()
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randint(0, args.vocab, (1, args.seq), generator=g) for _ in range(2))
    models = {"none": base}
    for b in args.budgets:
        models[f"auto {b}"] = rk.auto(copy.deepcopy(base), b)
    for m in models.values():  # plan (first call) and warm up
        step(m, inputs)
        step(m, inputs)
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            wall, used = step(m, inputs)
            times[name].append(wall)
            cpu[name].append(used)
    rows = []
    for b in args.budgets:
        name = f"auto {b}"
        plans = rk.plan_of(models[name]) or []
        predicted = sum(p.predicted_recompute_seconds for p in plans)
        extra = statistics.median(t - n for t, n in zip(times[name], times["none"]))
        extra_cpu = statistics.median(t - n for t, n in zip(cpu[name], cpu["none"])) / args.threads
        rows.append(
            {
                "budget": b,
                "median_step_s": statistics.median(times[name]),
                "ratio_to_none": statistics.median(times[name]) / statistics.median(times["none"]),
                "measured_extra_s": extra,
                "predicted_recompute_s": predicted,
                "predicted_over_measured": predicted / extra if extra > 0 else None,
                "measured_extra_cpu_s_per_thread": extra_cpu,
                "predicted_over_measured_cpu": predicted / extra_cpu if extra_cpu > 0 else None,
                "recompute_gflop": sum(p.predicted_recompute_flops for p in plans) / 1e9,
                "recomputed_ops": sum(p.num_recomputed_ops for p in plans),
                "activation_fraction": plans[0].activation_fraction if len(plans) == 1 else None,
            }
        )
    _report(args, rows, statistics.median(times["none"]))


def _report(args, rows, none_s) -> None:
    lines = [
        "# Predicted recompute time beside measured extra step time (eager torch)",
        "",
        f"GPT {args.layers} layers, d {args.d}, seq {args.seq}, vocab {args.vocab}, dropout 0.1, torch "
        f"{torch.__version__} on CPU, {args.threads} threads; {args.rounds} interleaved rounds in one process. ",
        f"No remat: median step {none_s * 1e3:.0f} ms (absolute CPU times are this machine's only). `auto` priced",
        "recompute with constants calibrated in the same process just before (`REMAT_KIT_CALIBRATE=fresh`).",
        "",
        "`measured extra`: median over rounds of (step - that round's no-remat step), wall clock; `CPU`: the",
        "same in process CPU time divided by the thread count.",
        "",
        "| budget | activation fraction | recompute GFLOP | recomputed ops | step / none | measured extra ms | "
        "predicted ms | predicted / measured | measured extra CPU ms | predicted / measured CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = "-" if r["activation_fraction"] is None else f"{r['activation_fraction']:.3f}"
        ratio = "-" if r["predicted_over_measured"] is None else f"{r['predicted_over_measured']:.2f}"
        ratio_cpu = "-" if r["predicted_over_measured_cpu"] is None else f"{r['predicted_over_measured_cpu']:.2f}"
        lines.append(
            f"| {r['budget']} | {frac} | {r['recompute_gflop']:.3f} | {r['recomputed_ops']} | "
            f"{r['ratio_to_none']:.3f} | {r['measured_extra_s'] * 1e3:.1f} | {r['predicted_recompute_s'] * 1e3:.1f} | "
            f"{ratio} | {r['measured_extra_cpu_s_per_thread'] * 1e3:.1f} | {ratio_cpu} |"
        )
    lines += [
        "",
        f"Load average when written: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: "
        "medians of paired differences, not minima).",
    ]
    print("\n".join(lines))
    path = write("step_time_model", {"rows": rows, "none_s": none_s}, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
