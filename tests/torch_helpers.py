"""Tiny torch models and helpers shared by tests/test_torch_*.py (kept small: 2-core CI)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A GPT-2 style pre-norm block: causal attention (SDPA, dropout) and a GELU MLP (dropout)."""

    def __init__(self, d: int = 16, heads: int = 4, p: float = 0.1):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop, self.heads, self.p = nn.Dropout(p), heads, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    def __init__(self, layers: int = 4, d: int = 16, heads: int = 4, vocab: int = 32, p: float = 0.1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(Block(d, heads, p) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.h:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), targets.flatten())


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
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max().item()
        worst = max(worst, (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item())
    return worst


def fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
