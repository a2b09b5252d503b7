"""Stock remat strategies (none, full, every-k, by op kind, Megatron selective) as plans."""

from remat_kit._core.presets import every_k as every_k
from remat_kit._core.presets import full as full
from remat_kit._core.presets import megatron_selective as megatron_selective
from remat_kit._core.presets import none as none
from remat_kit._core.presets import recompute_kinds as recompute_kinds
from remat_kit._core.presets import save_only_kinds as save_only_kinds
from remat_kit._core.presets import sqrt_n as sqrt_n

__all__ = ["every_k", "full", "megatron_selective", "none", "recompute_kinds", "save_only_kinds", "sqrt_n"]
