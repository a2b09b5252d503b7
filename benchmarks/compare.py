"""Compare a sweep (or a pytest-benchmark run) with a baseline; Markdown report, non-zero on regression.

    python -m benchmarks.compare reports/baseline runs/ci [--md report.md]
    python -m benchmarks.compare base_bench.json cur_bench.json     # pytest-benchmark JSON

Memory and FLOPs are deterministic on one platform: any increase beyond --mem-tol (relative) is a
regression. Time is compared as the cell's step time over `none`'s, measured interleaved in the
cell's own process (`step_time_vs_none`; runs older than that figure: fastest step over the `none`
cell's fastest), so a slower or busier machine cancels out; a ratio that grows by more than
--time-tol is a regression (with
--confirm RERUN, only where a second run of the same cells shows it too: `benchmarks/ci_perf.sh`
reruns the sweep once when the first comparison fails).
A cell that stopped working or whose gradients stopped matching is a regression; cells missing
from CURRENT are listed and fail the check (unless --allow-missing); new cells are listed.
Exit status: 0 no regression, 1 regression, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any

from benchmarks import _bench_compare

EXACT = ("activation_bytes", "peak_bytes", "flops")


@dataclasses.dataclass
class Verdict:
    cell: str
    regressions: list[str] = dataclasses.field(default_factory=list)
    improvements: list[str] = dataclasses.field(default_factory=list)
    cells: dict[str, str] = dataclasses.field(default_factory=dict)  # column -> text
    note: str = ""

    @property
    def word(self) -> str:
        if self.regressions:
            return "❌ regression: " + "; ".join(self.regressions) + (f" ({self.note})" if self.note else "")
        if self.note:
            return self.note
        if self.improvements:
            return "✅ improved: " + "; ".join(self.improvements)
        return "ok"


def load_sweep(path: pathlib.Path) -> tuple[dict[str, dict], dict]:
    """Rows by cell id, and the run's meta, from a run directory, results.json or results.csv."""
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a sweep run directory, its results.json or results.csv.")
    if path.suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path)
        rows, meta = json.loads(df.to_json(orient="records")), {}
    else:
        data = json.loads(path.read_text())
        if "rows" not in data:
            raise ValueError(
                f"{path} is not a sweep's results.json (no 'rows'); for pytest-benchmark JSON pass both "
                "files as pytest-benchmark output."
            )
        rows, meta = data["rows"], data.get("meta", {})
    return {r["cell_id"]: r for r in rows}, meta


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def time_ratio(rows: dict[str, dict], cell_id: str, *, interleaved: bool = True) -> float | None:
    """The cell's step time over `none`'s, same run.

    `interleaved`: the ratio the cell measured in its own process, its steps alternating with a
    `none` step built there (`step_time_vs_none`): load that comes and goes between cell processes
    does not tilt it. Otherwise (runs older than that figure) the cell's fastest step over its
    group's `none` cell's fastest, timed in another process: the minimum, since other processes
    only ever add time. Compare like with like: `judge` uses the interleaved ratio only where
    every run compared has it."""
    r = rows[cell_id]
    if interleaved:
        return _num(r.get("step_time_vs_none")) if cell_id.rsplit("/", 1)[1] != "none" else 1.0
    none = rows.get(f"{cell_id.rsplit('/', 1)[0]}/none")
    if none is None:
        return None
    key = "step_time_min_s" if _num(r.get("step_time_min_s")) and _num(none.get("step_time_min_s")) else "step_time_s"
    t, t0 = _num(r.get(key)), _num(none.get(key))
    return t / t0 if t is not None and t0 else None


def _has_interleaved(*runs: dict[str, dict] | None) -> bool:
    return all(
        any(_num(r.get("step_time_vs_none")) is not None for r in run.values()) for run in runs if run is not None
    )


def judge(
    cell_id: str,
    base: dict[str, dict],
    cur: dict[str, dict],
    mem_tol: float,
    time_tol: float,
    confirm: dict[str, dict] | None = None,
    *,
    inter: bool,
) -> Verdict:
    """`inter`: whether every compared run has interleaved time ratios (see `time_ratio`)."""
    b, c = base[cell_id], cur[cell_id]
    v = Verdict(cell_id)
    if b["status"] == "ok" and c["status"] != "ok":
        v.regressions.append(f"was ok, now {c['status'][:120]}")
    elif b["status"] != "ok" and c["status"] == "ok":
        v.improvements.append(f"now ok (was {b['status'][:60]})")
    v.cells["status"] = c["status"] if c["status"] == "ok" else c["status"].split(":")[0]
    if b["status"] != "ok" and c["status"] != "ok":
        v.note = f"⚠️ fails in both: {c['status'][:100]}"
    if b["status"] != "ok" or c["status"] != "ok":
        return v
    for metric in EXACT:
        x0, x1 = _num(b.get(metric)), _num(c.get(metric))
        if x0 is None or x1 is None:
            v.cells[metric] = ""
            continue
        change = (x1 - x0) / x0 if x0 else (0.0 if x1 == x0 else math.inf)
        v.cells[metric] = f"{change:+.1%}" if abs(change) > 1e-12 else "="
        name = metric.replace("_bytes", "").replace("_", " ")
        if change > mem_tol:
            v.regressions.append(f"{name} {change:+.1%}")
        elif change < -mem_tol:
            v.improvements.append(f"{name} {change:+.1%}")
    r0, r1 = time_ratio(base, cell_id, interleaved=inter), time_ratio(cur, cell_id, interleaved=inter)
    if r0 is not None and r1 is not None:
        v.cells["time"] = f"{r0:.2f}→{r1:.2f}"
        if r1 > r0 * (1 + time_tol):
            # With a confirming rerun, a slowdown counts only if the rerun shows it too: on a shared
            # CPU one run's millisecond steps can be 2-3x off with nothing changed.
            r2 = time_ratio(confirm, cell_id, interleaved=inter) if confirm is not None and cell_id in confirm else None
            if confirm is None:
                v.regressions.append(f"time/none {r0:.2f}→{r1:.2f}")
            elif r2 is not None and r2 > r0 * (1 + time_tol):
                v.regressions.append(f"time/none {r0:.2f}→{r1:.2f}, {r2:.2f} on the rerun")
                v.cells["time"] += f" ({r2:.2f})"
            else:
                v.note = (
                    f"time/none {r0:.2f}→{r1:.2f} not confirmed by the rerun ({'-' if r2 is None else f'{r2:.2f}'})"
                )
                v.cells["time"] += f" ({'-' if r2 is None else f'{r2:.2f}'})"
        elif r1 < r0 / (1 + time_tol):
            v.improvements.append(f"time/none {r0:.2f}→{r1:.2f}")
    if b.get("grad_ok") and not c.get("grad_ok"):
        v.regressions.append(f"gradients differ from none (max rel. err {c.get('grad_max_rel_err')})")
    return v


def compare_sweeps(
    base: dict, cur: dict, mem_tol: float, time_tol: float, confirm: dict | None = None
) -> tuple[list[Verdict], list[str], list[str]]:
    inter = _has_interleaved(base, cur, confirm)  # once for all cells: like is compared with like
    verdicts = [judge(k, base, cur, mem_tol, time_tol, confirm, inter=inter) for k in base if k in cur]
    return verdicts, [k for k in base if k not in cur], [k for k in cur if k not in base]


def markdown(verdicts: list[Verdict], missing: list[str], new: list[str], meta: tuple[dict, dict], args: Any) -> str:
    regressed = [v for v in verdicts if v.regressions]
    improved = [v for v in verdicts if v.improvements and not v.regressions]
    failed = bool(regressed) or (bool(missing) and not args.allow_missing)
    head = "❌ **performance regression**" if failed else "✅ **no performance regression**"
    out = [
        "## remat_kit perf check",
        "",
        f"{head}: {len(verdicts)} cells compared, {len(regressed)} regressed, {len(improved)} improved, "
        f"{len(missing)} missing, {len(new)} new. Tolerances: memory/FLOPs +{args.mem_tol:.1%}, "
        f"time/none ×{1 + args.time_tol:.2f}.",
        "",
    ]
    b, c = meta
    for key in ("platform", "jax", "torch"):
        if b.get(key) and c.get(key) and b[key] != c[key]:
            out += [
                f"⚠️ baseline {key} `{b[key]}` differs from current `{c[key]}`: exact figures may move for that reason.",
                "",
            ]
    out += [
        f"Baseline: `{args.baseline}` (git {b.get('git', '?')}); current: `{args.current}` (git {c.get('git', '?')}).",
        "",
    ]
    if regressed:
        out += ["### Regressions", ""] + [f"- `{v.cell}`: {'; '.join(v.regressions)}" for v in regressed] + [""]
    if missing:
        out += ["### Missing from current (not run or not finished)", ""] + [f"- `{k}`" for k in missing] + [""]
    if new:
        out += ["### New cells (no baseline)", ""] + [f"- `{k}`" for k in new] + [""]
    out += [
        "### All cells",
        "",
        "| cell | status | activation | peak | FLOPs | time/none | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in verdicts:
        g = v.cells.get
        out.append(
            f"| `{v.cell}` | {g('status', '')} | {g('activation_bytes', '')} | {g('peak_bytes', '')} | "
            f"{g('flops', '')} | {g('time', '')} | {v.word} |"
        )
    return "\n".join(out) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("baseline", type=pathlib.Path, help="baseline run directory / results.json / pytest-benchmark JSON")
    p.add_argument("current", type=pathlib.Path, help="current run, same kind as the baseline")
    p.add_argument("--md", type=pathlib.Path, help="also write the Markdown report here")
    p.add_argument("--mem-tol", type=float, default=0.001, help="relative memory/FLOP increase allowed (default 0.001)")
    p.add_argument(
        "--time-tol",
        type=float,
        default=0.5,
        help="relative growth allowed in time/none (default 0.5: CPU timing on shared machines is noisy)",
    )
    p.add_argument("--allow-missing", action="store_true", help="cells missing from CURRENT do not fail the check")
    p.add_argument(
        "--confirm",
        type=pathlib.Path,
        help="a rerun of CURRENT: a time/none regression counts only where the rerun shows it too",
    )
    args = p.parse_args(argv)
    for name in ("mem_tol", "time_tol"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)!r}: must be a number >= 0.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if _bench_compare.is_benchmark_json(args.baseline):
            text, failed = _bench_compare.compare(args.baseline, args.current, args.time_tol)
        else:
            base, base_meta = load_sweep(args.baseline)
            cur, cur_meta = load_sweep(args.current)
            confirm = load_sweep(args.confirm)[0] if args.confirm is not None else None
            verdicts, missing, new = compare_sweeps(base, cur, args.mem_tol, args.time_tol, confirm)
            text = markdown(verdicts, missing, new, (base_meta, cur_meta), args)
            failed = any(v.regressions for v in verdicts) or (bool(missing) and not args.allow_missing)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.md:
        args.md.write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
