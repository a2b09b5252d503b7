"""JAX / Flax adapter: the only place remat_kit imports jax.

`remat_kit.auto` / `explain` / `plan_of` / `unwrap` dispatch here for anything that is not a torch
module; `remat_kit.measure` reaches the measuring functions through this package too. What this
package offers the rest of remat_kit is what it exports here: other packages import nothing from
its private modules (tests/test_import_rules.py).

Both adapters have the same shape: one module per role (trace, graph, plan, run, measure, the
front door `_api.py`, `explain`, the device's time constants), the same file name for the same
role in `_jax/` and `_torch/`; the table is in docs/contributing.md ("Code layout").
"""

from remat_kit._jax._api import auto as auto
from remat_kit._jax._api import plan_of as plan_of
from remat_kit._jax._api import unwrap as unwrap
from remat_kit._jax._explain import explain as explain
from remat_kit._jax._measure import TracedStep as TracedStep
from remat_kit._jax._measure import auto_flops_unrolled as auto_flops_unrolled
from remat_kit._jax._measure import compiled_flops as compiled_flops
from remat_kit._jax._measure import trace_step as trace_step

__all__ = [
    "TracedStep",
    "auto",
    "auto_flops_unrolled",
    "compiled_flops",
    "explain",
    "plan_of",
    "trace_step",
    "unwrap",
]
