"""Flax's lm1b decoder, small: an outside JAX model of the conformance suite (outside_jax.py) and of
tests/test_jax_rng.py (layers under `nn.scan`) and tests/test_jax_unrolled_outside.py (layers in a
Python loop).

A faithful copy of google/flax `examples/lm1b/models.py` (commit 18f8f311): `TransformerLM` ->
decoder (`shift_right`, embedding, `AddPositionEmbs` with the fixed sinusoidal table, dropout,
`EncoderDecoder1DBlock` layers with `MultiHeadDotProductAttention` under the padding + causal
mask made from the integer tokens, `MlpBlock`), final LayerNorm and logits; decoder only,
without decoding, packing and the logical-partitioning wrappers around the initializers (they
only box the parameters). Two switches that lm1b has not: `Config.scan` stacks the layers with
`nn.scan` (`split_rngs={"params": True, "dropout": True}`, as a user would), and
`TransformerLM.mlp` lets a test swap in an MLP it can observe.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

# Flax's own layer defaults, for a model built with the layers' inits instead of lm1b's.
FLAX_LAYER_INITS: dict[str, Any] = dict(
    kernel_init=nn.linear.default_kernel_init,
    bias_init=nn.initializers.zeros_init(),
    embedding_init=nn.linear.default_embed_init,
)


@struct.dataclass
class Config:
    vocab_size: int = 64
    emb_dim: int = 32
    num_heads: int = 2
    num_layers: int = 4
    qkv_dim: int = 32
    mlp_dim: int = 128
    max_len: int = 64
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    deterministic: bool = False
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()
    bias_init: Any = nn.initializers.normal(stddev=1e-6)
    embedding_init: Any = nn.initializers.normal(stddev=1.0)
    scan: bool = False  # the layers as one `nn.scan` named "decoder", not a loop of named blocks


def shift_right(x, axis=1):
    pad_widths = [(0, 0)] * len(x.shape)
    pad_widths[axis] = (1, 0)
    padded = jnp.pad(x, pad_widths, mode="constant", constant_values=x.dtype.type(0))
    return lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def sinusoidal_init(max_len, min_scale=1.0, max_scale=10000.0):
    def init(key, shape, dtype=np.float32):
        d_feature = shape[-1]
        pe = np.zeros((max_len, d_feature), dtype=np.float32)
        position = np.arange(0, max_len)[:, np.newaxis]
        scale_factor = -np.log(max_scale / min_scale) / (d_feature // 2 - 1)
        div_term = min_scale * np.exp(np.arange(0, d_feature // 2) * scale_factor)
        pe[:, : d_feature // 2] = np.sin(position * div_term)
        pe[:, d_feature // 2 : 2 * (d_feature // 2)] = np.cos(position * div_term)
        return jnp.array(pe[np.newaxis, :, :])

    return init


class AddPositionEmbs(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, inputs):
        pos_embedding = sinusoidal_init(max_len=self.config.max_len)(None, (1, self.config.max_len, inputs.shape[-1]))
        return inputs + pos_embedding[:, : inputs.shape[1], :]


class MlpBlock(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, inputs):
        c = self.config
        x = nn.Dense(c.mlp_dim, dtype=c.dtype, kernel_init=c.kernel_init, bias_init=c.bias_init)(inputs)
        x = nn.relu(x)
        x = nn.Dropout(rate=c.dropout_rate)(x, deterministic=c.deterministic)
        output = nn.Dense(inputs.shape[-1], dtype=c.dtype, kernel_init=c.kernel_init, bias_init=c.bias_init)(x)
        return nn.Dropout(rate=c.dropout_rate)(output, deterministic=c.deterministic)


class EncoderDecoder1DBlock(nn.Module):
    config: Config
    mlp: Any = MlpBlock

    @nn.compact
    def __call__(self, inputs, decoder_mask=None):
        c = self.config
        x = nn.LayerNorm(dtype=c.dtype)(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads,
            dtype=c.dtype,
            qkv_features=c.qkv_dim,
            kernel_init=c.kernel_init,
            bias_init=c.bias_init,
            use_bias=False,
            broadcast_dropout=False,
            dropout_rate=c.attention_dropout_rate,
            deterministic=c.deterministic,
        )(x, mask=decoder_mask)
        x = nn.Dropout(rate=c.dropout_rate)(x, deterministic=c.deterministic)
        x = x + inputs
        z = nn.LayerNorm(dtype=c.dtype)(x)
        z = self.mlp(config=c)(z)
        return (x + z, None) if c.scan else x + z  # nn.scan's body returns (carry, per-layer output)


class TransformerLM(nn.Module):
    config: Config
    mlp: Any = MlpBlock  # not in lm1b: lets a test observe the MLP

    @nn.compact
    def __call__(self, inputs):
        c = self.config
        decoder_mask = nn.combine_masks(
            nn.make_attention_mask(inputs > 0, inputs > 0, dtype=c.dtype),
            nn.make_causal_mask(inputs, dtype=c.dtype),
        )
        y = shift_right(inputs.astype("int32"))
        y = nn.Embed(num_embeddings=c.vocab_size, features=c.emb_dim, embedding_init=c.embedding_init)(y)
        y = AddPositionEmbs(config=c, name="posembed_output")(y)
        y = nn.Dropout(rate=c.dropout_rate)(y, deterministic=c.deterministic)
        if c.scan:
            stack = nn.scan(
                EncoderDecoder1DBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=c.num_layers,
            )
            y, _ = stack(c, self.mlp, name="decoder")(y, decoder_mask)
        else:
            for lyr in range(c.num_layers):
                y = EncoderDecoder1DBlock(config=c, mlp=self.mlp, name=f"encoderdecoderblock_{lyr}")(y, decoder_mask)
        y = nn.LayerNorm(dtype=c.dtype, name="encoderdecoder_norm")(y)
        return nn.Dense(
            c.vocab_size, dtype=c.dtype, kernel_init=c.kernel_init, bias_init=c.bias_init, name="logitdense"
        )(y)
