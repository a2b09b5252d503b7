"""PyTorch adapter: the only place remat_kit imports torch.

`remat_kit.auto/explain/plan_of/unwrap` dispatch here when the target is a torch ``nn.Module``;
`remat_kit.measure` reaches the measuring functions through this package too. What this package
offers the rest of remat_kit is what it exports here: other packages import nothing from its
private modules (tests/test_import_rules.py).

Both adapters have the same shape, one module per role, in the order a first call runs them:

| role | JAX (`_jax/`) | PyTorch (`_torch/`) |
| --- | --- | --- |
| trace the step into ops | `_trace.py` (flat jaxpr) | `_trace.py` (dispatch-mode profile; + `_trace_ops.py`, `_trace_recorder.py`, `_trace_backward.py`, `_trace_user.py`) |
| ops -> the core's `CostGraph` | `_graph.py` (+ `_rules.py`, `_sharding.py`) | `_graph.py` (+ `_replicate.py`) |
| graph + budget -> `Plan` | `_plan.py` (+ `_scanplan.py`, `_fit.py`, `_verify.py`, `_plancache.py`) | `_plan.py` (+ `_layerplan.py`) |
| run the planned step | `_run.py` | `_run.py` (+ `_replay.py`, `_modes.py`, `_compiled.py`) |
| measure a step | `_measure.py` | `_measure.py` |
| the front door: `auto`, `unwrap`, `plan_of` | `_api.py` | `_api.py` |
| `explain` | `_explain.py` | `_explain.py` |
| time constants of the device | `_device.py` | `_device.py` |

The helpers in brackets are what only one framework needs: JAX checks a plan against what XLA
compiles; torch finds repeated layers in a Python forward and replays regions op by op.
"""

from remat_kit._torch._api import auto as auto
from remat_kit._torch._api import kv_cache_configs as kv_cache_configs
from remat_kit._torch._api import plan_of as plan_of
from remat_kit._torch._api import unwrap as unwrap
from remat_kit._torch._explain import explain as explain
from remat_kit._torch._measure import Planning as Planning
from remat_kit._torch._measure import StepMeasurement as StepMeasurement
from remat_kit._torch._measure import measure_step as measure_step
from remat_kit._torch._measure import plan_inputs as plan_inputs
from remat_kit._torch._measure import profile_ops as profile_ops

__all__ = [
    "Planning",
    "StepMeasurement",
    "auto",
    "explain",
    "kv_cache_configs",
    "measure_step",
    "plan_inputs",
    "plan_of",
    "profile_ops",
    "unwrap",
]
