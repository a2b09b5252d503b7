"""One sweep cell in its own process: `python -m benchmarks._cell CELL_JSON OUT_JSON --steps N --warmup W`.

Writes one JSON row to OUT_JSON: the measurements with status "ok", or status "error: ..." when
the strategy raised (an infeasible budget, an adapter not landed yet). A crash, out-of-memory
kill or timeout leaves no file; the parent records those. The process dies with its parent
(PR_SET_PDEATHSIG), so a `kill -9` of the sweep leaves no orphan measuring in the background.

Fault injection for the sweep's own tests and CI drills: REMAT_SWEEP_FAULT="<cell id substring>=<fault>[,...]",
first match wins; <fault> is crash (SIGSEGV), hang (after printing "REMAT_SWEEP_FAULT: <cell id> hangs
now" to the cell's log), error (raise), or as:<strategy> (measure the cell with another strategy's
plan: a deliberately worse plan that `compare` must catch).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable

from benchmarks._cells import Cell

GRAD_TOL = 1e-4  # relative to the largest gradient: float32 reassociation under remat stays far below


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the parent still kills us on SIGTERM / timeout
        pass


def _inject_fault(cell: Cell) -> Cell:
    spec = os.environ.get("REMAT_SWEEP_FAULT", "")
    for item in filter(None, spec.split(",")):
        pattern, _, kind = item.partition("=")
        if pattern in cell.id:
            break
    else:
        return cell
    if kind.startswith("as:"):
        return Cell(cell.framework, cell.model, cell.size, kind[3:], cell.budget)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        # Announced in the cell's log, so a test waits for this line, not for a guessed time.
        print(f"REMAT_SWEEP_FAULT: {cell.id} hangs now", flush=True)
        time.sleep(3600)
    if kind == "error":
        raise RuntimeError(f"fault injected by REMAT_SWEEP_FAULT={spec!r}")
    raise ValueError(f"REMAT_SWEEP_FAULT={spec!r}: fault {kind!r} is not one of crash, hang, error, as:<strategy>.")


def _limit_threads(n: int, framework: str) -> None:
    """Pin both frameworks to `n` CPU threads: on a shared machine one thread times far steadier."""
    if n <= 0:
        return
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    if framework == "torch":
        import torch

        torch.set_num_threads(n)


MIN_TIMED_SECONDS = 1.0  # per cell: a 1 ms step timed 10 times gives a median one preemption can move
MAX_ROUNDS_PER_STEP = 20


def time_with_none(
    one_step: Callable[[], None], none_step: Callable[[], None] | None, *, steps: int, warmup: int
) -> dict[str, float | int]:
    """The cell's step times, each timed step paired with a step of `none` (the same model without
    remat, built in this process), which of the two goes first alternating by round:
    `step_time_vs_none` is the ratio of the two medians, so load that comes and goes between the
    sweep's cell processes does not tilt a ratio. At least `steps` rounds, more (up to
    MAX_ROUNDS_PER_STEP * steps) until the cell's steps add up to MIN_TIMED_SECONDS, so that a
    millisecond step gets a median of more than a handful of samples. `none_step=None`: the cell is
    `none` itself (ratio 1). Both steps must synchronize."""
    for _ in range(warmup):
        if none_step is not None:
            none_step()
        one_step()
    mine: list[float] = []
    base: list[float] = []

    def timed(step: Callable[[], None], into: list[float]) -> None:
        t0 = time.perf_counter()
        step()
        into.append(time.perf_counter() - t0)

    while len(mine) < steps or (sum(mine) < MIN_TIMED_SECONDS and len(mine) < MAX_ROUNDS_PER_STEP * steps):
        pair = [(one_step, mine)] + ([(none_step, base)] if none_step is not None else [])
        for step, into in pair[:: 1 if len(mine) % 2 else -1]:
            timed(step, into)
    q = statistics.quantiles(mine, n=4) if len(mine) >= 2 else [mine[0]] * 3
    median = statistics.median(mine)
    none_median = statistics.median(base) if none_step is not None else median
    return {
        "step_time_s": median,
        "step_time_iqr_s": q[2] - q[0],
        "step_time_min_s": min(mine),
        "num_steps": len(mine),
        "none_step_time_s": none_median,
        "step_time_vs_none": median / none_median,
    }


def measure(cell: Cell, steps: int, warmup: int, ref_path: str | None = None, solver: str | None = None) -> dict:
    cell = _inject_fault(cell)
    if cell.framework == "jax":
        from benchmarks import _jax_cell as runner
    else:
        from benchmarks import _torch_cell as runner
    return runner.run(cell, steps=steps, warmup=warmup, grad_tol=GRAD_TOL, ref_path=ref_path, solver=solver)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cell", help="the cell as JSON (Cell.as_dict())")
    parser.add_argument("out", help="where to write the row (JSON)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the step (0: the library's default)")
    parser.add_argument("--solver", help="solver for auto cells (remat_kit.auto's solver=)")
    parser.add_argument("--ref-dir", help="where `none` cells leave reference gradients for the others")
    args = parser.parse_args(argv)
    _die_with_parent()
    cell = Cell(**json.loads(args.cell))
    _limit_threads(args.threads, cell.framework)
    t0 = time.perf_counter()
    try:
        ref = None
        if args.ref_dir:
            ref = os.path.join(args.ref_dir, f"{cell.framework}-{cell.model}-{cell.size}.npz")
        row = {"status": "ok", **measure(cell, args.steps, args.warmup, ref, args.solver)}
    except Exception as e:  # the strategy failed: record why, let the sweep go on
        last = traceback.extract_tb(e.__traceback__)[-1]
        message = " ".join(str(e).split())[:400]
        row = {"status": f"error: {type(e).__name__}: {message}", "error_at": f"{last.filename}:{last.lineno}"}
        traceback.print_exc()
    row["cell_seconds"] = time.perf_counter() - t0
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, default=float)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
