"""The report of `python -m benchmarks.conformance`: reports/conformance.json and conformance.md."""

from __future__ import annotations

import json
import os


def _status(row: dict) -> str:
    if row["violations"]:
        return "FAIL: " + "; ".join(v.split("\n")[0][:160] for v in row["violations"])
    floor = row.get("infeasible")
    if floor:
        return (
            f"infeasible: floor {floor['smallest_fraction']:.3f}; at {floor['retry_budget']} measured "
            f"{floor['fraction']:.3f}"
        )
    return "ok"


def write(result: dict, out: str) -> None:
    from remat_kit.measure import format_bytes

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "conformance.json"), "w") as f:
        json.dump(result, f, indent=1)
    rows = result["rows"]
    num_bad = sum(bool(r["violations"]) for r in rows)
    v = result["versions"]
    lines = [
        f"# Conformance: remat_kit.auto on outside models (CPU; torch {v['torch']}, jax {v['jax']}, "
        f"transformers {v['transformers']})",
        "",
        f"Command: `{result['command'].strip()}`",
        "",
        "Each model is the outside library's own class, small config, random weights, dropout on where it has "
        "it. A cell conforms when gradients equal no remat's (same RNG; relative error <= "
        f"{result['grad_tol']:g} per tensor), measured activation memory <= budget + {result['slack']:.1%} of "
        "no remat, or an InfeasibleBudgetError names a floor above the budget that is met when passed back, "
        "parameter/state names are unchanged, and (torch) every buffer after one step equals no remat's "
        "(BatchNorm's running statistics). Measured: live-storage tracker (torch), compiled "
        "temp_size_in_bytes (JAX), as a fraction of no remat. Predicted: the plan's own fraction. Planning "
        "time: wall clock on a shared 2-core machine.",
        "",
        f"**{len(rows) - num_bad} of {len(rows)} cells conform.**",
        "",
        "| model | framework | structure found | budget | measured | predicted | extra FLOPs | grad err | "
        "planning | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "fraction" in r:
            note = f" ({r['flops_note']})" if r.get("flops_note") else ""
            figures = (
                f"{r['fraction']:.3f} ({format_bytes(r['activation_bytes'])})",
                f"{r['predicted_fraction']:.3f}",
                f"{r['extra_flops']:+.1%}{note}",
                f"{r['grad_rel_err']:.1e}",
                f"{r['planning_s']:.1f}s",
            )
        else:
            figures = ("", "", "", "", "")
        lines.append(
            f"| {r['model']} | {r['framework']} | {r.get('structure', '')} | {r['budget']} | "
            + " | ".join(figures)
            + f" | {_status(r)} |"
        )
    lines += ["", "Models:", ""]
    seen = set()
    for r in rows:
        if r["model"] not in seen:
            seen.add(r["model"])
            live = {
                True: "dropout on (another seed changes the gradients)",
                False: "dropout configured but no effect seen",
                None: "dropout on" if r["dropout"] else "no random ops",
            }[r["dropout_live"] if r["dropout"] else None]
            lines.append(
                f"- **{r['model']}**: `{r['source']}`, {r['kind']}; no remat {format_bytes(r['none_bytes'])}; {live}"
            )
    failing = [r for r in rows if r["violations"]]
    if failing:
        lines += ["", "## Failing cells", ""]
        for r in failing:
            lines += [
                f"### {r['model']} at {r['budget']}",
                "",
                "```",
                *"\n".join(r["violations"]).splitlines(),
                "```",
                "",
            ]
    with open(os.path.join(out, "conformance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
