"""JAX first call: what `jax.jit(jax.grad(remat_kit.auto(loss, budget)))` costs to compile, against
the same step without remat, on `jax_bench`'s scanned GPT (8 layers, d 256, seq 256, dropout).

    python -m benchmarks.jax_first_call                       # ~10 min on a loaded 2-core CPU
    python -m benchmarks.jax_first_call --reps 1 --quick      # smoke run
    python -m benchmarks.jax_first_call --label before --out /tmp/x   # run against another checkout

Each measurement runs in a fresh process, as a user's run does: it compiles the plain step, then
auto's first call, then the plain step again, and divides auto's time by the mean of the two plain
compiles around it (interleaved: ratios from one process, whatever else loads the machine).
"cold" is a first run (an empty plan cache), "warm" a second run of the same program (the plan
cache the cold run left). Repetitions alternate budgets; the report quotes the median ratio.
Time is the wall time of trace + plan + verification + the final compile, with CPU time
(`time.process_time`) beside it, since on a shared machine wall time also counts other people's
work. Compiles are counted from jax's own monitoring event (`/jax/core/compile/backend_compile_duration`).
Memory: `temp_size_in_bytes` of the user's compiled step against the plain one's. FLOPs: the
step with its layer scan unrolled, counted on the lowered program (before XLA can merge a
recompute into the forward), beside the stock policies' counted the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax

import remat_kit
from benchmarks.jax_bench import Config, init, make_loss
from remat_kit.measure import jax_auto_flops_unrolled, jax_flops

POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _config(quick: bool) -> Config:
    return Config(layers=4, seq=128, d=128, heads=4) if quick else Config(layers=8, seq=256, d=256)


def _inputs(cfg: Config) -> tuple:
    params = init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab)
    return params, (tokens, jax.random.key(2))


def _two_arg(loss):
    """loss(params, (tokens, key)): the (params, batch) call `remat_kit.measure` counts FLOPs on."""
    return lambda params, batch: loss(params, *batch)


def worker(cfg: Config, budget: float, flops: bool) -> dict:
    """One process: plain compile, auto's first call, plain compile (see the module doc)."""
    seen = {"count": 0}

    def on(event: str, duration: float, **_: Any) -> None:
        seen["count"] += event == COMPILE_EVENT

    jax.monitoring.register_event_duration_secs_listener(on)
    params, batch = _inputs(cfg)

    def timed(f) -> dict:
        before = seen["count"]
        w, c = time.perf_counter(), time.process_time()
        compiled = jax.jit(jax.grad(f)).lower(params, batch).compile()
        return {
            "wall_s": time.perf_counter() - w,
            "cpu_s": time.process_time() - c,
            "compiles": seen["count"] - before,
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        }

    before = timed(_two_arg(make_loss(cfg)))
    wrapped = remat_kit.auto(_two_arg(make_loss(cfg)), budget)
    auto = timed(wrapped)
    after = timed(_two_arg(make_loss(cfg)))
    plan = remat_kit.plan_of(wrapped)[0]
    out = {
        "before": before,
        "auto": auto,
        "after": after,
        "model_fraction": plan.activation_fraction,
        "plan": plan.summary(),
    }
    if flops:
        out["flops"] = jax_auto_flops_unrolled(wrapped, params, batch)
    return out


def run(
    cfg: Config,
    budgets: list[float],
    reps: int,
    quick: bool,
    trees: dict[str, str],
    states: list[str],
    cpus: int | None,
) -> dict[str, dict]:
    """One result per label of `trees` (label -> source tree whose worker runs), measured
    interleaved: every repetition runs each budget on each tree in turn."""
    runs = {t: {b: {s: [] for s in ("cold", "warm")} for b in budgets} for t in trees}
    root = tempfile.mkdtemp(prefix="remat_kit_first_call_")  # the device calibration stays; plans/ goes
    try:
        # The first worker would measure the device calibration (its own microbenchmark
        # compiles) into the shared cache: done once beforehand, outside the figures.
        _spawn(0.5, True, root, False, next(iter(trees.values())), cpus)  # feasible on the quick model
        for rep in range(reps):
            for b in budgets:
                for label, tree in trees.items():
                    shutil.rmtree(os.path.join(root, "plans"), ignore_errors=True)
                    for state in states:
                        row = _spawn(b, quick, root, rep == 0 and state == "cold", tree, cpus)
                        runs[label][b][state].append(row)
                        print(
                            f"{label} auto@{b} {state}: {row['ratio_wall']:.2f}x wall, {row['ratio_cpu']:.2f}x CPU, "
                            f"{row['auto']['compiles']} compiles",
                            flush=True,
                        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {label: _result(cfg, budgets, by_budget) for label, by_budget in runs.items()}


def _result(cfg: Config, budgets: list[float], runs: dict) -> dict:
    params, batch = _inputs(cfg)
    plain = [r["before"] for b in budgets for r in runs[b]["cold"]]
    none_temp = plain[0]["temp_bytes"]
    none_flops = jax_flops(jax.jit(jax.grad(_two_arg(make_loss(cfg, unroll=cfg.layers)))).lower(params, batch))
    result: dict[str, Any] = {
        "plain": {k: statistics.median(r[k] for r in plain) for k in ("wall_s", "cpu_s", "compiles")},
        "none_temp_bytes": none_temp,
        "none_flops": none_flops,
        "auto": {},
        "policies": {},
    }
    for name, pol in POLICIES.items():
        compiled = jax.jit(jax.grad(_two_arg(make_loss(cfg, pol)))).lower(params, batch).compile()
        flops = jax_flops(jax.jit(jax.grad(_two_arg(make_loss(cfg, pol, unroll=cfg.layers)))).lower(params, batch))
        result["policies"][name] = {
            "fraction": compiled.memory_analysis().temp_size_in_bytes / none_temp,
            "extra_flops": flops / none_flops - 1,
        }
    for b in budgets:
        cold = runs[b]["cold"]
        result["auto"][str(b)] = {
            "budget": b,
            "cold": _summary(cold),
            "warm": _summary(runs[b]["warm"]),
            "fraction": cold[0]["auto"]["temp_bytes"] / cold[0]["before"]["temp_bytes"],
            "model_fraction": cold[0]["model_fraction"],
            "extra_flops": cold[0]["flops"] / none_flops - 1,
            "plan": cold[0]["plan"],
        }
    return result


def _spawn(budget: float, quick: bool, root: str, flops: bool, tree: str, cpus: int | None) -> dict:
    cmd = (
        [sys.executable, "-m", "benchmarks.jax_first_call", "--worker", str(budget)]
        + ["--quick"] * quick
        + ["--flops"] * flops
        + ["--cpus", str(cpus)] * (cpus is not None)
    )
    env = {**os.environ, "REMAT_KIT_CACHE_DIR": root, "PYTHONPATH": tree}
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {cmd} in {tree} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    for k in ("wall", "cpu"):
        row[f"ratio_{k}"] = row["auto"][f"{k}_s"] / ((row["before"][f"{k}_s"] + row["after"][f"{k}_s"]) / 2)
    return row


def _summary(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    return {
        "wall_ratio": statistics.median(r["ratio_wall"] for r in rows),
        "cpu_ratio": statistics.median(r["ratio_cpu"] for r in rows),
        "wall_ratios": [r["ratio_wall"] for r in rows],
        "cpu_ratios": [r["ratio_cpu"] for r in rows],
        "compiles": statistics.median(r["auto"]["compiles"] for r in rows),
        "fractions": [r["auto"]["temp_bytes"] / r["before"]["temp_bytes"] for r in rows],
    }


def write(result: dict, out_dir: str, label: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"first_call_{label}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    return path


def report(out_dir: str, labels: list[str]) -> None:
    """`out_dir`/first_call.md from the first_call_<label>.json beside it."""
    runs = {}
    for label in labels:
        path = os.path.join(out_dir, f"first_call_{label}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[label] = json.load(f)
    lines = ["# JAX first call: `jax.jit(jax.grad(remat_kit.auto(loss, budget)))` against the plain compile", ""]
    for label, r in runs.items():
        lines += [
            f"## {label}",
            "",
            f"Command: `{r['command']}` (code at {r['commit']})  ",
            f"Device: {r['device']}, jax {r['jax']}; model {r['config']}; {r['reps']} repetitions, interleaved.  ",
            f"Plain compile (trace + compile): median {r['plain']['wall_s']:.2f} s wall, {r['plain']['cpu_s']:.2f} s CPU.  ",
            "Stock policies: "
            + "; ".join(
                f"{n} {p['fraction']:.3f} of no remat, {p['extra_flops']:+.2%} FLOPs" for n, p in r["policies"].items()
            ),
            "",
            "| budget | first call / plain (wall) | (CPU) | compiles | second run / plain (wall) | (CPU) | compiles "
            "| compiled fraction | model fraction | extra FLOPs |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for b, a in r["auto"].items():
            warm = a["warm"]  # None where the run measured cold workers only (--states cold)
            second = (
                f"{warm['wall_ratio']:.2f}x | {warm['cpu_ratio']:.2f}x | {warm['compiles']:g}" if warm else "- | - | -"
            )
            lines.append(
                f"| {b} | {a['cold']['wall_ratio']:.2f}x | {a['cold']['cpu_ratio']:.2f}x | {a['cold']['compiles']:g} | "
                f"{second} | {a['fraction']:.3f} | {a['model_fraction']:.3f} | {a['extra_flops']:+.2%} |"
            )
        lines.append("")
    lines += [
        "Compiles count every backend compile of the call, the final one included (a plain compile is 1). "
        "The ratio is auto's time over the mean of the plain compiles just before and after it. "
        "See `benchmarks/jax_first_call.py` for the method."
    ]
    with open(os.path.join(out_dir, "first_call.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 4-layer, d-128 model (smoke run)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--label", default="after", help="the JSON's name: first_call_<label>.json")
    ap.add_argument("--commit", default="", help="the code's commit, for the report")
    ap.add_argument("--out", default="reports/jax")
    ap.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--baseline",
        default=None,
        help="a source tree (e.g. `git archive` of an older commit) measured as 'before', interleaved",
    )
    ap.add_argument("--states", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    ap.add_argument("--cpus", type=int, default=None, help="pin each worker to this many CPUs (1: a one-core machine)")
    args = ap.parse_args(argv)
    cfg = _config(args.quick)
    if args.worker is not None:
        if args.cpus is not None:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
        print(json.dumps(worker(cfg, args.worker, args.flops)))
        return
    dev = jax.devices()[0]
    trees = {"before": os.path.abspath(args.baseline)} if args.baseline else {}
    trees[args.label] = os.getcwd()
    results = run(cfg, args.budgets, args.reps, args.quick, trees, args.states, args.cpus)
    for label, result in results.items():
        result.update(
            command=" ".join(["python -m benchmarks.jax_first_call", *(argv if argv is not None else sys.argv[1:])]),
            device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            jax=jax.__version__,
            reps=args.reps,
            config=str(cfg),
            commit=args.commit if label == args.label else f"the tree at {args.baseline}",
            cpus=args.cpus or len(os.sched_getaffinity(0)),
        )
        print(write(result, args.out, label))
    report(args.out, list(results))


if __name__ == "__main__":
    main()
