"""JAX / Flax adapter: the only place remat_kit imports jax.

`remat_kit.auto` / `explain` / `plan_of` / `unwrap` dispatch here for anything that is not a torch module.
"""

from remat_kit._jax._api import auto as auto
from remat_kit._jax._api import plan_of as plan_of
from remat_kit._jax._api import unwrap as unwrap
from remat_kit._jax._explain import explain as explain

__all__ = ["auto", "explain", "plan_of", "unwrap"]
