"""The zoo in JAX: pure functions over parameter pytrees, one block function per model.

`build(name, size, seed)` returns a `JaxModel`; `model.loss(strategy_layout)` gives the loss
function `(params, batch) -> scalar` with blocks run under that layout. Blocks tag their
intermediates with `checkpoint_name` so name-based policies (MaxText style) can pick them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from benchmarks.models import config

# Every named intermediate outside the attention core (scores, softmax): saving exactly these is
# Megatron's selective recompute (Korthikanti et al. 2022) expressed as a name policy.
NON_CORE_NAMES = ("ln1", "qkv", "attn_context", "attn_out", "ln2", "mlp_in", "mlp_act", "mlp_out")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the chain of blocks runs: `group` consecutive blocks per unit; `block_policy(j)` for the
    j-th block of a unit (None: plain, else a jax.checkpoint policy or "nothing"); `group_policy`
    checkpoints each whole unit (√n segments)."""

    group: int = 1
    block_policy: Callable[[int], Any] = lambda j: None
    group_policy: Any = None
    unroll_scan: bool = False  # for FLOP counting only: XLA's cost_analysis counts a while body once


def _remat(fn: Callable, policy: Any) -> Callable:
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=None if policy == "nothing" else policy)


def layernorm(x: jax.Array, scale: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * scale


def transformer_block(p: dict, x: jax.Array, *, num_heads: int, causal: bool) -> jax.Array:
    b, s, d = x.shape
    dh = d // num_heads
    h = checkpoint_name(layernorm(x, p["ln1"]), "ln1")
    qkv = checkpoint_name(h @ p["wqkv"], "qkv")
    q, k, v = (t.reshape(b, s, num_heads, dh) for t in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
    probs = jax.nn.softmax(scores, axis=-1)
    context = checkpoint_name(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d), "attn_context")
    x = x + checkpoint_name(context @ p["wo"], "attn_out")
    h = checkpoint_name(layernorm(x, p["ln2"]), "ln2")
    u = checkpoint_name(jax.nn.gelu(checkpoint_name(h @ p["w1"], "mlp_in")), "mlp_act")
    return x + checkpoint_name(u @ p["w2"], "mlp_out")


def mlp_block(p: dict, x: jax.Array) -> jax.Array:
    u = checkpoint_name(jax.nn.gelu(checkpoint_name(x @ p["w1"], "mlp_in")), "mlp_act")
    return x + checkpoint_name(u @ p["w2"], "mlp_out")


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_block(p: dict, x: jax.Array) -> jax.Array:
    h = checkpoint_name(jax.nn.relu(checkpoint_name(_conv(x, p["c1"]), "conv1")), "act1")
    return x + checkpoint_name(_conv(h, p["c2"]), "conv2")


def _normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    # numpy draws: eager jax.random calls each compile a kernel, seconds per model on a busy CPU
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) / math.sqrt(fan_in))


def _block_params(name: str, cfg: dict, rng: np.random.Generator) -> dict:
    if name == "convnet":
        c = cfg["channels"]
        return {"c1": _normal(rng, (3, 3, c, c), 9 * c), "c2": _normal(rng, (3, 3, c, c), 9 * c) * 0.5}
    d = cfg["hidden"]
    f = cfg.get("expansion", 4) * d
    p = {"w1": _normal(rng, (d, f), d), "w2": _normal(rng, (f, d), f) * 0.5}
    if name == "mlp":
        return p
    return {
        **p,
        "ln1": jnp.ones(d),
        "ln2": jnp.ones(d),
        "wqkv": _normal(rng, (d, 3 * d), d),
        "wo": _normal(rng, (d, d), d) * 0.5,
    }


@dataclasses.dataclass
class JaxModel:
    name: str
    size: str
    cfg: dict
    params: dict  # {"blocks": stacked (scanned) or list (unrolled), "outer": embeddings and head}
    batch: tuple
    block: Callable[[dict, jax.Array], jax.Array]
    embed: Callable[[dict, tuple], jax.Array]
    head_loss: Callable[[dict, jax.Array, tuple], jax.Array]
    scanned: bool

    @property
    def num_layers(self) -> int:
        return self.cfg["num_layers"]

    def loss(self, layout: Layout = Layout()) -> Callable[[dict, tuple], jax.Array]:
        """`(params, batch) -> loss` with the blocks run as `layout` says."""
        if self.num_layers % layout.group:
            raise ValueError(f"group={layout.group} must divide num_layers={self.num_layers} of {self.name}.")
        blocks = [_remat(self.block, layout.block_policy(j)) for j in range(layout.group)]

        def unit(ps: list, x: jax.Array) -> jax.Array:
            for blk, p in zip(blocks, ps):
                x = blk(p, x)
            return x

        unit = _remat(unit, layout.group_policy)
        g = layout.group

        def loss(params: dict, batch: tuple) -> jax.Array:
            x = self.embed(params["outer"], batch)
            if self.scanned:
                grouped = jax.tree.map(lambda a: a.reshape(-1, g, *a.shape[1:]), params["blocks"])

                def body(x, gp):
                    return unit([jax.tree.map(lambda a: a[j], gp) for j in range(g)], x), None

                x, _ = lax.scan(body, x, grouped, unroll=True if layout.unroll_scan else 1)
            else:
                for i in range(0, self.num_layers, g):
                    x = unit(params["blocks"][i : i + g], x)
            return self.head_loss(params["outer"], x, batch)

        return loss


def build(name: str, size: str, seed: int = 0) -> JaxModel:
    """The zoo model `name` at `size` with parameters and one batch drawn from `seed`."""
    cfg = config(name, size)
    base = "gpt" if name == "gpt_unrolled" else name
    rng = np.random.default_rng(seed)
    per_layer = [_block_params(base, cfg, rng) for _ in range(cfg["num_layers"])]
    scanned = name != "gpt_unrolled"
    blocks = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if scanned else per_layer
    b = cfg["batch"]

    def ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    if base == "gpt":
        d, s, v = cfg["hidden"], cfg["seq_len"], cfg["vocab"]
        outer = {"emb": _normal(rng, (v, d), d), "pos": _normal(rng, (s, d), 1) * 0.1, "ln": jnp.ones(d)}
        tokens = jnp.asarray(rng.integers(0, v, (b, s + 1)), jnp.int32)
        batch = (tokens[:, :-1], tokens[:, 1:])
        block = lambda p, x: transformer_block(p, x, num_heads=cfg["num_heads"], causal=True)  # noqa: E731
        embed = lambda o, bt: o["emb"][bt[0]] + o["pos"]  # noqa: E731
        head = lambda o, x, bt: ce(layernorm(x, o["ln"]) @ o["emb"].T, bt[1])  # noqa: E731
    elif base == "vit":
        d, p, c = cfg["hidden"], cfg["patch"], cfg["channels"]
        n = (cfg["image"] // p) ** 2
        outer = {
            "patch": _normal(rng, (p * p * c, d), p * p * c),
            "pos": _normal(rng, (n, d), 1) * 0.1,
            "ln": jnp.ones(d),
            "head": _normal(rng, (d, cfg["classes"]), d),
        }
        images = _normal(rng, (b, cfg["image"], cfg["image"], c), 1)
        batch = (images, jnp.asarray(rng.integers(0, cfg["classes"], (b,)), jnp.int32))
        block = lambda q, x: transformer_block(q, x, num_heads=cfg["num_heads"], causal=False)  # noqa: E731

        def embed(o, bt):
            im = bt[0]
            g = cfg["image"] // p
            patches = im.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
            return patches @ o["patch"] + o["pos"]

        head = lambda o, x, bt: ce(layernorm(x.mean(1), o["ln"]) @ o["head"], bt[1])  # noqa: E731
    elif base == "mlp":
        d = cfg["hidden"]
        outer = {"w_out": _normal(rng, (d, d), d)}
        batch = (_normal(rng, (b, d), 1), _normal(rng, (b, d), 1))
        block, embed = mlp_block, (lambda o, bt: bt[0])
        head = lambda o, x, bt: jnp.mean((x @ o["w_out"] - bt[1]) ** 2)  # noqa: E731
    else:  # convnet
        c = cfg["channels"]
        outer = {"stem": _normal(rng, (3, 3, 3, c), 27), "head": _normal(rng, (c, cfg["classes"]), c)}
        batch = (
            _normal(rng, (b, cfg["image"], cfg["image"], 3), 1),
            jnp.asarray(rng.integers(0, cfg["classes"], (b,)), jnp.int32),
        )
        block, embed = conv_block, (lambda o, bt: _conv(bt[0], o["stem"]))
        head = lambda o, x, bt: ce(x.mean((1, 2)) @ o["head"], bt[1])  # noqa: E731
    return JaxModel(name, size, cfg, {"blocks": blocks, "outer": outer}, batch, block, embed, head, scanned)
