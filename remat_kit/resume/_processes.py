"""Which processes save one checkpoint together, and the few collectives the layer needs.

Three cases, told apart when a `Resumable` is created:

* one process: nothing to agree on;
* multi-process JAX (`jax.process_count() > 1` after `jax.distributed.initialize`): every
  process runs Orbax, Orbax coordinates the commit; the layer's own decisions (which step is
  good, whether a template matches) are agreed through the JAX distributed client's key-value
  store and barriers (RPCs to the coordinator, no device computation);
* torch.distributed (`torch.distributed.is_initialized()`, world size > 1): each rank is a
  separate single-process JAX, so only rank 0 runs Orbax; the ranks stage their own files and
  agree through a gloo group of the layer's own before rank 0 commits.

The collectives are deliberately few and all blocking: a save or a restore is a point every
process reaches together, as in Orbax's own multi-process contract. Each waits at most
`timeout_s`: a process that died mid-save must not leave the others waiting until the launcher
ends the job. After one collective failed, every later one fails at once (the job is broken;
waiting again at close() would only double the time to exit).

Why a group of the layer's own under torch: its timeout is the layer's, not the user's default
group's (30 min, or NCCL's); object collectives stay on CPU under NCCL; and the layer's works,
whose tensors are Python objects, are not held by the user's own barriers on the default group.
A gloo worker freeing such a work needs the GIL, and the default group is often destroyed last
by DDP's reducer, which holds the GIL while it joins the workers: that deadlock hung the DDP
example at exit (see reports/resume.md).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import sys
import time
from typing import Any

from remat_kit.resume._errors import CollectiveError

_KINDS = ("auto", "single", "jax", "torch")
DEFAULT_TIMEOUT_S = 600.0
# One sequence for every collective of the layer in this process: the processes call them in the
# same order (the multi-process contract), so the n-th call has the same key everywhere.
_SEQUENCE = itertools.count()
_PREFIX = "remat_kit.resume"


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


def check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(
            f"collective_timeout={timeout!r} is not allowed; pass the seconds (a number > 0) a process "
            f"waits for the others at a save or restore, e.g. {DEFAULT_TIMEOUT_S:.0f}."
        )
    return float(timeout)


class Processes:
    """The processes that save and restore together; `kind` is "single", "jax" or "torch"."""

    def __init__(self, kind: str, index: int, count: int, timeout_s: float = DEFAULT_TIMEOUT_S, group: Any = None):
        self.kind, self.index, self.count, self.timeout_s = kind, index, count, timeout_s
        self.group = group  # the layer's gloo group under torch.distributed
        self.broken: CollectiveError | None = None
        self._own_keys: list[str] = []  # JAX: this process's last values, deleted once all read them

    def __repr__(self) -> str:
        return f"Processes(kind={self.kind!r}, index={self.index}, count={self.count}, timeout_s={self.timeout_s})"

    @property
    def is_primary(self) -> bool:
        return self.index == 0

    @property
    def runs_orbax(self) -> bool:
        """Under torch.distributed only rank 0 talks to Orbax (each rank is its own JAX world)."""
        return self.kind != "torch" or self.is_primary

    def barrier(self, what: str) -> None:
        """Waits until every process reached this point; `what` names it in a timeout's error."""
        if self.kind == "single":
            return
        self._collective(what, self._barrier)

    def all_true(self, value: bool, what: str = "an agreement") -> bool:
        """True when `value` is true on every process (each process learns the same answer)."""
        return all(self.gather(bool(value), what))

    def gather(self, value: Any, what: str = "an exchange of values") -> list[Any]:
        """The JSON-able `value` of every process, in process order, on every process."""
        if self.kind == "single":
            return [value]
        return self._collective(what, lambda key: self._gather(key, value))

    def broadcast(self, value: Any, what: str = "an exchange of values") -> Any:
        """Process 0's JSON-able `value`, on every process."""
        return self.gather(value, what)[0]

    def close(self) -> None:
        """Destroys the layer's own gloo group (torch.distributed), while Python is alive: a gloo
        group left to interpreter exit can abort the process there (SIGABRT instead of its exit
        code, pytorch#190489)."""
        dist = _torch_world() if self.group is not None else None
        group, self.group = self.group, None
        if dist is not None:  # the default group still stands, so ours does too
            dist.destroy_process_group(group)

    def fail(self, what: str, error: BaseException, waited_s: float | None = None) -> CollectiveError:
        """Marks the job broken by `error` met at `what` (every later collective fails at once)
        and returns the CollectiveError to raise."""
        cause = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        self.broken = CollectiveError(self.index, self.count, what, self.timeout_s, cause, waited_s)
        return self.broken

    def _collective(self, what: str, run: Any) -> Any:
        if self.broken is not None:
            raise CollectiveError(
                self.index, self.count, what, self.timeout_s, f"an earlier one failed: {self.broken.cause}"
            )
        key = f"{_PREFIX}/{next(_SEQUENCE)}"
        start = time.monotonic()
        try:
            return run(key)
        except Exception as error:  # gloo's / the JAX client's timeout or lost-peer errors
            raise self.fail(what, error, time.monotonic() - start) from error

    def _barrier(self, key: str) -> None:
        if self.kind == "torch":
            _torch_world().barrier(group=self.group)
        else:
            _jax_client().wait_at_barrier(key, self._timeout_ms())

    def _gather(self, key: str, value: Any) -> list[Any]:
        if self.kind == "torch":
            out: list[Any] = [None] * self.count
            _torch_world().all_gather_object(out, value, group=self.group)
            return out
        client = _jax_client()
        client.key_value_set(f"{key}/{self.index}", json.dumps(value))
        deadline = time.monotonic() + self.timeout_s
        values = []
        for index in range(self.count):
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            values.append(json.loads(client.blocking_key_value_get(f"{key}/{index}", left_ms)))
        # Every process has read the previous values once it reached this one: drop ours.
        for old in self._own_keys:
            client.key_value_delete(old)
        self._own_keys = [f"{key}/{self.index}"]
        return values

    def _timeout_ms(self) -> int:
        return int(self.timeout_s * 1000)


def _jax_client() -> Any:
    import orbax.checkpoint as ocp

    return ocp.multihost.get_jax_distributed_client()


def _torch_group(timeout_s: float) -> Any:
    """The layer's own gloo group over every rank (a collective: every rank creates a Resumable)."""
    dist = _torch_world()
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def detect(kind: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Processes:
    """The processes of this job. `kind="auto"` prefers torch.distributed when it is initialized
    with more than one rank, then multi-process JAX, then a single process."""
    if kind not in _KINDS:
        raise ValueError(f"processes={kind!r} is not allowed; pass one of {_KINDS}.")
    timeout_s = check_timeout(timeout_s)
    world = _torch_world()
    if kind == "torch" or (kind == "auto" and world is not None):
        if world is None:
            raise ValueError(
                "processes='torch' needs torch.distributed.init_process_group() to have run with "
                "more than one rank; call it first, or pass processes='auto'."
            )
        return Processes("torch", world.get_rank(), world.get_world_size(), timeout_s, _torch_group(timeout_s))
    if kind == "jax" or (kind == "auto" and _jax_process_count() > 1):
        import jax

        return Processes("jax", jax.process_index(), jax.process_count(), timeout_s)
    return Processes("single", 0, 1, timeout_s)
