"""How far each solver is from the optimum, on random graphs small enough to enumerate.

    python -m benchmarks.solver_quality [--graphs 200]

For each graph and budget: brute force over every plan (the optimum under the simulator), then
`dp`, `milp` and `greedy`. The gap is (solver's recompute cost - optimum) / optimum. The MILP and
the DP are tested to be exact (tests/test_solvers.py); this reports the greedy's gap and how often
the DP's menus miss the optimum. Figures go to reports/solver_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import math
import statistics

import remat_kit as rk
from benchmarks._report import write
from remat_kit._core.simulate import baseline_activation_bytes
from remat_kit._core.solve import Costs
from tests.graphs import brute_force, random_chain
from tests.test_solvers import _codes_of


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=int, default=200)
    args = parser.parse_args(argv)
    gaps: dict[str, list[float]] = {s: [] for s in rk.SOLVERS}
    infeasible_misses = {s: 0 for s in rk.SOLVERS}
    cells = 0
    for seed in range(args.graphs):
        graph = random_chain(seed)
        costs = Costs(graph, rk.DeviceSpec())
        base = baseline_activation_bytes(graph)
        for frac in (0.3, 0.5, 0.7, 0.9):
            best = brute_force(graph, math.floor(frac * base), costs)
            if best is None or best[0][0] == 0:
                continue
            cells += 1
            for solver in rk.SOLVERS:
                try:
                    plan = rk.solve(graph, frac, solver=solver)
                except rk.InfeasibleBudgetError:
                    infeasible_misses[solver] += 1
                    continue
                got = costs.of(_codes_of(graph, plan))[0]
                gaps[solver].append((got - best[0][0]) / best[0][0])
    lines = [
        "# Solver quality against brute force", "",
        f"{args.graphs} random chains (1-3 blocks of 2-3 ops plus boundaries), budgets 0.3/0.5/0.7/0.9; "
        f"{cells} cells where the optimum recomputes something.", "",
        "| solver | cells solved | optimal | median gap | mean gap | max gap | said infeasible wrongly |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for solver, g in gaps.items():
        row = {
            "solver": solver, "solved": len(g), "optimal": sum(x <= 1e-12 for x in g),
            "median_gap": statistics.median(g) if g else None, "mean_gap": statistics.fmean(g) if g else None,
            "max_gap": max(g) if g else None, "wrongly_infeasible": infeasible_misses[solver],
        }
        rows.append(row)
        lines.append(f"| {solver} | {row['solved']} | {row['optimal']} | {row['median_gap']:.1%} | "
                     f"{row['mean_gap']:.1%} | {row['max_gap']:.1%} | {row['wrongly_infeasible']} |")
        print(lines[-1])
    path = write("solver_quality", {"rows": rows, "cells": cells}, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
