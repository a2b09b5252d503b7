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
from typing import Any

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


_fingerprints = jax.jit(lambda arrays: [_one(x) for x in arrays])


def fingerprints(arrays: Sequence[jax.Array]) -> list[int]:
    """One uint32 fingerprint per array; a collective when the arrays span processes (every
    process must call it with the same arrays). Waits for the arrays to be computed."""
    # One jitted call per set of devices: a computation cannot mix arrays placed on different
    # devices (a state sharded over a mesh next to a PRNG key on device 0).
    groups: dict[frozenset, list[int]] = {}
    for index, x in enumerate(arrays):
        groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(index)
    values = [0] * len(arrays)
    for indices in groups.values():
        outs = _fingerprints([arrays[i] for i in indices])
        for i, out in zip(indices, outs):
            # A scalar reduced over a sharded array is replicated: any local copy holds the value.
            values[i] = int(np.asarray(out.addressable_data(0)))
    return values


def key_data(x: Any) -> jax.Array:
    """The raw uint32 data of a typed PRNG key array, kept on its devices."""
    return jax.random.key_data(x)
