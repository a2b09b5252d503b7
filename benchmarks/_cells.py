"""Which cells a sweep runs: (framework, model, size, strategy, budget), in a fixed order.

No jax or torch here: the sweep's parent process plans and shards cells without loading either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from benchmarks.models import SIZES, TRANSFORMERS, models_for

FRAMEWORKS = ("jax", "torch")
# Every default budget is feasible on every default model: 0.3 is below the floor of the torch tiny
# GPT (every layer recomputed, embeddings/head/loss kept), which the `infeasible` suite shows.
DEFAULT_BUDGETS = (0.35, 0.5, 0.7)

# name -> (frameworks, takes a budget, transformers only, what it is)
STRATEGIES: dict[str, tuple[tuple[str, ...], bool, bool, str]] = {
    "none": (FRAMEWORKS, False, False, "no remat: every activation kept"),
    "all": (FRAMEWORKS, False, False, "every block checkpointed (only block inputs kept)"),
    "attn_core": (FRAMEWORKS, False, True, "Megatron selective: recompute attention scores/softmax only"),
    "every_2": (FRAMEWORKS, False, False, "every other block checkpointed"),
    "sqrt_n": (FRAMEWORKS, False, False, "~sqrt(n) segments, each checkpointed whole (checkpoint_sequential)"),
    "dots_saveable": (("jax",), False, False, "jax.checkpoint_policies.dots_saveable per block"),
    "dots_no_batch": (("jax",), False, False, "jax.checkpoint_policies.dots_with_no_batch_dims_saveable per block"),
    "sac_mm": (("torch",), False, False, "torchtitan-style selective AC: save matmul outputs, recompute the rest"),
    "auto": (FRAMEWORKS, True, False, "remat_kit.auto(model, budget=b)"),
    "compile+auto": (("torch",), True, False, "torch.compile of remat_kit.auto(model, budget=b)"),
    "compile+checkpoint": (("torch",), False, False, "torch.compile, every block checkpointed"),
    "compile+sac_mm": (("torch",), False, False, "torch.compile, torchtitan-style SAC saving matmul outputs"),
    "compile_budget": (("torch",), True, False, "torch.compile with torch._functorch.config.activation_memory_budget"),
}
# Timed against compiled none, memory as saved-for-backward bytes (see benchmarks/_compiled_cell.py).
COMPILED = ("compile+auto", "compile+checkpoint", "compile+sac_mm", "compile_budget")
GROUPS = {
    "presets": ("attn_core", "every_2", "sqrt_n"),
    "peers": ("dots_saveable", "dots_no_batch", "sac_mm", "compile_budget"),
    "compiled": COMPILED,
}
DEFAULT_STRATEGIES = ("none", "all", "attn_core", "sqrt_n", "dots_saveable", "sac_mm", "auto")
DEFAULT_MODELS = ("gpt", "mlp")
# --suite NAME: defaults for the settings not given on the command line.
SUITES: dict[str, dict[str, tuple]] = {
    "quick": {},
    # auto below the tiny torch GPT's floor: the cell must be an InfeasibleBudgetError naming it.
    "infeasible": {
        "frameworks": ("torch",),
        "models": ("gpt",),
        "strategies": ("none", "all", "auto"),
        "budgets": (0.2, 0.3),
    },
    "compiled": {"frameworks": ("torch",), "strategies": ("none", "compiled")},
}


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    framework: str
    model: str
    size: str
    strategy: str
    budget: float | None = None

    @property
    def id(self) -> str:
        tail = f"@{self.budget:g}" if self.budget is not None else ""
        return f"{self.framework}/{self.model}/{self.size}/{self.strategy}{tail}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def expand_strategies(names: Iterable[str]) -> list[str]:
    """Strategy names with group names ("presets", "peers", "all-strategies") expanded, order kept."""
    out: list[str] = []
    for name in names:
        found = list(STRATEGIES) if name == "all-strategies" else GROUPS.get(name, (name,))
        for n in found:
            if n not in STRATEGIES:
                raise ValueError(
                    f"--strategies got {name!r}; choose from {', '.join(STRATEGIES)}, "
                    f"or a group: {', '.join(GROUPS)}, all-strategies."
                )
            if n not in out:
                out.append(n)
    return out


def plan_cells(
    frameworks: Iterable[str],
    models: Iterable[str],
    sizes: Iterable[str],
    strategies: Iterable[str],
    budgets: Iterable[float],
) -> list[Cell]:
    """Every applicable cell, `none` first within each (framework, model, size) so ratios have a base."""
    budgets = [float(b) for b in budgets]
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"--budgets got {b!r}; a budget is a fraction of no-remat activation memory in (0, 1].")
    strategies = expand_strategies(strategies)
    cells = []
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise ValueError(f"--frameworks got {fw!r}; choose from {', '.join(FRAMEWORKS)}.")
        for model in models:
            if model not in models_for("jax"):
                raise ValueError(f"--models got {model!r}; choose from {', '.join(models_for('jax'))}.")
            if model not in models_for(fw):
                continue  # gpt_unrolled is JAX only
            for size in sizes:
                if size not in SIZES:
                    raise ValueError(f"--size got {size!r}; choose from {', '.join(SIZES)}.")
                for strategy in strategies:
                    fws, takes_budget, transformer_only, _ = STRATEGIES[strategy]
                    if fw not in fws or (transformer_only and model not in TRANSFORMERS):
                        continue
                    for b in budgets if takes_budget else [None]:
                        cells.append(Cell(fw, model, size, strategy, b))
    return cells


def shard(cells: list[Cell], spec: str | None) -> list[Cell]:
    """`--shard K/N`: cells whose index is K-1 mod N (1-based K), so N shards cover every cell once."""
    if spec is None:
        return cells
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        k = n = 0
    if not (n >= 1 and 1 <= k <= n):
        raise ValueError(f"--shard {spec!r} is not allowed; pass K/N with 1 <= K <= N, e.g. --shard 2/4.")
    return [c for i, c in enumerate(cells) if i % n == k - 1]
