"""A GPT-2-style decoder in nanoGPT's layout, shared by the torch benchmark and the torch tests.

    from benchmarks.models.torch_gpt import GPT
    model = GPT(layers=6, d=512, heads=8, vocab=8192, seq=512)   # benchmarks/torch_bench.py
    loss = model(idx, targets)

Module tree (nanoGPT `model.py` names): `wte`, `wpe`, `drop`, `h` (a ModuleList of `Block`:
`ln1`, `attn` (the qkv projection), `proj`, `ln2`, `fc`, `out`, `drop`), `ln_f`, `lm_head`.
`seq=None` leaves out the position embedding and `embedding_dropout=False` the dropout after
the embeddings; `head_bias=True` gives `lm_head` a bias. tests/torch_helpers.py's `TinyGPT` is
this model with those three switched (token embedding, blocks, final norm, biased head).

Submodules are created in the order they run, so a seeded construction draws the same weights
as the models this file replaced (the committed reports/torch/ figures were measured with them).
The zoo's `TransformerBlock` (benchmarks/models/torch_zoo.py) stays separate: it is the twin of
the JAX zoo model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A pre-norm block: causal attention (SDPA, attention and residual dropout) and a GELU MLP."""

    def __init__(self, d: int, heads: int, p: float = 0.1):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop, self.heads, self.p = nn.Dropout(p), heads, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """Token (and position) embedding, `layers` Blocks, final LayerNorm, head; returns the
    cross-entropy loss of `lm_head`'s logits against `targets`."""

    def __init__(
        self,
        layers: int,
        d: int,
        heads: int,
        vocab: int,
        *,
        seq: int | None = None,
        p: float = 0.1,
        embedding_dropout: bool = True,
        head_bias: bool = False,
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d) if seq is not None else None
        self.drop = nn.Dropout(p) if embedding_dropout else None
        self.h = nn.ModuleList(Block(d, heads, p) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=head_bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.wpe is not None:
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
        else:
            x = self.wte(idx)
        if self.drop is not None:
            x = self.drop(x)
        for block in self.h:
            x = block(x)
        return F.cross_entropy(self.lm_head(self.ln_f(x)).flatten(0, 1), targets.flatten())


def add_shape_args(
    parser: Any, *, layers: int, d: int, heads: int, seq: int, vocab: int, batch: int | None = None
) -> None:
    """The GPT's shape as command-line options (`--layers --d --heads --seq --vocab`, and `--batch`
    where the benchmark takes one), with the benchmark's defaults."""
    for flag, default in (("--layers", layers), ("--d", d), ("--heads", heads), ("--seq", seq), ("--vocab", vocab)):
        parser.add_argument(flag, type=int, default=default)
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch)
