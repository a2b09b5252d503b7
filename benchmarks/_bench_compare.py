"""`compare` for pytest-benchmark JSON (`pytest benchmarks/ --benchmark-only --benchmark-json=F`).

Each benchmark of `test_step_time.py` records framework, model and strategy in `extra_info`; its
fastest round is compared as a ratio to the `none` benchmark of the same framework and model, from the
same run, so that a slower machine cancels out.
"""

from __future__ import annotations

import json
import pathlib


def is_benchmark_json(path: pathlib.Path) -> bool:
    if path.is_dir() or path.suffix != ".json" or not path.exists():
        return False
    return "benchmarks" in json.loads(path.read_text())


def ratios(path: pathlib.Path) -> dict[str, float | None]:
    data = json.loads(path.read_text())
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list); compare like with like.")
    medians, groups = {}, {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        group = f"{info.get('framework', '')}/{info.get('model', '')}"
        medians[b["name"]] = b["stats"].get("min", b["stats"]["median"])  # min: see compare.time_ratio
        groups[b["name"]] = (group, info.get("strategy"))
    none = {g: medians[name] for name, (g, s) in groups.items() if s == "none"}
    return {name: (medians[name] / none[g] if g in none and none[g] else None) for name, (g, _) in groups.items()}


def compare(baseline: pathlib.Path, current: pathlib.Path, time_tol: float) -> tuple[str, bool]:
    base, cur = ratios(baseline), ratios(current)
    rows, regressed = [], []
    for name in base:
        if name not in cur:
            continue
        r0, r1 = base[name], cur[name]
        if r0 is None or r1 is None:
            verdict = "no `none` in its group: not compared"
        elif r1 > r0 * (1 + time_tol):
            verdict = f"❌ regression: time/none {r0:.2f}→{r1:.2f}"
            regressed.append(name)
        elif r1 < r0 / (1 + time_tol):
            verdict = f"✅ improved: time/none {r0:.2f}→{r1:.2f}"
        else:
            verdict = "ok"
        rows.append(
            f"| `{name}` | {'' if r0 is None else f'{r0:.2f}'} | {'' if r1 is None else f'{r1:.2f}'} | {verdict} |"
        )
    missing = [n for n in base if n not in cur]
    new = [n for n in cur if n not in base]
    failed = bool(regressed or missing)
    out = [
        "## remat_kit step-time benchmarks",
        "",
        f"{'❌ **regression**' if failed else '✅ **no regression**'}: {len(rows)} compared, {len(regressed)} regressed, "
        f"{len(missing)} missing, {len(new)} new (time/none tolerance ×{1 + time_tol:.2f}).",
        "",
    ]
    out += [f"- missing: `{n}`" for n in missing] + [f"- new: `{n}`" for n in new]
    out += [
        "",
        "| benchmark | baseline time/none | current time/none | verdict |",
        "| --- | ---: | ---: | --- |",
        *rows,
    ]
    return "\n".join(out) + "\n", failed
