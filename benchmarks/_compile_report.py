"""The tables benchmarks/compile_bench.py writes into reports/torch/compile.md, one section per
model shape: every strategy's cells, compiled `auto` against compiled per-layer checkpoint, and
the notes to read them by."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch


def _table(cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| strategy | graph breaks | eager activation / eager none | saved bytes | saved / compiled none | "
        "activation peak (Inductor's code) | compiled peak | compiled peak less gradients | less gradients / compiled none's | eager peak (same measure) | "
        "budget (bytes) | step CPU time / compiled none | max grad error vs compiled none |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cells.items():
        if "infeasible" in c:
            lines.append(f"| {name} | {c['infeasible']} (InfeasibleBudgetError) | | | | | | | | | | | |")
            continue
        budget = f"{c['budget_bytes']:,}" if "budget_bytes" in c else ""
        eager = "" if c["budget"] is not None else f"{c['eager_ratio']:.3f}"
        eager_peak = f"{c['eager_peak_bytes']:,}" if "eager_peak_bytes" in c else ""
        lines.append(
            f"| {name} | {c['breaks']} | {eager} | {c['saved_bytes']:,} | {c['saved_ratio']:.3f} | {_code(c)} | "
            f"{c['peak_bytes']:,} | {c['peak_less_grads']:,} | {c['peak_ratio']:.3f} | {eager_peak} | {budget} | "
            f"{c['time_ratio']:.2f} | {c['grad_err']:.1e} |"
        )
    return lines


def against_checkpoint(cells: dict[str, dict[str, Any]]) -> list[str]:
    """Each compiled `auto` against compiled per-layer checkpoint, by each memory measure."""
    ref = cells.get("per-layer checkpoint")
    if ref is None:
        return []
    lines = [
        "| auto | saved <= checkpoint's | activation peak (Inductor's code) <= checkpoint's | "
        "resident-set peak <= checkpoint's | step CPU time / checkpoint's |",
        "|---|---|---|---|---|",
    ]
    for name, c in cells.items():
        if c.get("auto_budget") is None or "infeasible" in c:
            continue
        lines.append(
            f"| {name} | {'yes' if c['saved_bytes'] <= ref['saved_bytes'] else 'no'} | {_code_le(c, ref)} | "
            f"{'yes' if c['peak_bytes'] <= ref['peak_bytes'] else 'no'} | {c['cpu_s'] / ref['cpu_s']:.2f} |"
        )
    return lines


def _code_le(c: dict[str, Any], ref: dict[str, Any]) -> str:
    a, b = c.get("code_peak"), ref.get("code_peak")
    return ("yes" if a <= b else "no") if isinstance(a, int) and isinstance(b, int) else ""


def _verdict(lower: int, upper: int, budget: int) -> str:
    if upper <= budget:
        return "held (even with gradients)"
    if lower > budget:
        return "**over the budget**"
    return "not decided (budget between the bounds)"


def _code(c: dict[str, Any]) -> str:
    peak = c.get("code_peak")
    return f"{peak:,}" if isinstance(peak, int) else (f"unread: {peak}" if peak else "")


def _code_verdict(c: dict[str, Any]) -> str:
    peak = c.get("code_peak")
    if not isinstance(peak, int):
        return ""
    return "held" if peak <= c["budget_bytes"] else "**over the budget**"


def against_budget(cells: dict[str, dict[str, Any]]) -> list[str]:
    """Each `auto`'s budget against its compiled activation peak read from Inductor's code, and
    against the resident-set peak's bounds on activation memory: the peak less every gradient
    (below the activation peak) and the peak itself (above it)."""
    lines = [
        "| auto | budget (bytes) | compiled activation peak (Inductor's code) | by it | "
        "compiled peak less gradients | compiled peak | eager peak less gradients | by the resident set |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cells.items():
        if c.get("auto_budget") is None or "infeasible" in c:
            continue
        eager = f"{c['eager_peak_bytes'] - c['grad_bytes']:,}" if "eager_peak_bytes" in c else ""
        lines.append(
            f"| {name} | {c['budget_bytes']:,} | {_code(c)} | {_code_verdict(c)} | {c['peak_less_grads']:,} | "
            f"{c['peak_bytes']:,} | {eager} | {_verdict(c['peak_less_grads'], c['peak_bytes'], c['budget_bytes'])} |"
        )
    return lines


NOTES = [
    "- The budget of `auto` bounds the eager step's activation peak (its plan is made from the eager profile); "
    "`budget (bytes)` is that budget times eager none's activation peak, beside the compiled peak.",
    "- Peaks are the rise of the resident set over one step, gradients set to None before it (as "
    "`zero_grad(set_to_none=True)` leaves them). The peak holds the gradients the backward has made by then; "
    "less all of them (the parameters' distinct storages, the same bytes for every strategy) it is a lower bound on "
    "the step's activation (and workspace) peak, and the peak itself an upper bound. The eager peak is the same "
    "model's eager step by the same measure, beside the budget that remat_kit's live-storage tracker holds.",
    "- `compile memory budget` (torch._functorch.config.activation_memory_budget) recomputes dropout with fresh "
    "random numbers: its gradient error is pytorch#190758.",
    "- Step CPU time is process CPU time (both threads), medians over interleaved rounds, timed after the peaks "
    "under glibc's heap thresholds as they settle in a training process (`steady_heap`); a remat strategy below 1 "
    "is not free recompute: a smaller working set costs less memory traffic.",
]
BEFORE_NOTE = (
    "Before issue 12, saved bytes counted only what the compiled graphs saved (saved_tensors_hooks do not see "
    "inside the eager checkpoint regions), and the planned layers drew dropout from the eager generator while "
    "compiled none's dropout is Inductor's: the gradients are those of other masks (the grad-error column)."
)


def section(args: argparse.Namespace, cmd: str, cells: dict, before: dict | None) -> list[str]:
    lines = [
        f"## GPT {args.layers} layers, d {args.d}, seq {args.seq}, batch {args.batch}",
        "",
        f"Command: `{cmd}` (dropout 0.1, backend {args.backend}, {args.threads} threads, {args.steps} rounds, CPU, "
        f"torch {torch.__version__}).",
        "",
        *_table(cells),
        "",
        "Compiled `auto` against compiled per-layer checkpoint (step CPU time from the same rounds):",
        "",
        *against_checkpoint(cells),
        "",
        "Compiled `auto` against its budget, by the activation peak of Inductor's generated code (exact) and by "
        "the resident-set peak (bounds on activation memory):",
        "",
        *against_budget(cells),
        "",
        *NOTES,
    ]
    if before is not None:
        lines += [
            "",
            "Before: each planned layer a graph break running the eager replay (`REMAT_KIT_COMPILE_EAGER=1`,"
            " own process).",
            "",
            *_table(before),
            "",
            BEFORE_NOTE,
        ]
    return lines


def write_section(path: str, key: str, lines: list[str]) -> None:
    """Put `lines` into `path` between the markers of `key`, replacing that section if it is there
    and keeping the rest of the file (other shapes, the text written around them)."""
    start, end = f"<!-- compile_bench {key} -->", f"<!-- end compile_bench {key} -->"
    text = open(path).read() if os.path.exists(path) else "# torch.compile: remat strategies compiled\n\n"
    block = "\n".join([start, *lines, end])
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
