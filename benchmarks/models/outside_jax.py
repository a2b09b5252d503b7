"""JAX models written outside this project (Flax's lm1b example, penzai, equinox, haiku), built small with
random weights.

Each case gives `loss(params, batch)`: the library's own model called the way its authors document
it, its trainable parameters as the first argument (what `remat_kit.auto` plans as parameters) and
the data (and, where the model draws random numbers, the key) in `batch`. No downloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

LAYERS, HIDDEN, HEADS, FFN, VOCAB, BATCH, SEQ = 4, 32, 4, 64, 64, 2, 32
DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class JaxModel:
    loss: Callable[..., Any]  # loss(params, batch) -> scalar, or (scalar, aux) when has_aux
    params: Any
    batch: Any
    has_aux: bool = False
    reseeded: Any = None  # `batch` with another random key: its gradients must differ (dropout is live)


@dataclasses.dataclass(frozen=True)
class JaxCase:
    name: str
    source: str  # package and class, as a user imports it
    kind: str
    build: Callable[[], JaxModel]
    dropout: bool  # whether the model draws random numbers in training
    scanned: bool = False  # layers under a scan (XLA counts a scan body's FLOPs once)


def _tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)


def _next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def _penzai_lm(use_layer_stack: bool) -> Callable[[], JaxModel]:
    def build() -> JaxModel:
        from penzai import pz
        from penzai.models.transformer.variants import llamalike_common as lc

        if use_layer_stack:  # Llama: one block type, stacked under a scan by penzai's LayerStack
            extra: dict[str, Any] = dict(mlp_variant="swiglu", tie_embedder_and_logits=False, use_layer_stack=True)
        else:  # Gemma 2: local and global attention alternate, post-norms, soft caps, tied embeddings
            extra = dict(
                mlp_variant="geglu_approx",
                tie_embedder_and_logits=True,
                attention_type=(lc.AttentionTypeSlidingWindowCausal(8), lc.AttentionTypeGlobalCausal()),
                use_post_attn_norm=True,
                use_post_ffw_norm=True,
                final_logit_softcap=30.0,
                attn_logits_soft_cap=50.0,
            )
        config = lc.LlamalikeTransformerConfig(
            num_kv_heads=2,
            query_head_multiplier=2,
            embedding_dim=HIDDEN,
            projection_dim=HIDDEN // HEADS,
            mlp_hidden_dim=FFN,
            num_decoder_blocks=LAYERS,
            vocab_size=VOCAB,
            **extra,
        )
        model = lc.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
        unbound, params = pz.unbind_params(model, freeze=True)

        def loss(params: Any, tokens: jax.Array) -> jax.Array:
            logits = pz.bind_variables(unbound, params)(pz.nx.wrap(tokens).tag("batch", "seq"))
            return _next_token_loss(logits.unwrap("batch", "seq", "vocabulary"), tokens)

        return JaxModel(loss, params, _tokens())

    return build


def _penzai_dropout_mlp() -> JaxModel:
    from penzai import pz
    from penzai.models.simple_mlp import DropoutMLP

    model = DropoutMLP.from_config(
        init_base_rng=jax.random.key(0), feature_sizes=[HIDDEN] + [FFN] * LAYERS + [10], drop_rate=DROPOUT
    )
    unbound, params = pz.unbind_params(model, freeze=True)
    x = jax.random.normal(jax.random.key(1), (BATCH * SEQ, HIDDEN))

    def loss(params: Any, batch: dict) -> jax.Array:
        stream = pz.RandomStream.from_base_key(batch["key"])  # penzai's stateful key stream, as its docs use it
        out = pz.bind_variables(unbound, params)(pz.nx.wrap(batch["x"]).tag("batch", "features"), random_stream=stream)
        return jnp.mean(out.unwrap("batch", "features") ** 2)

    return JaxModel(loss, params, dict(x=x, key=jax.random.key(2)), reseeded=dict(x=x, key=jax.random.key(3)))


def _equinox_transformer() -> JaxModel:
    import equinox as eqx

    # equinox ships layers, not whole transformers: a pre-norm block of its MultiheadAttention
    # (with its own attention dropout) and MLP, composed as equinox's documentation does.
    class Block(eqx.Module):
        norm1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        norm2: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP
        drop: eqx.nn.Dropout

        def __init__(self, key: jax.Array):
            k1, k2 = jax.random.split(key)
            self.norm1, self.norm2 = eqx.nn.LayerNorm(HIDDEN), eqx.nn.LayerNorm(HIDDEN)
            self.attn = eqx.nn.MultiheadAttention(HEADS, HIDDEN, dropout_p=DROPOUT, key=k1)
            self.mlp = eqx.nn.MLP(HIDDEN, HIDDEN, FFN, depth=1, activation=jax.nn.gelu, key=k2)
            self.drop = eqx.nn.Dropout(DROPOUT)

        def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:
            k1, k2 = jax.random.split(key)
            h = jax.vmap(self.norm1)(x)
            x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((x.shape[0],) * 2, bool)), key=k1)
            return x + self.drop(jax.vmap(self.mlp)(jax.vmap(self.norm2)(x)), key=k2)

    class LM(eqx.Module):
        embed: eqx.nn.Embedding
        blocks: list
        norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, key: jax.Array):
            keys = jax.random.split(key, LAYERS + 2)
            self.embed = eqx.nn.Embedding(VOCAB, HIDDEN, key=keys[0])
            self.blocks = [Block(k) for k in keys[1:-1]]
            self.norm = eqx.nn.LayerNorm(HIDDEN)
            self.head = eqx.nn.Linear(HIDDEN, VOCAB, key=keys[-1])

        def __call__(self, tokens: jax.Array, key: jax.Array) -> jax.Array:
            x = jax.vmap(self.embed)(tokens)
            for block, k in zip(self.blocks, jax.random.split(key, len(self.blocks))):
                x = block(x, k)
            return jax.vmap(self.head)(jax.vmap(self.norm)(x))

    params, static = eqx.partition(LM(jax.random.key(0)), eqx.is_inexact_array)

    def loss(params: Any, batch: dict) -> jax.Array:
        model = eqx.combine(params, static)
        keys = jax.random.split(batch["key"], batch["tokens"].shape[0])
        return _next_token_loss(jax.vmap(model)(batch["tokens"], keys), batch["tokens"])

    return JaxModel(
        loss,
        params,
        dict(tokens=_tokens(), key=jax.random.key(2)),
        reseeded=dict(tokens=_tokens(), key=jax.random.key(3)),
    )


def _haiku_mlp() -> JaxModel:
    import haiku as hk

    def forward(x: jax.Array) -> jax.Array:
        return hk.nets.MLP([FFN] * LAYERS + [10], activation=jax.nn.gelu)(
            x, dropout_rate=DROPOUT, rng=hk.next_rng_key()
        )

    model = hk.transform(forward)
    x = jax.random.normal(jax.random.key(1), (BATCH * SEQ, HIDDEN))
    params = model.init(jax.random.PRNGKey(0), x)

    def loss(params: Any, batch: dict) -> jax.Array:
        return jnp.mean(model.apply(params, batch["rng"], batch["x"]) ** 2)

    # A raw uint32 key, as haiku's docs use.
    return JaxModel(loss, params, dict(x=x, rng=jax.random.PRNGKey(2)), reseeded=dict(x=x, rng=jax.random.PRNGKey(3)))


def _haiku_resnet() -> JaxModel:
    import haiku as hk

    def forward(images: jax.Array) -> jax.Array:
        net = hk.nets.ResNet(
            blocks_per_group=(1, 1, 1, 1),
            num_classes=10,
            bottleneck=False,
            resnet_v2=True,
            channels_per_group=(8, 16, 16, 32),
            use_projection=(True, True, True, True),
        )
        return net(images, is_training=True)

    model = hk.transform_with_state(forward)
    # Batch 4 at 32x32: at batch 2 / 16x16 the last stages are 1x1, batch norm normalises over two
    # values and amplifies a one-ulp change of summation order ~1e4x (jit vs eager, no remat at all,
    # differed by 6.4e-4 in fp32; here 3.5e-6), too noisy for a 1e-5 gradient check.
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    params, state = model.init(jax.random.PRNGKey(0), images)

    def loss(params: Any, batch: dict) -> tuple[jax.Array, Any]:
        logits, new_state = model.apply(params, batch["state"], None, batch["images"])
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0]) * -1.0, new_state  # batch-norm statistics as aux

    return JaxModel(loss, params, dict(images=images, state=state), has_aux=True)


def _flax_lm1b(scan: bool) -> Callable[[], JaxModel]:
    def build() -> JaxModel:
        from benchmarks.models.flax_lm1b import Config, TransformerLM

        config = Config(
            vocab_size=VOCAB,
            emb_dim=HIDDEN,
            num_heads=HEADS,
            num_layers=LAYERS,
            qkv_dim=HIDDEN,
            mlp_dim=FFN,
            max_len=SEQ,
            dropout_rate=DROPOUT,
            attention_dropout_rate=DROPOUT,
            scan=scan,
        )
        model = TransformerLM(config)
        tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 1, VOCAB)  # 0 is lm1b's padding
        params = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, tokens)

        def loss(params: Any, batch: dict) -> jax.Array:
            logits = model.apply(params, batch["tokens"], rngs={"dropout": batch["key"]})
            return _next_token_loss(logits, batch["tokens"])

        return JaxModel(
            loss,
            params,
            dict(tokens=tokens, key=jax.random.PRNGKey(2)),
            reseeded=dict(tokens=tokens, key=jax.random.PRNGKey(3)),
        )

    return build


def cases() -> dict[str, JaxCase]:
    c = [
        JaxCase(
            "flax-lm1b",
            "flax examples/lm1b TransformerLM (linen)",
            "decoder, padding + causal mask, layers in a loop",
            _flax_lm1b(False),
            dropout=True,
        ),
        JaxCase(
            "flax-lm1b-scan",
            "flax examples/lm1b TransformerLM, layers under nn.scan",
            "decoder, nn.scan with split dropout rngs",
            _flax_lm1b(True),
            dropout=True,
            scanned=True,
        ),
        JaxCase(
            "penzai-gemma2",
            "penzai llamalike_common (Gemma 2 config)",
            "local/global attention, unrolled",
            _penzai_lm(False),
            dropout=False,
        ),
        JaxCase(
            "penzai-llama-stack",
            "penzai llamalike_common (use_layer_stack)",
            "decoder, layers under scan",
            _penzai_lm(True),
            dropout=False,
            scanned=True,
        ),
        JaxCase(
            "penzai-dropout-mlp",
            "penzai models.simple_mlp.DropoutMLP",
            "MLP, RandomStream dropout",
            _penzai_dropout_mlp,
            dropout=True,
        ),
        JaxCase(
            "equinox-transformer",
            "equinox nn.MultiheadAttention + nn.MLP",
            "decoder, typed-key dropout",
            _equinox_transformer,
            dropout=True,
        ),
        JaxCase("haiku-mlp", "haiku nets.MLP", "MLP, raw-key dropout", _haiku_mlp, dropout=True),
        JaxCase("haiku-resnet", "haiku nets.ResNet (v2)", "CNN, batch-norm state", _haiku_resnet, dropout=False),
    ]
    return {case.name: case for case in c}
