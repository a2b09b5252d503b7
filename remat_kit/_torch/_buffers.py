"""Module buffers as the user left them, around the forwards remat_kit runs besides the step's.

A training-mode forward writes some buffers in place: BatchNorm's running statistics and
`num_batches_tracked`. Planning runs the forward (a profile, a measurement), a plan refused
mid-forward runs it again, and a checkpoint's recompute runs a region's forward a second time in
the backward. Without remat each buffer moves once per step; these put back what the extra runs
wrote, as `torch.random.fork_rng` puts back the generators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

Copies = list[tuple[torch.Tensor, torch.Tensor]]


def copies(buffers: Iterable[torch.Tensor]) -> Copies:
    """(buffer, a copy) of each real buffer."""
    return [(b, b.detach().clone()) for b in buffers if not b.is_meta]


def restore(saved: Copies) -> None:
    """Writes back each buffer whose value differs from its copy."""
    # Compared by value: batch_norm writes its running statistics without bumping their version
    # counter, and a copy into an unchanged buffer would bump it (an autograd graph that saved
    # the buffer would then refuse its backward).
    with torch.no_grad():
        for buffer, copy in saved:
            if not torch.equal(buffer, copy):
                buffer.copy_(copy)


@contextlib.contextmanager
def kept(buffers: Iterable[torch.Tensor]) -> Iterator[None]:
    """Puts back every buffer of `buffers` that the body changed."""
    saved = copies(buffers)
    try:
        yield
    finally:
        restore(saved)
