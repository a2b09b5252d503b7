"""remat_kit: budgeted gradient checkpointing (rematerialization) for JAX/Flax and PyTorch.

The core (cost graph, exact memory simulator, solvers, plans) needs only numpy and scipy;
framework adapters load lazily, so `import remat_kit` works with jax, torch, both or neither.
"""

from remat_kit._core.budget import Budget as Budget
from remat_kit._core.budget import parse_budget as parse_budget
from remat_kit._core.graph import CostGraph as CostGraph
from remat_kit._core.graph import DeviceSpec as DeviceSpec
from remat_kit._core.graph import OpKind as OpKind
from remat_kit._core.graph import Role as Role
from remat_kit._core.graph import Value as Value
from remat_kit._core.graph import value as value
from remat_kit._core.plan import Decision as Decision
from remat_kit._core.plan import Plan as Plan
from remat_kit._core.simulate import SimResult as SimResult
from remat_kit._core.simulate import simulate as simulate

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CostGraph",
    "Decision",
    "DeviceSpec",
    "OpKind",
    "Plan",
    "Role",
    "SimResult",
    "Value",
    "parse_budget",
    "simulate",
    "value",
]
