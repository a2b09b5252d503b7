"""A checksum of JAX arrays computed where they live, so a save never copies them to host for it.

The host arrays of a state keep their CRC32 (`_codec.checksum`). JAX arrays go to Orbax as they
are, sharded across devices and processes; a CRC32 of their bytes would need the whole array
on one host. Instead each array gets a position-weighted sum of its bits, mod 2**32,
computed by one jitted reduction over the (possibly sharded) global array:

    fingerprint(x) = sum_i bits(x)_i * (2 i + 1)   (uint32 arithmetic)

Every weight is odd, hence invertible mod 2**32, so changing any single element always
changes the fingerprint; swapped or shifted blocks change it unless the bit patterns conspire.
It is computed after restore in the template's sharding and compared with the saved one, so a
checkpoint resharded onto another mesh is checked as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits_u32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in _UINT_OF_SIZE:
        return jax.lax.bitcast_convert_type(x, _UINT_OF_SIZE[size]).astype(jnp.uint32)
    # 8-byte dtypes (x64 mode): bitcast to uint32 splits each element into a trailing pair.
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _one(x: jax.Array) -> jax.Array:
    bits = _bits_u32(x)
    # The C-order index built per dimension, not by reshape(-1): flattening a sharded array
    # would make XLA gather it.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[dim]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprint = jax.jit(_one)


def dispatch(arrays: Sequence[jax.Array]) -> list[jax.Array]:
    """Starts the fingerprint computations and returns at once (JAX dispatches asynchronously):
    a save does not wait for them; the host item's writer thread reads the values (`value`)."""
    return [_fingerprint(x) for x in arrays]


def value(out: jax.Array) -> int:
    # A scalar reduced over a sharded array is replicated: any local copy holds the value.
    return int(np.asarray(out.addressable_data(0)))


def fingerprints(arrays: Sequence[jax.Array]) -> list[int]:
    """One uint32 fingerprint per array; a collective when the arrays span processes (every
    process must call it with the same arrays). Waits for the arrays to be computed."""
    # One jitted call per array (compiled once per shape and sharding): XLA:CPU materialises
    # the converted bits before reducing, so one call over the whole state would hold a
    # temporary as large as the state; per array it is at most the largest leaf.
    return [value(out) for out in dispatch(arrays)]
