"""Tiny torch models and helpers shared by tests/test_torch_*.py (kept small: 2-core CI)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from benchmarks.models.torch_gpt import GPT, Block
from remat_kit.measure import rel_err

__all__ = ["Block", "GPT", "TinyGPT", "fresh", "grads", "loss_of", "max_rel_err", "tokens"]


class TinyGPT(GPT):
    """The shared GPT with no position embedding, no embedding dropout and a biased head: token
    embedding, `layers` Blocks (attention and residual dropout `p`), final LayerNorm, head."""

    def __init__(self, layers: int = 4, d: int = 16, heads: int = 4, vocab: int = 32, p: float = 0.1):
        super().__init__(layers, d, heads, vocab, seq=None, p=p, embedding_dropout=False, head_bias=True)


def tokens(batch: int = 2, seq: int = 64, vocab: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)


def loss_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.float().pow(2).mean()
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    return out[0].float().pow(2).mean()


def grads(model: nn.Module, *args, seed: int = 1, **kwargs) -> list[torch.Tensor]:
    """Parameter gradients of one step, with a fixed RNG seed (same dropout masks)."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss_of(model(*args, **kwargs)).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def max_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The worst per-tensor relative error (`remat_kit.measure.rel_err`: a NaN never passes)."""
    return rel_err(got, want)


def fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
