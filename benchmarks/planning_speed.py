"""How long planning takes: 96-block chains of ~20-30 values per block (goal: under 1 s).

    python -m benchmarks.planning_speed [--repeats 5]

Each repeat builds a fresh graph (no cached menus) and solves at budgets 0.3 / 0.5 / 0.7 with the
chain DP; the median over repeats is reported. Figures go to reports/planning_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import remat_kit as rk
from benchmarks._report import write


def repeated_block_chain(num_blocks: int, per_block: int, seed: int, *, identical: bool) -> rk.CostGraph:
    """A chain whose blocks are random DAGs of `per_block` values (the same DAG in every block
    when `identical`, as in a transformer; a different one per block otherwise)."""
    vals = [rk.value("x", 4096, role="input"), rk.value("w", 1024, role="param")]
    prev = "x"
    for b in range(num_blocks):
        rng = random.Random(seed if identical else seed + b)
        local = [prev]
        for k in range(per_block - 1):
            deps = rng.sample(local[-4:], min(len(local[-4:]), rng.randint(1, 2))) + ["w"]
            name = f"blocks.{b}.op{k}"
            kind = rng.choice(["matmul", "elementwise", "norm", "attention", "rng", "view"])
            size = 0 if kind == "view" else rng.choice([1, 2, 4, 8]) * 4096
            reads = [d for d in deps if d != "w" and rng.random() < 0.8] + ([name] if rng.random() < 0.2 else [])
            vals.append(rk.value(name, size, kind=kind, flops=rng.randint(1, 64) * 4096 * (64 if kind == "matmul" else 1),
                                 deps=deps, bwd_reads=reads, block=b, module=f"blocks.{b}"))
            local.append(name)
        out = f"blocks.{b}.out"
        vals.append(rk.value(out, 4096, kind="elementwise", flops=4096, deps=[local[-1], local[0]], bwd_reads=[], block=b))
        prev = out
    vals.append(rk.value("loss", 4, kind="reduction", deps=[prev], bwd_reads=[], block=num_blocks - 1))
    return rk.CostGraph(vals)


CASES = {
    "transformer_96x20": lambda: rk.transformer_graph(num_layers=96, seq_len=2048, batch=1, hidden=1024, num_heads=16),
    "identical_96x30": lambda: repeated_block_chain(96, 30, 7, identical=True),
    "heterogeneous_96x30": lambda: repeated_block_chain(96, 30, 7, identical=False),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases:
        for budget in (0.3, 0.5, 0.7):
            times, plan = [], None
            for _ in range(args.repeats):
                graph = CASES[case]()
                start = time.perf_counter()
                try:
                    plan = rk.solve(graph, budget)
                except rk.InfeasibleBudgetError:
                    plan = None
                times.append(time.perf_counter() - start)
            rows.append({
                "case": case, "num_blocks": graph.num_blocks, "num_values": len(graph.activations),
                "budget": budget, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                "feasible": plan is not None,
                "activation_fraction": plan.activation_fraction if plan else None,
            })
            print(f"{case:22s} budget {budget}: median {rows[-1]['median_s']:.3f} s")
    lines = [
        "# Planning speed", "",
        "Chain DP (`rk.solve(graph, budget)`), fresh graph per repeat: block menus from the op-level",
        f"0-1 program (HiGHS) plus the DP. Median of {args.repeats} repeats. Goal: under 1 s for 96 blocks.", "",
        "| case | blocks | values | budget | median s | min s | max s | plan's activation fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = f"{r['activation_fraction']:.3f}" if r["feasible"] else "infeasible"
        lines.append(f"| {r['case']} | {r['num_blocks']} | {r['num_values']} | {r['budget']} | "
                     f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {frac} |")
    path = write("planning_speed", {"rows": rows}, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
