"""Objects that carry their own resumable state: data iterators and the global RNGs.

Anything with `get_state()` / `set_state(state)` can sit in a saved state; `Resumable.save`
calls `get_state()` and a restore with that object in the template calls `set_state()` on it,
so the object continues with exactly the element or random number it would have produced next.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from remat_kit.resume import _torch_arrays


@runtime_checkable
class CheckpointableIterator(Protocol):
    """A data pipeline whose position can be saved and put back.

    `get_state()` returns a tree of JSON scalars, lists, dicts and arrays (no arbitrary
    objects); `set_state(state)` receives that tree back and must make the next element the
    one that would have followed when `get_state()` was called. Grain's `DatasetIterator` and
    torchdata's `StatefulDataLoader` (via `state_dict`/`load_state_dict`) already qualify.
    """

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class ShuffledIterator(Iterator[Any]):
    """Endless minibatches over `data`, reshuffled every epoch, resumable to the exact batch.

    The order of epoch `e` is a permutation drawn from `np.random.default_rng([seed, e])`, so it
    depends only on (seed, epoch): the state is three integers, not the permutation.

    Args:
      data: a sequence or array to index, or an int n meaning the indices `range(n)`.
      batch_size: examples per batch; the last short batch of an epoch is dropped when
        `drop_last` (the default, which keeps batch shapes static for jit).
      seed: shuffle seed.
    """

    def __init__(
        self, data: Sequence[Any] | np.ndarray | int, *, batch_size: int, seed: int = 0, drop_last: bool = True
    ) -> None:
        num_examples = data if isinstance(data, int) else len(data)
        if not isinstance(batch_size, int) or not 0 < batch_size <= max(num_examples, 1):
            raise ValueError(
                f"batch_size={batch_size!r} must be an int in [1, {num_examples}] (the number of examples)."
            )
        if num_examples < 1 or (drop_last and num_examples < batch_size):
            raise ValueError(f"data has {num_examples} examples; need at least batch_size={batch_size}.")
        self.data = None if isinstance(data, int) else data
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next example
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _epoch_len(self) -> int:
        n = self.num_examples
        return n - n % self.batch_size if self.drop_last else n

    def __iter__(self) -> ShuffledIterator:
        return self

    def __next__(self) -> Any:
        if self.position >= self._epoch_len():
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += len(indices)
        if self.data is None:
            return indices
        if isinstance(self.data, np.ndarray) or hasattr(self.data, "__array__"):
            return self.data[indices]
        return [self.data[int(i)] for i in indices]

    def get_state(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
        }

    def set_state(self, state: dict[str, int]) -> None:
        for key in ("num_examples", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"ShuffledIterator state was saved with {key}={state[key]}, this iterator has "
                    f"{key}={getattr(self, key)}; build it over the same data and batch size to resume."
                )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def capture_rng() -> dict[str, Any]:
    """The global RNG states: Python `random`, NumPy's legacy `np.random`, torch CPU and CUDA.

    JAX has no global RNG: keep your `jax.random.key`s in the saved state instead.
    """
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": _torch_arrays.rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    """Puts back global RNG states returned by `capture_rng()` (after a save/restore round trip)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), int(pos), int(has_gauss), float(cached)))
    _torch_arrays.set_rng_state(state.get("torch") or {})


class GlobalRNG:
    """Put `GlobalRNG()` in a saved state to save the global RNGs and, when it is in the
    restore template, set them back (see `capture_rng`)."""

    def get_state(self) -> dict[str, Any]:
        return capture_rng()

    def set_state(self, state: dict[str, Any]) -> None:
        restore_rng(state)
