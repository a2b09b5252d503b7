"""Measure every remat strategy on the model zoo, in JAX and PyTorch, side by side.

    python -m benchmarks.sweep                      # quick CPU suite (tiny models), ~5 min on 2 cores
    python -m benchmarks.sweep --suite compiled     # torch.compile cells against compiled none
    python -m benchmarks.sweep --suite infeasible   # budgets below the floor: InfeasibleBudgetError cells
    python -m benchmarks.sweep --models gpt vit --size small --strategies none all presets peers auto
    python -m benchmarks.sweep --shard 2/4 --out runs/s2   # one of 4 machines; then:
    python -m benchmarks.sweep merge runs/s1 runs/s2 runs/s3 runs/s4 --out runs/all

Each cell (framework, model, size, strategy, budget) runs in its own process with a timeout, and
times its step interleaved with a step of `none` built in that process (the time ratio); a
crash, out-of-memory kill or timeout is recorded in `status` and the sweep goes on. Progress is
committed after every cell (remat_kit.resume): SIGTERM or Ctrl-C stops, saves and prints the
command that resumes; after `kill -9` the same command continues. `--fresh` starts over.
Writes results.csv, results.json, report.md and pareto.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

from benchmarks import _cells, _outputs
from benchmarks._cells import DEFAULT_BUDGETS, DEFAULT_MODELS, DEFAULT_STRATEGIES, FRAMEWORKS, SUITES, Cell
from benchmarks._report import ROOT, machine


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/sweep", help="run directory (default: runs/sweep)")
    p.add_argument(
        "--suite",
        default="quick",
        choices=tuple(SUITES),
        help="defaults for the settings not given: quick (default), compiled (torch.compile cells), "
        "infeasible (budgets below the tiny torch GPT's floor)",
    )
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, help=f"default: {' '.join(FRAMEWORKS)}")
    p.add_argument(
        "--models", nargs="+", help=f"gpt gpt_unrolled vit mlp convnet (default: {' '.join(DEFAULT_MODELS)})"
    )
    p.add_argument("--size", nargs="+", default=["tiny"], help="tiny small medium")
    p.add_argument(
        "--strategies",
        nargs="+",
        help=f"from {', '.join(_cells.STRATEGIES)}; groups: {', '.join(_cells.GROUPS)}, all-strategies "
        f"(default: {' '.join(DEFAULT_STRATEGIES)})",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        help=f"for auto, compile+auto and compile_budget (default: {' '.join(map(str, DEFAULT_BUDGETS))})",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per cell (median and IQR reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per cell (default 1: steadier times on a shared machine; 0 = the frameworks' defaults)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per cell before it is killed")
    p.add_argument("--solver", choices=("dp", "milp", "greedy"), help="solver for auto cells (default: remat_kit's)")
    p.add_argument("--shard", help="K/N: run the K-th of N deterministic slices of the cells")
    p.add_argument("--fresh", action="store_true", help="discard saved progress in --out and start over")
    args = p.parse_args(argv)
    defaults = {
        "frameworks": FRAMEWORKS,
        "models": DEFAULT_MODELS,
        "strategies": DEFAULT_STRATEGIES,
        "budgets": DEFAULT_BUDGETS,
    }
    for name, value in {**defaults, **SUITES[args.suite]}.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value))
    for name in ("steps", "timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} {getattr(args, name)!r}: must be positive.")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup!r}: must be >= 0.")
    return args


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("jax", "torch", "remat_kit"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    if not out["remat_kit"]:
        import remat_kit

        out["remat_kit"] = remat_kit.__version__
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["git"] = sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["git"] = ""
    return out


def run_cell(cell: Cell, args: argparse.Namespace, run_dir: pathlib.Path, stop: Any) -> dict[str, Any] | None:
    """Run one cell in a child process. None when the sweep was asked to stop meanwhile."""
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    safe = cell.id.replace("/", "__").replace("@", "_at_")
    out = pathlib.Path(tempfile.mkdtemp(dir=run_dir / "cells")) / "row.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._cell",
        json.dumps(cell.as_dict()),
        str(out),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--ref-dir",
        str(run_dir / "ref"),
    ]
    if args.solver:
        cmd += ["--solver", args.solver]
    (run_dir / "ref").mkdir(exist_ok=True)
    t0 = time.monotonic()
    with open(logs / f"{safe}.log", "w") as log:
        # Own session: Ctrl-C reaches only the sweep, which then stops the cell itself.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        status = None
        while proc.poll() is None:
            if stop():
                proc.kill()
                proc.wait()
                return None
            if time.monotonic() - t0 > args.timeout:
                proc.kill()
                proc.wait()
                status = f"timeout: killed after {args.timeout:g}s"
            time.sleep(0.05)
    row: dict[str, Any] = {}
    if status is None and out.exists():
        row = json.loads(out.read_text())
    elif status is None:
        rc = proc.returncode
        if rc < 0:
            name = signal.Signals(-rc).name
            status = f"crash: {name}" + (" (killed: out of memory?)" if -rc == signal.SIGKILL else "")
        else:
            tail = [ln for ln in (logs / f"{safe}.log").read_text(errors="replace").splitlines() if ln.strip()]
            status = f"crash: exit code {rc}: {tail[-1][:300] if tail else 'no output'}"
    if status is not None:
        row = {"status": status, "cell_seconds": time.monotonic() - t0}
    out.unlink(missing_ok=True)
    out.parent.rmdir()
    return {**cell.as_dict(), "cell_id": cell.id, **row}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        from benchmarks._merge import main as merge_main

        return merge_main(argv[1:])
    args = parse(argv)
    try:
        cells = _cells.shard(
            _cells.plan_cells(args.frameworks, args.models, args.size, args.strategies, args.budgets), args.shard
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = pathlib.Path(args.out).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        k: getattr(args, k)
        for k in (
            "frameworks",
            "models",
            "size",
            "strategies",
            "budgets",
            "steps",
            "warmup",
            "threads",
            "solver",
            "shard",
        )
    }
    from benchmarks._progress import ConfigMismatchError, Progress
    from remat_kit.resume import PreemptionHandler

    for stale in ("cells",) + (
        ("ref", "logs") if args.fresh else ()
    ):  # a killed run's leftovers; a fresh run's old data
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    (run_dir / "cells").mkdir()
    try:
        progress = Progress(run_dir, config, fresh=args.fresh)
    except ConfigMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume_cmd = "python -m benchmarks.sweep " + shlex.join([a for a in argv if a != "--fresh"])
    extra = {"host": os.uname().nodename, "python": machine()["python"], "shard": args.shard or "", **_versions()}
    meta = {"command": "python -m benchmarks.sweep " + shlex.join(argv), "config": config, **machine(), **extra}
    todo = [c for c in cells if c.id not in progress.done]
    if progress.rows:
        print(f"resuming {run_dir}: {len(progress.rows)} of {len(cells)} cells done, {len(todo)} to go", flush=True)
    with PreemptionHandler(signals=(signal.SIGTERM, signal.SIGINT)) as preemption:
        _loop(todo, len(cells) - len(todo), len(cells), args, run_dir, progress, extra, preemption)
        if preemption.requested:
            _outputs.write_all(run_dir, progress.rows, meta)
            print(
                f"stopped by {signal.Signals(preemption.received).name}: {len(progress.rows)} of {len(cells)} cells "
                f"saved in {run_dir}. Resume with:\n  {resume_cmd}",
                file=sys.stderr,
                flush=True,
            )
            preemption.exit_if_requested(progress.checkpointer(), len(progress.rows), progress.state())
    progress.close()
    paths = _outputs.write_all(run_dir, progress.rows, meta)
    bad = sum(r["status"] != "ok" for r in progress.rows)
    print(
        f"{len(progress.rows)} cells ({bad} not ok). Report: {paths['md']}  data: {paths['csv']}  picture: {paths['png']}"
    )
    return 0


def _loop(
    todo: list[Cell],
    num_done: int,
    total: int,
    args: argparse.Namespace,
    run_dir: pathlib.Path,
    progress: Any,
    extra: dict,
    preemption: Any,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Bar(*columns, transient=False) as bar:
        task = bar.add_task("sweep", total=total, completed=num_done)
        for cell in todo:
            bar.update(task, description=f"{cell.id:<40}")
            row = run_cell(cell, args, run_dir, lambda: preemption.requested)
            if row is None:
                return
            progress.add({**row, **extra})
            bar.advance(task)
            bar.console.print(
                f"[{len(progress.rows)}/{total}] {cell.id}: {row['status'][:100]} ({row.get('cell_seconds', 0):.1f}s)",
                markup=False,
                highlight=False,
            )
            if preemption.requested:
                return


if __name__ == "__main__":
    sys.exit(main())
