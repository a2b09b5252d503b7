"""Predicted recompute time beside the measured recompute and the measured extra step time.

    python -m benchmarks.step_time_model [--rounds 16] [--budgets 0.3 0.5 0.7] [--threads 1]

`benchmarks.models.torch_gpt.GPT` (6 layers, d 512, seq 512, dropout), eager torch on one thread
by default (the thread's CPU time is then the whole step's work, and other processes on a shared
machine stretch wall time but not it). `auto` plans with the device constants calibrated in this
process (remat_kit/_torch/_device.py). The predictions are the plan's `predicted_extra_step_seconds`
(against the extra step time: the target) and `predicted_recompute_seconds` (against the recompute).

Three measurements per step, each round stepping no remat and every budget once, in turn:

* **recompute** (direct): the thread CPU time spent inside checkpoint's recomputations during
  backward, timed around torch's own recompute frame (`torch.utils.checkpoint._recomputation_hook`,
  entered once per region recompute; wrapped here, the library is not asked): the recompute as
  the step pays for it, measured by an instrument that knows nothing of the cost model.
* **extra CPU**: the step's thread CPU time minus that round's no-remat step (paired).
* **extra wall**: the same in wall-clock time (noisy on a shared machine).

Then a few more steps per budget split the recompute: the ops it runs, each timed by a dispatch
mode entered before (so beneath) the region's own (`OpTimer`: what the cost model prices), and the
rest of the frame (Python, autograd, checkpoint's hooks, the replay modes).
Target (issue 12): predicted extra step time within 20% of the measured one at 0.3 / 0.5 / 0.7.
Figures go to reports/step_time_model.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import pathlib
import statistics
import time
from collections.abc import Iterator

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

import remat_kit as rk
from benchmarks._report import write
from benchmarks.models.torch_gpt import GPT, add_shape_args
from remat_kit.measure import torch_predicted_parts


class OpTimer(TorchDispatchMode):
    """Thread CPU time of the ops that reach it, by op. Entered inside a recompute frame before the
    region's own modes, it sits under them: it sees the ops the recompute runs (what the cost
    model prices), not the ones a replay hands back from its cache or skips."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.seconds[str(func.overloadpacket)] += time.thread_time() - start
        return out


class RecomputeClock:
    """Thread CPU time spent inside torch's checkpoint recomputations.

    Non-reentrant checkpoint (what every remat_kit region runs: plain, selective replay, or a
    segment over several layers) recomputes a region inside `with _recomputation_hook(...)` in
    its unpack hook, so entering and leaving that context brackets the recompute exactly, its
    early stop included. Checked in torch 2.4-2.13 (torch/utils/checkpoint.py)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.num_recomputes = 0
        self.ops: OpTimer | None = None  # set: time the ops each recompute runs (`OpTimer`)

    @contextlib.contextmanager
    def installed(self) -> Iterator[RecomputeClock]:
        original = torch_checkpoint._recomputation_hook
        clock = self

        class Timed(original):  # type: ignore[misc, valid-type]
            def __enter__(self):
                self._rk_start = time.thread_time()
                out = super().__enter__()
                self._rk_ops = clock.ops
                if self._rk_ops is not None:
                    self._rk_ops.__enter__()
                return out

            def __exit__(self, *exc):
                if self._rk_ops is not None:
                    self._rk_ops.__exit__(*exc)
                out = super().__exit__(*exc)
                clock.seconds += time.thread_time() - self._rk_start
                clock.num_recomputes += 1
                return out

        torch_checkpoint._recomputation_hook = Timed
        try:
            yield self
        finally:
            torch_checkpoint._recomputation_hook = original


def step(model: torch.nn.Module, inputs: tuple, clock: RecomputeClock) -> dict[str, float]:
    """Wall, thread CPU and recompute CPU seconds of one training step."""
    model.zero_grad(set_to_none=True)
    clock.seconds = 0.0
    start, cpu = time.perf_counter(), time.thread_time()
    loss = model(*inputs)
    forward = time.thread_time() - cpu
    loss.backward()
    cpu = time.thread_time() - cpu
    return {"wall": time.perf_counter() - start, "cpu": cpu, "forward": forward, "recompute": clock.seconds}


def split(model: torch.nn.Module, inputs: tuple, clock: RecomputeClock, steps: int) -> dict:
    """The recompute split, over `steps` more steps: the ops it runs (`OpTimer`, thread CPU time;
    the part the cost model prices) and the rest of the frame (Python, autograd, the region's
    modes and hooks). Medians per step; the ops by time, summed over the steps."""
    ops_total, frame_total, by_op = [], [], collections.Counter()
    # The same model stepped back to back, as a training loop does (the rounds interleave four
    # models, so each recompute reads memory the others have evicted from the caches).
    consecutive = [step(model, inputs, clock)["recompute"] for _ in range(steps)]
    for _ in range(steps):
        clock.ops = OpTimer()
        frame_total.append(step(model, inputs, clock)["recompute"])
        ops_total.append(sum(clock.ops.seconds.values()))
        by_op.update(clock.ops.seconds)
    clock.ops = None
    return {
        "ops_run_cpu_s": statistics.median(ops_total),
        "frame_cpu_s": statistics.median(frame_total),
        "consecutive_recompute_cpu_s": statistics.median(consecutive),
        "top_ops_ms": [(op.removeprefix("aten."), 1e3 * t / steps) for op, t in by_op.most_common(10)],
    }


def measure(args: argparse.Namespace) -> tuple[list[dict], dict[str, list[dict]], dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = GPT(args.layers, args.d, args.heads, args.vocab, seq=args.seq).train()
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randint(0, args.vocab, (1, args.seq), generator=g) for _ in range(2))
    models = {"none": base}
    for b in args.budgets:
        models[f"auto {b}"] = rk.auto(copy.deepcopy(base), b)
    clock = RecomputeClock()
    samples: dict[str, list[dict]] = {k: [] for k in models}
    with clock.installed():
        for m in models.values():  # plan (first call) and warm up
            step(m, inputs, clock)
            step(m, inputs, clock)
        for r in range(args.rounds):
            # Rotate who goes first, so that no strategy always follows the same one.
            names = list(models)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                samples[name].append(step(models[name], inputs, clock))
        splits = {b: split(models[f"auto {b}"], inputs, clock, args.split_steps) for b in args.budgets}
    rows = [_row(b, models[f"auto {b}"], samples[f"auto {b}"], samples["none"]) | splits[b] for b in args.budgets]
    return rows, samples


def predicted_parts(model: torch.nn.Module) -> dict[str, float]:
    """The plan's predicted extra step time split as the measurement splits it: the ops its
    recomputes run, the recompute frames' fixed costs and the selective regions' forward mode
    (`remat_kit.measure.torch_predicted_parts`: the cost model's own terms)."""
    parts = torch_predicted_parts(model)
    return {
        "predicted_ops_s": parts.ops_seconds,
        "predicted_frame_s": parts.frame_seconds,
        "predicted_forward_s": parts.forward_seconds,
    }


def _row(budget: float, model: torch.nn.Module, mine: list[dict], none: list[dict]) -> dict:
    plans = rk.plan_of(model) or []
    predicted = sum(p.predicted_recompute_seconds for p in plans)
    predicted_step = sum(p.predicted_extra_step_seconds for p in plans)

    def paired(key: str) -> tuple[float, float, float]:
        diffs = sorted(a[key] - b[key] for a, b in zip(mine, none))
        q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
        return q[1], q[0], q[2]

    recompute = sorted(s["recompute"] for s in mine)
    extra_cpu, cpu_lo, cpu_hi = paired("cpu")
    extra_wall, wall_lo, wall_hi = paired("wall")
    extra_forward = paired("forward")[0]
    for a, b in zip(mine, none):  # the backward besides the recompute frames
        a["rest"], b["rest"] = (s["cpu"] - s["forward"] - s["recompute"] for s in (a, b))
    extra_rest = paired("rest")[0]
    measured = statistics.median(recompute)
    return {
        "budget": budget,
        "activation_fraction": plans[0].activation_fraction if len(plans) == 1 else None,
        "recompute_gflop": sum(p.predicted_recompute_flops for p in plans) / 1e9,
        "recomputed_ops": sum(p.num_recomputed_ops for p in plans),
        "predicted_recompute_s": predicted,
        "measured_recompute_cpu_s": measured,
        "measured_recompute_cpu_iqr_s": [recompute[len(recompute) // 4], recompute[(3 * len(recompute)) // 4]],
        "predicted_over_recompute": predicted / measured if measured > 0 else None,
        "extra_cpu_s": extra_cpu,
        "extra_cpu_iqr_s": [cpu_lo, cpu_hi],
        "predicted_over_extra_cpu": predicted / extra_cpu if extra_cpu > 0 else None,
        "predicted_extra_step_s": predicted_step,
        "predicted_step_over_extra_cpu": predicted_step / extra_cpu if extra_cpu > 0 else None,
        "extra_forward_cpu_s": extra_forward,
        "extra_backward_rest_cpu_s": extra_rest,
        "extra_wall_s": extra_wall,
        "extra_wall_iqr_s": [wall_lo, wall_hi],
        "cpu_ratio_to_none": statistics.median(s["cpu"] for s in mine) / statistics.median(s["cpu"] for s in none),
    } | predicted_parts(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    add_shape_args(parser, layers=6, d=512, heads=8, seq=512, vocab=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split-steps", type=int, default=3, help="steps timing the ops inside the recompute")
    parser.add_argument("--name", default="step_time_model", help="report file name under reports/")
    parser.add_argument("--before", type=pathlib.Path, help="an earlier run's JSON, tabled beside this one")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.split_steps < 1:
        parser.error(f"--rounds={args.rounds} --split-steps={args.split_steps}: run at least one of each")
    # Calibrate in this process, under the load the steps then run under (the disk cache would
    # hold whatever the first run on this machine saw).
    os.environ.setdefault("REMAT_KIT_CALIBRATE", "fresh")
    before = json.loads(args.before.read_text()) if args.before else None
    rows, samples = measure(args)
    none_cpu = statistics.median(s["cpu"] for s in samples["none"])
    _report(args, rows, none_cpu, before)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _step_table(rows: list[dict]) -> list[str]:
    """The target: the plan's predicted extra step time beside the measured one, and where the
    measured one went (paired medians: the parts need not add up to the whole)."""
    lines = [
        "| budget | predicted extra step ms | extra CPU ms | predicted step / extra CPU | predicted recompute ms | "
        "recompute ms | extra forward ms | extra backward outside the recompute ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cq = r["extra_cpu_iqr_s"]
        lines.append(
            f"| {r['budget']} | {_ms(r.get('predicted_extra_step_s'))} | "
            f"{_ms(r['extra_cpu_s'])} [{_ms(cq[0])}, {_ms(cq[1])}] | {_ratio(r.get('predicted_step_over_extra_cpu'))} | "
            f"{_ms(r['predicted_recompute_s'])} | {_ms(r['measured_recompute_cpu_s'])} | "
            f"{_ms(r.get('extra_forward_cpu_s'))} | {_ms(r.get('extra_backward_rest_cpu_s'))} |"
        )
    return lines


def _parts_table(rows: list[dict]) -> list[str]:
    """Each part of the prediction beside the part measured (medians; the measured frame is the
    recompute less the ops it runs, both from the split steps)."""
    lines = [
        "| budget | ops: predicted ms | ops run ms | recompute frame: predicted ms | measured ms | "
        "forward: predicted ms | extra forward ms | sum predicted ms | sum measured ms | extra CPU ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "predicted_ops_s" not in r:
            continue
        frame = r["frame_cpu_s"] - r["ops_run_cpu_s"]
        predicted = r["predicted_ops_s"] + r["predicted_frame_s"] + r["predicted_forward_s"]
        measured = r["ops_run_cpu_s"] + frame + r["extra_forward_cpu_s"]
        lines.append(
            f"| {r['budget']} | {_ms(r['predicted_ops_s'])} | {_ms(r['ops_run_cpu_s'])} | "
            f"{_ms(r['predicted_frame_s'])} | {_ms(frame)} | {_ms(r['predicted_forward_s'])} | "
            f"{_ms(r['extra_forward_cpu_s'])} | {_ms(predicted)} | {_ms(measured)} | {_ms(r['extra_cpu_s'])} |"
        )
    return lines


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| budget | activation fraction | recompute GFLOP | recomputed ops | predicted ms | ops run ms | "
        "predicted / ops run | recompute ms | predicted / recompute | recompute, back to back ms | "
        "predicted / back to back | extra CPU ms | predicted / extra CPU | extra wall ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = "-" if r["activation_fraction"] is None else f"{r['activation_fraction']:.3f}"
        rq, cq, wq = r["measured_recompute_cpu_iqr_s"], r["extra_cpu_iqr_s"], r["extra_wall_iqr_s"]
        ops_run, consecutive = r["ops_run_cpu_s"], r.get("consecutive_recompute_cpu_s")
        lines.append(
            f"| {r['budget']} | {frac} | {r['recompute_gflop']:.3f} | {r['recomputed_ops']} | "
            f"{_ms(r['predicted_recompute_s'])} | {_ms(ops_run)} | "
            f"{_ratio(r['predicted_recompute_s'] / ops_run if ops_run > 0 else None)} | "
            f"{_ms(r['measured_recompute_cpu_s'])} [{_ms(rq[0])}, {_ms(rq[1])}] | "
            f"{_ratio(r['predicted_over_recompute'])} | {_ms(consecutive)} | "
            f"{_ratio(r['predicted_recompute_s'] / consecutive if consecutive else None)} | "
            f"{_ms(r['extra_cpu_s'])} [{_ms(cq[0])}, {_ms(cq[1])}] | "
            f"{_ratio(r['predicted_over_extra_cpu'])} | {_ms(r['extra_wall_s'])} [{_ms(wq[0])}, {_ms(wq[1])}] |"
        )
    lines += ["", "Ops the recompute runs, thread CPU ms per step:", ""]
    for r in rows:
        lines.append(f"- {r['budget']}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in r["top_ops_ms"]))
    return lines


def _report(args: argparse.Namespace, rows: list[dict], none_cpu: float, before: dict | None) -> None:
    lines = [
        "# Predicted extra step time and recompute time beside the measured ones (eager torch)",
        "",
        f"GPT {args.layers} layers, d {args.d}, seq {args.seq}, vocab {args.vocab}, dropout 0.1, torch "
        f"{torch.__version__} on CPU, {args.threads} thread(s); {args.rounds} interleaved rounds in one process.",
        f"No remat: median step {none_cpu * 1e3:.0f} ms thread CPU (this machine's only). `auto` priced recompute with",
        "constants calibrated in the same process (`REMAT_KIT_CALIBRATE=fresh`).",
        "",
        "- `predicted extra step`: the plan's `predicted_extra_step_seconds` (its recompute, the replay modes'",
        "  forward and replay, checkpoint's own frames and hooks: what `auto` chose the plan by).",
        "- `extra forward` / `extra backward outside the recompute`: paired medians of the step's forward, and of",
        "  its backward less the recompute frames, over no remat's.",
        "- `predicted`: the plan's `predicted_recompute_seconds`.",
        "- `recompute`: thread CPU time inside checkpoint's recompute frames, per step (direct; median [quartiles]).",
        "- `back to back`: the same, median of "
        f"{args.split_steps} more steps of one model in a row (as a training loop runs; the rounds interleave).",
        "- `ops run`: of that, the ops the recompute runs, timed one by one under the region's modes (median of",
        f"  {args.split_steps} more steps); the rest of the frame is Python, autograd, hooks and the replay modes.",
        "- `extra CPU` / `extra wall`: median over rounds of (step - that round's no-remat step) [quartiles].",
        "- parts: `ops` the recompute's ops (predicted: the plan's recompute less its regions' fixed costs),",
        "  `recompute frame` the rest of the recompute (predicted: checkpoint's frame and hooks, the replay mode,",
        "  views, at the cold factor; measured: recompute less ops run, in the same split steps, so it carries",
        "  the op timer's own cost), `forward` the selective regions' forward mode (measured: extra forward;",
        "  checkpoint's pack hooks run in the forward but are priced in the frame: compare the sums).",
        "",
    ]
    lines += _step_table(rows) + ["", "The prediction's parts beside the measured ones:", ""] + _parts_table(rows)
    lines += ["", "The recompute alone:", ""] + _table(rows)
    if before is not None:
        lines += ["", f"Before: `{before['command']}` on {before['machine']['date']}, same measurements:", ""]
        lines += _step_table(before["rows"]) + [""] + _table(before["rows"])
    lines += ["", f"Load average when written: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs."]
    print("\n".join(lines))
    path = write(args.name, {"rows": rows, "none_cpu_s": none_cpu}, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
