"""remat_kit: budgeted gradient checkpointing (rematerialization) for JAX/Flax and PyTorch.

The core (cost graph, exact memory simulator, solvers, plans) needs only numpy and scipy;
framework adapters load lazily, so `import remat_kit` works with jax, torch, both or neither.
"""

import importlib.metadata as _metadata

from remat_kit import measure as measure
from remat_kit import presets as presets
from remat_kit._auto import Explanation as Explanation
from remat_kit._auto import auto as auto
from remat_kit._auto import explain as explain
from remat_kit._auto import plan_of as plan_of
from remat_kit._auto import unwrap as unwrap
from remat_kit._core.analytic import megatron_bytes_per_layer as megatron_bytes_per_layer
from remat_kit._core.analytic import transformer_graph as transformer_graph
from remat_kit._core.budget import Budget as Budget
from remat_kit._core.budget import BudgetLike as BudgetLike
from remat_kit._core.budget import parse_budget as parse_budget
from remat_kit._core.constraints import PlanConstraints as PlanConstraints
from remat_kit._core.graph import CostGraph as CostGraph
from remat_kit._core.graph import DeviceSpec as DeviceSpec
from remat_kit._core.graph import OpKind as OpKind
from remat_kit._core.graph import Role as Role
from remat_kit._core.graph import Value as Value
from remat_kit._core.graph import value as value
from remat_kit._core.plan import Decision as Decision
from remat_kit._core.plan import Plan as Plan
from remat_kit._core.scoring import LayerScore as LayerScore
from remat_kit._core.scoring import format_scores as format_scores
from remat_kit._core.scoring import score_layers as score_layers
from remat_kit._core.simulate import SimResult as SimResult
from remat_kit._core.simulate import simulate as simulate
from remat_kit._core.solve import SOLVERS as SOLVERS
from remat_kit._core.solve import InfeasibleBudgetError as InfeasibleBudgetError
from remat_kit._core.solve import smallest_activation_bytes as smallest_activation_bytes
from remat_kit._core.solve import solve as solve

try:  # one place for the version: pyproject.toml, read back from the installed metadata
    __version__ = _metadata.version("remat_kit")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> object:
    # `remat_kit.resume` needs orbax (and so jax): load it on first use, so that `import remat_kit`
    # keeps working without them. It is left out of __all__ for the same reason.
    if name == "resume":
        import importlib

        return importlib.import_module("remat_kit.resume")
    raise AttributeError(f"module 'remat_kit' has no attribute {name!r}")


__all__ = [
    "SOLVERS",
    "Budget",
    "BudgetLike",
    "Explanation",
    "InfeasibleBudgetError",
    "LayerScore",
    "auto",
    "explain",
    "format_scores",
    "measure",
    "megatron_bytes_per_layer",
    "plan_of",
    "presets",
    "score_layers",
    "smallest_activation_bytes",
    "solve",
    "transformer_graph",
    "unwrap",
    "CostGraph",
    "Decision",
    "DeviceSpec",
    "OpKind",
    "Plan",
    "PlanConstraints",
    "Role",
    "SimResult",
    "Value",
    "parse_budget",
    "simulate",
    "value",
]
