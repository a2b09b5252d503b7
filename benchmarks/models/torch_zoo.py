"""The zoo in PyTorch: the same models as `jax_zoo`, as `nn.Module`s whose forward returns the loss.

Every model runs its blocks through `self.run_blocks(blocks, x)` (plain by default), so a
hand-written strategy is one function swapped in; `Attention.checkpoint_core` turns on
Megatron's selective recompute of the attention core.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks.models import config


def sequential(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        self.num_heads, self.causal, self.checkpoint_core = num_heads, causal, False
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.causal:
            s = q.shape[-2]
            scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(), -1e9)
        return scores.softmax(-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.num_heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.checkpoint_core:  # Korthikanti et al. (2022): keep q, k, v, recompute scores and softmax
            ctx = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            ctx = self.core(q, k, v)
        return self.out(ctx.transpose(1, 2).reshape(b, s, d))


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden, bias=False)
        self.attn = Attention(hidden, num_heads, causal)
        self.ln2 = nn.LayerNorm(hidden, bias=False)
        self.mlp = MLPBlock(hidden, 4, residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, expansion: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.fc1 = nn.Linear(hidden, expansion * hidden, bias=False)
        self.fc2 = nn.Linear(expansion * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(x)))
        return x + y if self.residual else y


class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.relu(self.c1(x)))


class ZooModel(nn.Module):
    """A chain of blocks between an input stem and a loss head; `forward(inputs, targets) -> loss`."""

    def __init__(self, name: str, cfg: dict) -> None:
        super().__init__()
        self.name, self.cfg = name, cfg
        self.run_blocks: Callable[[nn.ModuleList, torch.Tensor], torch.Tensor] = sequential
        n = cfg["num_layers"]
        if name in ("gpt", "vit"):
            d = cfg["hidden"]
            self.blocks = nn.ModuleList(TransformerBlock(d, cfg["num_heads"], causal=name == "gpt") for _ in range(n))
            self.ln = nn.LayerNorm(d, bias=False)
        if name == "gpt":
            self.emb = nn.Embedding(cfg["vocab"], d)
            nn.init.normal_(self.emb.weight, std=d**-0.5)  # tied with the head: unit-variance logits
            self.pos = nn.Parameter(torch.randn(cfg["seq_len"], d) * 0.1)
        elif name == "vit":
            p, c = cfg["patch"], cfg["channels"]
            self.patch = nn.Linear(p * p * c, d, bias=False)
            self.pos = nn.Parameter(torch.randn((cfg["image"] // p) ** 2, d) * 0.1)
            self.head = nn.Linear(d, cfg["classes"], bias=False)
        elif name == "mlp":
            self.blocks = nn.ModuleList(MLPBlock(cfg["hidden"], cfg["expansion"]) for _ in range(n))
            self.head = nn.Linear(cfg["hidden"], cfg["hidden"], bias=False)
        elif name == "convnet":
            c = cfg["channels"]
            self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
            self.blocks = nn.ModuleList(ConvBlock(c) for _ in range(n))
            self.head = nn.Linear(c, cfg["classes"], bias=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.name == "gpt":
            x = self.emb(inputs) + self.pos
        elif self.name == "vit":
            b, p, c, g = inputs.shape[0], cfg["patch"], cfg["channels"], cfg["image"] // cfg["patch"]
            x = (
                self.patch(inputs.view(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c))
                + self.pos
            )
        elif self.name == "convnet":
            x = self.stem(inputs)
        else:
            x = inputs
        x = self.run_blocks(self.blocks, x)
        if self.name == "gpt":
            logits = self.ln(x) @ self.emb.weight.T
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.name == "vit":
            return F.cross_entropy(self.head(self.ln(x.mean(1))), targets)
        if self.name == "convnet":
            return F.cross_entropy(self.head(x.mean((2, 3))), targets)
        return F.mse_loss(self.head(x), targets)


def build(name: str, size: str, seed: int = 0) -> tuple[ZooModel, tuple[torch.Tensor, torch.Tensor]]:
    """The zoo model `name` at `size` (parameters from `seed`) and one batch `(inputs, targets)`."""
    cfg = config(name, size)
    if name == "gpt_unrolled":
        raise ValueError("model='gpt_unrolled' is JAX only (PyTorch runs layers eagerly: its 'gpt' is unrolled).")
    torch.manual_seed(seed)
    model = ZooModel(name, cfg)
    b = cfg["batch"]
    if name == "gpt":
        tokens = torch.randint(0, cfg["vocab"], (b, cfg["seq_len"] + 1))
        batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    elif name == "vit":
        batch = (torch.randn(b, cfg["channels"], cfg["image"], cfg["image"]), torch.randint(0, cfg["classes"], (b,)))
    elif name == "mlp":
        batch = (torch.randn(b, cfg["hidden"]), torch.randn(b, cfg["hidden"]))
    else:
        batch = (torch.randn(b, 3, cfg["image"], cfg["image"]), torch.randint(0, cfg["classes"], (b,)))
    return model, batch
