"""Named, shareable remat plans, and the stock policies they are compared with.

Stock policies (functions from a cost graph to a Plan) live in the installed library as
`remat_kit.presets` and are re-exported here, so `policies.megatron_selective(graph)` and a
committed plan are used the same way.

A committed policy is a JSON file: the Plan, the budget it was solved for and, where the graph
comes from shapes alone, the recipe that rebuilds it (so tests can re-solve and compare).
Regenerate the examples with ``python -m policies``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import remat_kit as rk
from remat_kit.presets import every_k as every_k
from remat_kit.presets import full as full
from remat_kit.presets import megatron_selective as megatron_selective
from remat_kit.presets import none as none
from remat_kit.presets import recompute_kinds as recompute_kinds
from remat_kit.presets import save_only_kinds as save_only_kinds
from remat_kit.presets import sqrt_n as sqrt_n

HERE = pathlib.Path(__file__).resolve().parent
_BUILDERS = {"transformer_graph": rk.transformer_graph}

# The committed examples: (file stem, description, graph recipe, budget).
EXAMPLES = [
    (
        "gpt_l8_s1024_h256_a4_budget0.5",
        "GPT-style decoder, 8 layers, seq 1024, hidden 256, 4 heads, half the activations",
        {
            "builder": "transformer_graph",
            "args": {"num_layers": 8, "seq_len": 1024, "batch": 1, "hidden": 256, "num_heads": 4},
        },
        0.5,
    ),
    (
        "gpt_l8_s1024_h256_a4_budget0.3",
        "the same model at 30% of its activation memory",
        {
            "builder": "transformer_graph",
            "args": {"num_layers": 8, "seq_len": 1024, "batch": 1, "hidden": 256, "num_heads": 4},
        },
        0.3,
    ),
]


def save(
    path: str | pathlib.Path, plan: rk.Plan, *, description: str = "", graph: dict | None = None, budget: Any = None
) -> None:
    """Write `plan` as a committed policy (with the recipe of its graph when there is one)."""
    doc = {"description": description, "budget": budget, "graph": graph, "plan": json.loads(plan.to_json())}
    pathlib.Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load(path_or_name: str | pathlib.Path) -> rk.Plan:
    """A committed plan by file path or by name (a file stem under policies/)."""
    return _read(path_or_name)[0]


def load_with_graph(path_or_name: str | pathlib.Path) -> tuple[rk.Plan, rk.CostGraph, Any]:
    """(plan, the graph rebuilt from its recipe, budget); for policies made from shapes alone."""
    plan, doc = _read(path_or_name)
    recipe = doc.get("graph")
    if not recipe or recipe.get("builder") not in _BUILDERS:
        raise ValueError(
            f"policy {path_or_name!r} has no graph recipe (graph={recipe!r}); it was made from a traced "
            f"model, so rebuild its graph with that model. Recipes know: {sorted(_BUILDERS)}."
        )
    return plan, _BUILDERS[recipe["builder"]](**recipe["args"]), doc.get("budget")


def _read(path_or_name: str | pathlib.Path) -> tuple[rk.Plan, dict]:
    path = pathlib.Path(path_or_name)
    if not path.suffix:
        path = HERE / f"{path_or_name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in HERE.glob("*.json"))
        raise FileNotFoundError(f"policy {str(path_or_name)!r} not found at {path}; committed policies: {known}.")
    doc = json.loads(path.read_text())
    return rk.Plan.from_json(json.dumps(doc["plan"])), doc


def regenerate() -> list[pathlib.Path]:
    written = []
    for stem, description, recipe, budget in EXAMPLES:
        graph = _BUILDERS[recipe["builder"]](**recipe["args"])
        path = HERE / f"{stem}.json"
        save(path, rk.solve(graph, budget), description=description, graph=recipe, budget=budget)
        written.append(path)
    return written
