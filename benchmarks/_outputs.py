"""A sweep's outputs: results.csv / results.json (tidy, one row per cell), report.md, pareto.png."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from benchmarks._cells import COMPILED, DEFAULT_BUDGETS

COLUMNS = [  # the required columns first, then the rest
    "framework",
    "model",
    "size",
    "strategy",
    "budget",
    "status",
    "peak_bytes",
    "activation_bytes",
    "rss_peak_bytes",
    "step_time_s",
    "flops",
    "predicted_activation_bytes",
    "grad_ok",
    "step_time_vs_none",
    "none_step_time_s",
    "step_time_iqr_s",
    "step_time_min_s",
    "num_steps",
    "grad_max_rel_err",
    "param_bytes",
    "device",
    "device_peak_bytes",
    "saved_bytes",
    "none_saved_bytes",
    "saved_vs_none",
    "graph_breaks",
    "memory_note",
    "flops_source",
    "cell_id",
    "cell_seconds",
    "error_at",
    "shard",
    "host",
    "python",
    "jax",
    "torch",
    "remat_kit",
    "git",
]
GROUP = ["framework", "model", "size"]


def frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def with_ratios(df: Any) -> Any:
    """Adds `<metric>_ratio`: each ok cell's memory and FLOPs over its group's `none` cell (exact
    figures, comparable across processes), and `step_time_ratio`, only ever the cell's own
    `step_time_vs_none`: timed interleaved with `none` in the cell's process (compiled cells: with
    compiled none), never one process's time over another's."""
    df = df.copy()
    base = df[(df.strategy == "none") & (df.status == "ok")].set_index(GROUP)
    for metric in ("activation_bytes", "peak_bytes", "flops"):
        ref = df.set_index(GROUP).index.map(
            lambda k, m=metric: base[m].get(k, math.nan) if k in base.index else math.nan
        )
        df[f"{metric.removesuffix('_bytes')}_ratio"] = df[metric].astype(float) / list(ref)
    df["step_time_ratio"] = df.step_time_vs_none.astype(float)
    df["predicted_error"] = (
        df.predicted_activation_bytes.astype(float) - df.activation_bytes.astype(float)
    ) / df.activation_bytes.astype(float)
    return df


def write_all(run_dir: pathlib.Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, pathlib.Path]:
    df = frame(rows)
    paths = {
        "csv": run_dir / "results.csv",
        "json": run_dir / "results.json",
        "md": run_dir / "report.md",
        "png": run_dir / "pareto.png",
    }
    df.to_csv(paths["csv"], index=False)
    records = json.loads(df.to_json(orient="records"))
    paths["json"].write_text(json.dumps({"meta": meta, "rows": records}, indent=1) + "\n")
    ratios = with_ratios(df)
    paths["md"].write_text(report(ratios, meta))
    pareto(ratios, paths["png"])
    return paths


def _mib(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x) / 2**20:.2f}"


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(float(x), spec)


def _has_budget(r: Any) -> bool:
    return not (r.budget is None or (isinstance(r.budget, float) and math.isnan(r.budget)))


def _label(r: Any) -> str:
    return r.strategy + (
        "" if r.budget is None or (isinstance(r.budget, float) and math.isnan(r.budget)) else f"@{r.budget:g}"
    )


def report(df: Any, meta: dict[str, Any]) -> str:
    out = [
        "# remat_kit sweep",
        "",
        f"`{meta.get('command', '')}` · {meta.get('date', '')} · {meta.get('platform', '')}, "
        f"{meta.get('cpus', '')} CPUs · jax {meta.get('jax', '')} · torch {meta.get('torch', '')} · "
        f"git {meta.get('git', '')}",
        "",
        "Memory is exact and allocator-level (JAX: `memory_analysis().temp_size_in_bytes` of the compiled "
        "step; PyTorch: live storages under a TorchDispatchMode); ratios are to `none` of the same model. "
        "`time` is the median step time over `none`'s median, both timed interleaved (each step of the cell "
        "paired with one of `none`, the pair's order alternating) in the cell's own process, so every time ratio comes from one run; on a CPU only "
        "the ratio means much. "
        "FLOPs include recompute (JAX, scanned layers: counted on the program with its scan unrolled, "
        "before XLA optimizes it, because `cost_analysis` counts a loop body once). `pred. err` is auto's "
        "predicted activation memory against the measured; `over budget` marks a budgeted cell whose measured "
        "activation ratio exceeds its budget.",
        "",
    ]
    bad = df[df.status != "ok"]
    if len(bad):
        out += (
            [f"**{len(bad)} cell(s) did not finish:**", ""]
            + [f"- `{r.cell_id}`: {r.status}" for r in bad.itertuples()]
            + [""]
        )
    for key, g in df.groupby(GROUP, sort=False):
        compiled = g.strategy.isin(COMPILED)
        out += [f"## {'/'.join(key)}", ""]
        if (~compiled).any():
            eager = g[~compiled]
            out += _eager_table(eager) + [""] + ([_cheapest(eager), ""] if (eager.strategy != "none").any() else [])
        if compiled.any():
            out += _compiled_table(g[compiled]) + [""]
    return "\n".join(out).replace("| ms |", "|  |") + "\n"


def _iqr_ms(r: Any) -> Any:
    return r.step_time_iqr_s * 1e3 if r.step_time_iqr_s is not None and r.step_time_iqr_s == r.step_time_iqr_s else None


def _grad(r: Any) -> str:
    return "" if r.status != "ok" else ("ok" if r.grad_ok else f"**differs {r.grad_max_rel_err:.1e}**")


def _eager_table(g: Any) -> list[str]:
    out = [
        "| strategy | status | act. MiB | act. | peak | FLOPs | time | "
        "time IQR | RSS MiB | predicted MiB | pred. err | grad |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in g.itertuples():
        status = "ok" if r.status == "ok" else r.status.split(":")[0]
        if r.status == "ok" and _has_budget(r) and r.activation_ratio > r.budget + 1e-9:
            status = f"**over budget {r.budget:g}**"
        out.append(
            f"| {_label(r)} | {status} | {_mib(r.activation_bytes)} | {_fmt(r.activation_ratio)} | "
            f"{_fmt(r.peak_ratio)} | {_fmt(r.flops_ratio)} | {_fmt(r.step_time_ratio)} | "
            f"{_fmt(_iqr_ms(r), '.1f')}ms | {_mib(r.rss_peak_bytes)} | {_mib(r.predicted_activation_bytes)} | "
            f"{_fmt(r.predicted_error, '+.0%')} | {_grad(r)} |"
        )
    return out


def _compiled_table(g: Any) -> list[str]:
    """torch.compile cells: what the compiled forward saves for backward and the step time, each
    against compiled none measured in the cell's own process."""
    out = [
        "torch.compile (inductor) cells, each against compiled none in its own process: `saved` is the bytes "
        "the compiled forward saves for backward (`saved_tensors_hooks`, parameters and inputs left out), "
        "`time` compiled step time over compiled none's (interleaved). FLOPs are not counted: a counting "
        "dispatch mode would make dynamo run the step eagerly.",
        "",
        "| strategy | status | saved MiB | compiled none MiB | saved / none | time | time IQR | graph breaks | "
        "predicted MiB | grad |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in g.itertuples():
        status = "ok" if r.status == "ok" else r.status.split(":")[0]
        out.append(
            f"| {_label(r)} | {status} | {_mib(r.saved_bytes)} | {_mib(r.none_saved_bytes)} | "
            f"{_fmt(r.saved_vs_none)} | {_fmt(r.step_time_ratio)} | {_fmt(_iqr_ms(r), '.1f')}ms | "
            f"{_fmt(r.graph_breaks, '.0f')} | {_mib(r.predicted_activation_bytes)} | {_grad(r)} |"
        )
    return out


def _cheapest(g: Any) -> str:
    """For each budget, the fitting strategy with the fewest FLOPs (deterministic; the time ratio breaks ties)."""
    ok = g[(g.status == "ok") & g.activation_ratio.notna()]
    budgets = sorted({float(b) for b in g.budget.dropna()}) or list(DEFAULT_BUDGETS)
    parts = []
    for b in budgets:
        fits = ok[ok.activation_ratio <= b + 1e-9].sort_values(["flops", "step_time_ratio"])
        parts.append(
            f"≤{b:g}: "
            + (f"`{_label(fits.iloc[0])}` (FLOPs ×{fits.iloc[0].flops_ratio:.2f})" if len(fits) else "nothing fits")
        )
    return "Cheapest strategy that fits each activation budget: " + "; ".join(parts) + "."


def pareto(df: Any, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(df.groupby(GROUP, sort=False))
    cols = min(3, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    markers = dict(zip(sorted(set(df.strategy)), "os^vD<>phX*P8"))
    for ax, (key, g) in zip(axes.flat, groups):
        # Compiled cells: saved-for-backward bytes over compiled none's, time over compiled none's.
        memory = g.activation_ratio.where(~g.strategy.isin(COMPILED), g.saved_vs_none.astype(float))
        ok = g[(g.status == "ok") & memory.notna() & g.step_time_ratio.notna()]
        for r in ok.itertuples():
            x = memory[r.Index]
            ax.scatter(x, r.step_time_ratio, marker=markers.get(r.strategy, "o"), s=40)
            ax.annotate(
                _label(r),
                (x, r.step_time_ratio),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        ax.set_title("/".join(key), fontsize=9)
        ax.set_xlabel(
            "activation memory / none"
            + (" (compile*: saved / compiled none)" if g.strategy.isin(COMPILED).any() else ""),
            fontsize=7,
        )
        ax.set_ylabel("step time / none (same process)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
