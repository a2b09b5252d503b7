"""JAX / Flax adapter: the only place remat_kit imports jax.

`remat_kit.auto` / `remat_kit.explain` dispatch here for anything that is not a torch module.
"""

from remat_kit._jax._api import auto as auto
from remat_kit._jax._api import unwrap as unwrap
from remat_kit._jax._explain import explain as explain

__all__ = ["auto", "explain", "unwrap"]
