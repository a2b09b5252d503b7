"""Which processes save one checkpoint together, and the few collectives the layer needs.

Three cases, told apart when a `Resumable` is created:

* one process: nothing to agree on;
* multi-process JAX (`jax.process_count() > 1` after `jax.distributed.initialize`): every
  process runs Orbax, Orbax coordinates the commit; the layer's own decisions (which step is
  good, whether a template matches) are agreed through `jax.experimental.multihost_utils`;
* torch.distributed (`torch.distributed.is_initialized()`, world size > 1): each rank is a
  separate single-process JAX, so only rank 0 runs Orbax; the ranks stage their own files and
  agree through the default process group (gloo or NCCL) before rank 0 commits.

The collectives are deliberately few and all blocking: a save or a restore is a point every
process reaches together, as in Orbax's own multi-process contract.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

_KINDS = ("auto", "single", "jax", "torch")


def _torch_world() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _jax_process_count() -> int:
    jax = sys.modules.get("jax")
    return 1 if jax is None else jax.process_count()


@dataclasses.dataclass(frozen=True)
class Processes:
    """The processes that save and restore together; `kind` is "single", "jax" or "torch"."""

    kind: str
    index: int
    count: int

    @property
    def is_primary(self) -> bool:
        return self.index == 0

    @property
    def runs_orbax(self) -> bool:
        """Under torch.distributed only rank 0 talks to Orbax (each rank is its own JAX world)."""
        return self.kind != "torch" or self.is_primary

    def barrier(self, name: str) -> None:
        if self.kind == "jax":
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"remat_kit.resume:{name}")
        elif self.kind == "torch":
            _torch_world().barrier()

    def all_true(self, value: bool) -> bool:
        """True when `value` is true on every process (each process learns the same answer)."""
        return all(self.gather(bool(value)))

    def gather(self, value: Any) -> list[Any]:
        """The JSON-able `value` of every process, in process order, on every process."""
        if self.kind == "single":
            return [value]
        if self.kind == "torch":
            out: list[Any] = [None] * self.count
            _torch_world().all_gather_object(out, value)
            return out
        import json

        import numpy as np
        from jax.experimental import multihost_utils

        # JSON bytes padded to the longest, gathered as uint8: every process sees every value.
        data = np.frombuffer(json.dumps(value).encode(), np.uint8)
        lengths = multihost_utils.process_allgather(np.array([data.size], np.int64))
        padded = np.zeros(int(np.max(lengths)), np.uint8)
        padded[: data.size] = data
        rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(self.count, -1)
        return [json.loads(bytes(row[: int(n)])) for row, n in zip(rows, np.asarray(lengths).reshape(-1))]

    def broadcast(self, value: Any) -> Any:
        """Process 0's JSON-able `value`, on every process."""
        return self.gather(value)[0]


def detect(kind: str = "auto") -> Processes:
    """The processes of this job. `kind="auto"` prefers torch.distributed when it is initialized
    with more than one rank, then multi-process JAX, then a single process."""
    if kind not in _KINDS:
        raise ValueError(f"processes={kind!r} is not allowed; pass one of {_KINDS}.")
    world = _torch_world()
    if kind == "torch" or (kind == "auto" and world is not None):
        if world is None:
            raise ValueError(
                "processes='torch' needs torch.distributed.init_process_group() to have run with "
                "more than one rank; call it first, or pass processes='auto'."
            )
        return Processes("torch", world.get_rank(), world.get_world_size())
    if kind == "jax" or (kind == "auto" and _jax_process_count() > 1):
        import jax

        return Processes("jax", jax.process_index(), jax.process_count())
    return Processes("single", 0, 1)
