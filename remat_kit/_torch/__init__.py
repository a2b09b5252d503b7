"""PyTorch adapter: the only place remat_kit imports torch.

`remat_kit.auto/explain/plan_of/unwrap` dispatch here when the target is a torch ``nn.Module``;
`remat_kit.measure` reaches the measuring functions through this package too. What this package
offers the rest of remat_kit is what it exports here: other packages import nothing from its
private modules (tests/test_import_rules.py).

Both adapters have the same shape: one module per role (trace, graph, plan, run, measure, the
front door `_api.py`, `explain`, the device's time constants), the same file name for the same
role in `_jax/` and `_torch/`; the table is in docs/contributing.md ("Code layout").
"""

from remat_kit._torch._api import auto as auto
from remat_kit._torch._api import kv_cache_configs as kv_cache_configs
from remat_kit._torch._api import plan_of as plan_of
from remat_kit._torch._api import unwrap as unwrap
from remat_kit._torch._explain import explain as explain
from remat_kit._torch._measure import Planning as Planning
from remat_kit._torch._measure import PredictedParts as PredictedParts
from remat_kit._torch._measure import StepMeasurement as StepMeasurement
from remat_kit._torch._measure import measure_step as measure_step
from remat_kit._torch._measure import plan_inputs as plan_inputs
from remat_kit._torch._measure import predicted_parts as predicted_parts
from remat_kit._torch._measure import profile_ops as profile_ops

__all__ = [
    "Planning",
    "PredictedParts",
    "StepMeasurement",
    "auto",
    "explain",
    "kv_cache_configs",
    "measure_step",
    "plan_inputs",
    "plan_of",
    "predicted_parts",
    "profile_ops",
    "unwrap",
]
