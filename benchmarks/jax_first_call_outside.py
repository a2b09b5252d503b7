"""JAX first call on models written outside this project: what `jax.jit(jax.grad(remat_kit.auto(loss,
budget)))` costs to compile against the plain step, how many compiles it makes, and what it lands
on, for the outside cases of `benchmarks/models/outside_jax.py` at their conformance size and
bigger.

    python -m benchmarks.jax_first_call_outside                         # ~30 min on a 2-core CPU
    python -m benchmarks.jax_first_call_outside --baseline /tmp/base    # before beside after

Each cell runs in a fresh process with an empty plan cache (a user's first run): the plain step
compiled, then auto's first call, then the plain step again; the ratio is auto's CPU time over the
mean of the two plain compiles around it (`time.process_time`: on a shared machine wall time
counts other people's work). Compiles are counted from jax's monitoring event, the final one
included (a plain compile is 1). Memory: `temp_size_in_bytes` of the user's compiled step over the
plain one's; FLOPs: XLA's count of both compiled steps (a scan body counted once). The device
constants are the uncalibrated defaults (`REMAT_KIT_CALIBRATE=0`) so that both trees plan the same
way; with `--baseline` the two trees alternate cell by cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax

from benchmarks.jax_first_call import COMPILE_EVENT

# (layers, hidden, heads, ffn, vocab, batch, seq): the conformance size, and one where the
# activations, not XLA's own buffers, dominate no remat's temp.
SHAPES = {"tiny": (4, 32, 4, 64, 64, 2, 32), "mid": (4, 256, 8, 1024, 1024, 2, 256)}
CASES = ["equinox-transformer", "flax-lm1b", "penzai-gemma2", "penzai-llama-stack"]


def worker(case: str, shape: str, budget: float) -> dict:
    """One process: plain compile, auto's first call, plain compile (see the module doc)."""
    import remat_kit
    from benchmarks.models import outside_jax
    from remat_kit.measure import jax_flops

    (
        outside_jax.LAYERS,
        outside_jax.HIDDEN,
        outside_jax.HEADS,
        outside_jax.FFN,
        outside_jax.VOCAB,
        outside_jax.BATCH,
        outside_jax.SEQ,
    ) = SHAPES[shape]
    model = outside_jax.cases()[case].build()
    seen = {"count": 0}
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: seen.__setitem__("count", seen["count"] + (event == COMPILE_EVENT))
    )

    def timed(f) -> tuple[dict, Any]:
        """CPU time and compiles of the step's first call; a refusal's up to the raise."""
        before, c = seen["count"], time.process_time()
        try:
            compiled = jax.jit(jax.grad(f, has_aux=model.has_aux)).lower(model.params, model.batch).compile()
        except remat_kit.InfeasibleBudgetError as e:
            compiled, refused = None, {"refused": round(e.smallest_fraction, 4)}
        else:
            refused = {}
        return {"cpu_s": time.process_time() - c, "compiles": seen["count"] - before, **refused}, compiled

    plain, none = timed(lambda p, b: model.loss(p, b))
    wrapped = remat_kit.auto(model.loss, budget)
    auto, compiled = timed(wrapped)
    after, _ = timed(lambda p, b: model.loss(p, b))
    out = {"plain": plain, "after": after, "auto": auto}
    if compiled is not None:
        plan = remat_kit.plan_of(wrapped)[-1]
        none_bytes = none.memory_analysis().temp_size_in_bytes
        out.update(
            fraction=compiled.memory_analysis().temp_size_in_bytes / none_bytes,
            extra_flops=jax_flops(compiled) / jax_flops(none) - 1,
            solver=plan.solver,
        )
    return out


def _spawn(tree: str, case: str, shape: str, budget: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="remat_kit_fco_") as cache:
        env = {**os.environ, "PYTHONPATH": tree, "REMAT_KIT_CACHE_DIR": cache, "REMAT_KIT_CALIBRATE": "0"}
        cmd = [sys.executable, "-m", "benchmarks.jax_first_call_outside", "--worker", case, shape, str(budget)]
        out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {cmd} in {tree} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["ratio_cpu"] = row["auto"]["cpu_s"] / statistics.mean([row["plain"]["cpu_s"], row["after"]["cpu_s"]])
    return row


def _cell(row: dict) -> str:
    a = row["auto"]
    if "refused" in a:
        return f"{row['ratio_cpu']:.1f}x, {a['compiles']} compiles, refused: names {a['refused']:.3f}"
    return (
        f"{row['ratio_cpu']:.1f}x, {a['compiles']} compiles, {row['fraction']:.3f}, "
        f"{row['extra_flops']:+.1%}, {row['solver']}"
    )


def report(rows: list[dict], labels: list[str], command: str) -> str:
    lines = [
        "| model | size | budget | " + " | ".join(labels) + " |",
        "|---|---|---:|" + "---|" * len(labels),
    ]
    keys = sorted({(r["case"], r["shape"], r["budget"]) for r in rows}, key=lambda k: (k[0], k[1] != "tiny", k[2]))
    for case, shape, budget in keys:
        cells = []
        for label in labels:
            mine = [r for r in rows if (r["case"], r["shape"], r["budget"], r["label"]) == (case, shape, budget, label)]
            cells.append(_cell(mine[0]) if mine else "-")
        lines.append(f"| {case} | {shape} {SHAPES[shape]} | {budget} | " + " | ".join(cells) + " |")
    cell = "first call / plain compile (CPU), compiles, compiled fraction of no remat, extra FLOPs, solver"
    return f"Command: `{command}`\n\nEach cell: {cell}.\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--baseline", default=None, help="a source tree to run beside this one, cell by cell")
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default="reports/jax/first_call_outside")
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        case, shape, budget = args.worker
        print(json.dumps(worker(case, shape, float(budget))))
        return
    trees = {"before": os.path.abspath(args.baseline)} if args.baseline else {}
    trees[args.label] = os.getcwd()
    rows = []
    for case in args.cases:
        for shape in args.shapes:
            for budget in args.budgets:
                for label, tree in trees.items():
                    row = {
                        "case": case,
                        "shape": shape,
                        "budget": budget,
                        "label": label,
                        **_spawn(tree, case, shape, budget),
                    }
                    rows.append(row)
                    print(label, case, shape, budget, _cell(row), flush=True)
    command = " ".join(["python -m benchmarks.jax_first_call_outside", *(argv if argv is not None else sys.argv[1:])])
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, "jax": jax.__version__, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("# JAX first call on outside models\n\n" + report(rows, list(trees), command))
    print(args.out + ".md")


if __name__ == "__main__":
    main()
