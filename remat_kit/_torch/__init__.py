"""PyTorch adapter: the only place remat_kit imports torch.

`remat_kit.auto/explain/plan_of/unwrap` dispatch here when the target is a torch ``nn.Module``.
"""

from remat_kit._torch._apply import auto as auto
from remat_kit._torch._apply import unwrap as unwrap
from remat_kit._torch._explain import explain as explain
from remat_kit._torch._explain import plan_of as plan_of

__all__ = ["auto", "explain", "plan_of", "unwrap"]
