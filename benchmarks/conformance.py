"""Conformance: `remat_kit.auto` on models written outside this project, held to its contract.

For every model in benchmarks/models/outside_torch.py and outside_jax.py (Hugging Face decoder,
encoder, encoder-decoder, ViT, MoE and Gemma-style models, x-transformers, mambapy; penzai,
equinox and haiku models; small configs, random weights, dropout on where the model has it) and
every budget, one training step with `auto` is checked against no remat in the same process:

- gradients equal to no remat's, same RNG (dropout masks replayed), relative error <= 1e-5 per tensor;
- measured activation memory <= budget + 0.1% of no remat, or an `InfeasibleBudgetError` whose
  smallest feasible budget is above the one asked for and, when passed back, is met as measured;
- parameter and state names (torch: named_parameters, state_dict; JAX: the gradient and aux
  trees) unchanged; no other exception.

Memory is remat_kit's own measurement: torch, the live-storage tracker (`measure_step`); JAX, XLA's
`temp_size_in_bytes` of the compiled `jit(grad(loss))`. Extra FLOPs: torch FlopCounterMode
(recompute included; elementwise ops count nothing), JAX `cost_analysis()` of the compiled step
(a scan body is counted once: marked on scanned models). Planning time: the first `auto` step's
time less a second step's (torch), or tracing with `auto` less tracing without (JAX); wall clock
on a shared machine, for orientation only.

    python -m benchmarks.conformance                         # every model, budgets 0.3 0.5 0.7
    python -m benchmarks.conformance --models hf-llama haiku-mlp --budgets 0.5

Writes reports/conformance.json and reports/conformance.md. tests/conformance/ runs the same cells
and fails on any violation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from typing import Any

from benchmarks import conformance_report

BUDGETS = (0.3, 0.5, 0.7)
# Measured may exceed budget x none by this fraction of none: the loss scalar and its seed, no
# more (the contract has no slack; at 1% HF ConvNeXt's 0.702 at budget 0.7 passed unseen).
SLACK = 0.001
GRAD_TOL = 1e-5  # per tensor: max |auto - none| / max |none|, fp32


def violations(row: dict) -> list[str]:
    """What in one cell breaks the contract (empty: the cell conforms)."""
    if "error" in row:
        return [f"exception: {row['error']}"]
    out = []
    if row.get("infeasible"):
        floor = row["infeasible"]
        if not floor["smallest_fraction"] > row["budget"]:
            out.append(
                f"InfeasibleBudgetError names smallest feasible {floor['smallest_fraction']:.4f}, "
                f"not above the budget {row['budget']}"
            )
        if "error" in floor:
            out.append(f"at the named floor {floor['retry_budget']}: exception: {floor['error']}")
        elif floor.get("fraction") is not None and floor["fraction"] > floor["retry_budget"] + SLACK:
            out.append(f"at the named floor {floor['retry_budget']}: measured {floor['fraction']:.4f} of none")
        if floor.get("buffers_differ"):
            out.append(f"at the named floor {floor['retry_budget']}: buffers differ: {floor['buffers_differ']}")
        return out
    if row["fraction"] > row["budget"] + SLACK:
        out.append(
            f"over budget: measured {row['fraction']:.4f} of none ({row['activation_bytes']} of "
            f"{row['none_bytes']} bytes) at budget {row['budget']}"
        )
    if not row["grad_rel_err"] <= GRAD_TOL:
        out.append(f"gradients differ from no remat: max relative error {row['grad_rel_err']:.3e}")
    if not row["names_unchanged"]:
        out.append(f"names changed: {row['names_diff']}")
    if row.get("buffers_differ"):
        out.append(f"buffers differ from no remat's after one step: {row['buffers_differ']}")
    return out


def _error(e: BaseException) -> str:
    tail = "".join(traceback.format_exception(e)[-6:])
    return f"{type(e).__name__}: {str(e)[:400]}\n{tail[-1500:]}"


def _structure(plan: Any) -> str:
    """The blocks the plan was made over, as patterns: digits folded, counted."""
    names = [n for n in plan.block_names if n not in ("pre", "post")]
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\d+", "#", n)
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{k} x{c}" if c > 1 else k for k, c in counts.items()]
    text = f"{len(names)} blocks: " + ", ".join(parts)
    if plan.segments:
        text += f"; {len(plan.segments)} segments"
    return text


def _row(case: Any, framework: str, budget: float, none_bytes: int, dropout_live: bool | None) -> dict[str, Any]:
    """A cell's identity, filled in by the step or the infeasible check."""
    return dict(
        model=case.name,
        framework=framework,
        source=case.source,
        kind=case.kind,
        budget=budget,
        none_bytes=none_bytes,
        dropout=case.dropout,
        dropout_live=dropout_live,
    )


def _floor_budget(e: Any) -> float:
    """The smallest feasible budget as a user reads it off the message (3 decimals, rounded up)."""
    return math.ceil(e.smallest_fraction * 1000 - 1e-9) / 1000


# -- PyTorch -------------------------------------------------------------------------------------
def _torch_names(model: Any) -> tuple:
    return tuple(n for n, _ in model.named_parameters()), tuple(model.state_dict().keys())


def _torch_step(model: Any, case: Any, kwargs: dict, seed: int = 1) -> list:
    import torch

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    case.loss(model(**kwargs)).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _buffers_after_step(model: Any, case: Any, kwargs: dict) -> dict[str, Any]:
    """The model's buffers (BatchNorm's running statistics...) after one training step of it."""
    _torch_step(model, case, kwargs)
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _buffers_differ(expected: dict[str, Any], model: Any) -> str:
    """The buffers of `model` not equal to `expected` (no remat's after the same step), or ""."""
    import torch

    got = dict(model.named_buffers())
    return ", ".join(n for n, b in expected.items() if n not in got or not torch.equal(got[n], b))[:300]


def _torch_measure(model: Any, case: Any, kwargs: dict) -> Any:
    import torch

    from remat_kit.measure import torch_step

    torch.manual_seed(1)
    return torch_step(model, (), kwargs, loss_fn=case.loss, count_flops=True)


def torch_cells(case: Any, budgets: list[float]) -> list[dict]:
    import torch

    import remat_kit as rk
    from remat_kit.measure import hf_kv_cache_configs, rel_err

    torch.manual_seed(0)
    model = case.build().train()
    for config in hf_kv_cache_configs(model):  # as auto runs the model (hf_zoo: the budget's baseline)
        config.use_cache = False
    kwargs = case.kwargs()
    names = _torch_names(model)
    reference = _torch_step(model, case, kwargs)
    dropout_live = rel_err(_torch_step(model, case, kwargs, seed=2), reference) > 1e-3
    none = _torch_measure(model, case, kwargs)
    buffers = _buffers_after_step(copy.deepcopy(model), case, kwargs)  # what one step leaves
    floors: dict[float, dict] = {}  # retry budget -> its check: budgets below one floor share it
    rows = []
    for budget in budgets:
        row = _row(case, "torch", budget, none.activation_bytes, dropout_live)
        try:
            rematted = rk.auto(copy.deepcopy(model), budget)
            t0 = time.perf_counter()
            try:
                first = _torch_step(rematted, case, kwargs)
            except rk.InfeasibleBudgetError as e:
                retry = _floor_budget(e)
                if retry not in floors:
                    floors[retry] = _torch_floor(model, case, kwargs, e, none.activation_bytes, buffers)
                row["infeasible"] = {**floors[retry], "smallest_fraction": e.smallest_fraction, "message": str(e)[:300]}
                rows.append(row)
                continue
            t1 = time.perf_counter()
            buffers_differ = _buffers_differ(buffers, rematted)  # planning and recompute move none
            again = _torch_step(rematted, case, kwargs)
            t2 = time.perf_counter()
            measured = _torch_measure(rematted, case, kwargs)
            plan = rk.plan_of(rematted)[-1]
            after = _torch_names(rematted)
            row.update(
                activation_bytes=measured.activation_bytes,
                fraction=measured.activation_bytes / none.activation_bytes,
                predicted_bytes=plan.predicted_activation_bytes,
                predicted_fraction=plan.activation_fraction,
                extra_flops=measured.flops / none.flops - 1 if none.flops else 0.0,
                grad_rel_err=max(rel_err(first, reference), rel_err(again, reference)),
                names_unchanged=after == names,
                names_diff=_diff(names, after),
                buffers_differ=buffers_differ,
                planning_s=max(0.0, (t1 - t0) - (t2 - t1)),
                structure=_structure(plan),
            )
        except Exception as e:  # recorded per cell: one failing budget does not hide the others
            row["error"] = _error(e)
        rows.append(row)
    return rows


def _torch_floor(model: Any, case: Any, kwargs: dict, e: Any, none_bytes: int, buffers: dict) -> dict:
    """Pass the budget the error names back to auto: it must be met."""
    import remat_kit as rk

    out: dict[str, Any] = dict(
        smallest_fraction=e.smallest_fraction, retry_budget=_floor_budget(e), message=str(e)[:300]
    )
    try:
        rematted = rk.auto(copy.deepcopy(model), out["retry_budget"])
        _torch_step(rematted, case, kwargs)
        out["buffers_differ"] = _buffers_differ(buffers, rematted)
        out["fraction"] = _torch_measure(rematted, case, kwargs).activation_bytes / none_bytes
    except Exception as err:
        out["error"] = _error(err)
    return out


def _diff(before: tuple, after: tuple) -> str:
    if before == after:
        return ""
    return "; ".join(
        f"only before: {sorted(set(b) - set(a))[:4]}, only after: {sorted(set(a) - set(b))[:4]}"
        for b, a in zip(before, after)
    )


# -- JAX -----------------------------------------------------------------------------------------
def _jax_compile(loss: Any, model: Any) -> tuple[Any, float]:
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(jax.grad(loss, has_aux=model.has_aux)).lower(model.params, model.batch)
    traced_s = time.perf_counter() - t0
    return lowered.compile(), traced_s


def jax_cells(case: Any, budgets: list[float]) -> list[dict]:
    import jax

    import remat_kit as rk
    from remat_kit.measure import jax_flops, rel_err

    model = case.build()
    compiled, none_traced_s = _jax_compile(model.loss, model)
    none_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    none_flops = jax_flops(compiled)
    reference = compiled(model.params, model.batch)
    dropout_live = None if model.reseeded is None else rel_err(compiled(model.params, model.reseeded), reference) > 1e-3
    floors: dict[float, dict] = {}
    rows = []
    for budget in budgets:
        row = _row(case, "jax", budget, none_bytes, dropout_live)
        try:
            wrapped = rk.auto(model.loss, budget)
            try:
                planned, traced_s = _jax_compile(wrapped, model)
            except rk.InfeasibleBudgetError as e:
                retry = _floor_budget(e)
                if retry not in floors:
                    floors[retry] = _jax_floor(model, e, none_bytes)
                row["infeasible"] = {**floors[retry], "smallest_fraction": e.smallest_fraction, "message": str(e)[:300]}
                rows.append(row)
                continue
            got = planned(model.params, model.batch)
            plan = rk.plan_of(wrapped)[-1]
            measured = int(planned.memory_analysis().temp_size_in_bytes)
            row.update(
                activation_bytes=measured,
                fraction=measured / none_bytes,
                predicted_bytes=plan.predicted_activation_bytes,
                predicted_fraction=plan.activation_fraction,
                extra_flops=jax_flops(planned) / none_flops - 1 if none_flops else 0.0,
                flops_note="scan body counted once" if case.scanned else "",
                grad_rel_err=rel_err(got, reference),
                names_unchanged=jax.tree.structure(got) == jax.tree.structure(reference),
                names_diff=f"{jax.tree.structure(got)} vs {jax.tree.structure(reference)}"[:300],
                planning_s=max(0.0, traced_s - none_traced_s),
                structure=_structure(plan),
            )
        except Exception as e:
            row["error"] = _error(e)
        rows.append(row)
    return rows


def _jax_floor(model: Any, e: Any, none_bytes: int) -> dict:
    import remat_kit as rk

    out: dict[str, Any] = dict(
        smallest_fraction=e.smallest_fraction, retry_budget=_floor_budget(e), message=str(e)[:300]
    )
    try:
        planned, _ = _jax_compile(rk.auto(model.loss, out["retry_budget"]), model)
        out["fraction"] = int(planned.memory_analysis().temp_size_in_bytes) / none_bytes
    except Exception as err:
        out["error"] = _error(err)
    return out


# -- the run and its report ----------------------------------------------------------------------
def all_cases() -> dict[str, tuple[str, Any]]:
    """name -> (framework, case), every outside model."""
    from benchmarks.models import outside_jax, outside_torch

    return {
        **{n: ("torch", c) for n, c in outside_torch.cases().items()},
        **{n: ("jax", c) for n, c in outside_jax.cases().items()},
    }


def run_case(name: str, budgets: list[float] | tuple[float, ...] = BUDGETS) -> list[dict]:
    framework, case = all_cases()[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="remat_kit.auto: setting")
        rows = (torch_cells if framework == "torch" else jax_cells)(case, list(budgets))
    for row in rows:
        row["violations"] = violations(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    names = list(all_cases())
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=names, choices=names)
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--out", default="reports")
    ap.add_argument(
        "--update",
        action="store_true",
        help="rerun --models only: the other models' rows are kept from the report's JSON, with its command",
    )
    args = ap.parse_args(argv)
    if args.update and not os.path.exists(os.path.join(args.out, "conformance.json")):
        ap.error(f"--update keeps rows from an earlier run's conformance.json, and --out {args.out!r} has none")
    # Planning time is a first run's: plans verified in an earlier run are not read from disk.
    os.environ.setdefault("REMAT_KIT_PLAN_CACHE", "0")
    import jax
    import torch
    import transformers

    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        rows += run_case(name, args.budgets)
        bad = sum(bool(r["violations"]) for r in rows if r["model"] == name)
        print(f"{name:22s} {time.perf_counter() - t0:6.1f}s  {bad} failing cells", flush=True)
    command = "python -m benchmarks.conformance " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.update:  # the models not rerun keep their rows, in the suite's order
        with open(os.path.join(args.out, "conformance.json")) as f:
            earlier = json.load(f)
        fresh = {r["model"] for r in rows}
        kept = [r for r in earlier["rows"] if r["model"] not in fresh]
        rows = sorted(kept + rows, key=lambda r: names.index(r["model"]) if r["model"] in names else len(names))
        command = f"{earlier['command'].strip()}; then {command}"
    result = dict(
        command=command,
        versions=dict(torch=torch.__version__, jax=jax.__version__, transformers=transformers.__version__),
        slack=SLACK,
        grad_tol=GRAD_TOL,
        rows=rows,
    )
    conformance_report.write(result, args.out)
    return result


if __name__ == "__main__":
    main()
