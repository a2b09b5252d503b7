"""A checksum of JAX arrays that needs no copy of them and can be combined across processes.

The host arrays of a state keep their CRC32 (`_codec.checksum`). JAX arrays go to Orbax as they
are, sharded across devices and processes, so their checksum is made of parts, one per process,
each from the shards it holds, and checked after restore in whatever sharding the template asks.
Two kinds, named in the step's metadata (`"fingerprint"`; steps without it are SUM):

* CRC32C, where every array lives on CPU devices: the CRC-32C of the array's C-order bytes
  (`_crc32c`: each process xors its rows' shares), about 0.1 s of CPU per GiB;
* SUM, where some array lives on an accelerator: a position-weighted sum of its bits, computed
  on its devices by one jitted reduction, at memory bandwidth and without a device-to-host copy
  (on CPU the same sum costs two NumPy passes, about 0.2 s per GiB, hence CRC32C there):

    fingerprint(x) = sum_i bits(x)_i * (2 i + 1)   (uint32 arithmetic, i the C-order index)

  Every weight is odd, hence invertible mod 2**32, so changing any single element always
  changes it; swapped or shifted blocks change it unless the bit patterns conspire. A sum over
  elements splits over shards: each process adds the shards it holds (replica 0 of each).

Where they are computed:

* on the host (CRC32C always; SUM for arrays on CPU devices), over the shards' own buffers
  (`np.asarray(shard.data)` is a view there, as it is for Orbax's own write); SUM reads each
  block as its row sums and its column sums (no multiply per element). At save this runs on
  the host item's writer thread, alongside Orbax's write (crc32c and NumPy release the GIL).
  At restore (`fingerprints`) nothing else runs beside it, so it is split into row pieces
  computed by a few threads; each piece waits for its own shard, so the first arrays are
  checked while Orbax's last transfers onto their devices are still in flight;
* SUM of arrays on accelerators: one jitted reduction on their devices.

SUM's two ways give the same value, so a SUM step saved on one platform is checked on the
other; a CRC32C step restored onto accelerators reads their shards to host for its check.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from remat_kit.resume import _crc32c

_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
# Elements per NumPy block: few Python steps per array, and the block's second read (its column
# sums after its row sums) comes from cache.
_BLOCK = 1 << 20
# Elements per sub-row a long contiguous row is cut into (see _box_sum).
_ROW = 1024
_MOD = 2**32
# Bytes per restore-time piece: enough pieces to keep every thread busy while shards arrive,
# few enough that the per-piece Python overhead stays negligible.
_PIECE_BYTES = 8 << 20

# The kinds, as the step's metadata names them.
SUM = "sum"
CRC32C = "crc32c"


def _add(kind: str, a: int, b: int) -> int:
    """Two parts of a fingerprint combined: SUM's add up mod 2**32, CRC32C's xor."""
    return a ^ b if kind == CRC32C else (a + b) % _MOD


def _bits_u32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):  # bitcast refuses complex: (real, imag) pairs
        pairs = _bits_u32(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
        return pairs.reshape(x.shape + (x.dtype.itemsize // 4,))
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
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % _MOD)
        stride *= bits.shape[dim]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_on_device = jax.jit(_one)


# -- on host: NumPy over the shards' buffers --------------------------------------------------


def _host_bits(data: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> tuple[np.ndarray, tuple, tuple]:
    """`data` as unsigned integers with the bits `_bits_u32` reads (same shape, or a trailing
    dim of uint32 words for wider dtypes), with its start and the global shape to match."""
    data = np.require(data, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    size = data.dtype.itemsize
    if data.dtype == np.bool_ or size in (1, 2, 4):
        return data.view(np.dtype(f"<u{size}")), start, shape
    words = data.reshape(data.shape + (1,)).view(np.dtype("<u4"))
    return words, start + (0,), shape + (size // 4,)


def _box_sum(bits: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """sum of bits * (2 i + 1) over a box of the global array starting at `start`, mod 2**32."""
    if bits.size == 0:
        return 0
    if bits.ndim == 0:
        return int(bits) % _MOD
    # The box is R rows of L elements contiguous in the global C order: dims `last..` of the
    # box, where every dim after `last` spans the whole array.
    last = bits.ndim - 1
    while last > 0 and bits.shape[last] == shape[last]:
        last -= 1
    strides = [int(np.prod(shape[d + 1 :], dtype=np.int64)) for d in range(len(shape))]
    num_rows = int(np.prod(bits.shape[:last], dtype=np.int64))
    length = bits.size // num_rows
    # Long rows are cut into sub-rows of _ROW elements (sub-row q of row r starts q * _ROW
    # further on), so that a block's column sums are a short vector, not a copy of the row.
    split = length // _ROW if length > _ROW and length % _ROW == 0 else 1
    table = bits.reshape(num_rows * split, length // split)
    length = table.shape[1]
    cols = min(length, _BLOCK)
    rows = max(1, _BLOCK // length)
    odd = np.arange(1, 2 * cols, 2, dtype=np.uint32)  # 2 j + 1
    offset = start[last] * strides[last]
    total = 0
    for r0 in range(0, table.shape[0], rows):
        r1 = min(table.shape[0], r0 + rows)
        fine = np.arange(r0, r1)
        index = np.unravel_index(fine // split, bits.shape[:last]) if last else ()
        base = np.full(r1 - r0, offset, np.uint64) + (fine % split).astype(np.uint64) * np.uint64(length)
        for d, i in enumerate(index):
            base += (i.astype(np.uint64) + np.uint64(start[d])) * np.uint64(strides[d])
        base = (base % np.uint64(_MOD)).astype(np.uint32)
        for c0 in range(0, length, cols):
            block = table[r0:r1, c0 : c0 + cols]
            # weight of element (r, c0 + j) = (2 base_r + 2 c0) + (2 j + 1): the first part is the
            # same along a row, the second down a column, so the block's row sums and column sums
            # (two plain reductions, the second from cache) replace a multiply per element.
            row = block.sum(axis=1, dtype=np.uint32)
            col = block.sum(axis=0, dtype=np.uint32)
            shift = (base + np.uint32(c0 % _MOD)) * np.uint32(2)
            total += int((shift * row).sum(dtype=np.uint32)) + int((odd[: col.size] * col).sum(dtype=np.uint32))
    return total % _MOD


def _on_host(x: jax.Array) -> bool:
    return all(device.platform == "cpu" for device in x.sharding.device_set)


def _host_boxes(x: jax.Array, kind: str) -> list[tuple[np.ndarray, tuple, tuple]]:
    """Views of the shards this process holds (replica 0 of each, so each element counts once),
    as the kind reads them: bits (SUM) or bytes (CRC32C)."""
    as_box = _crc32c.as_bytes if kind == CRC32C else _host_bits
    boxes = []
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            start = tuple(s.indices(n)[0] for s, n in zip(shard.index, x.shape))
            boxes.append(as_box(np.asarray(shard.data), start, tuple(x.shape)))
    return boxes


# -- the API: start at save, read the part later ------------------------------------------------


def crc32c_installed() -> bool:
    """Whether this process can compute CRC-32Cs (the `crc32c` package, in the `jax` extra)."""
    try:
        import crc32c  # noqa: F401
    except ImportError:
        return False
    return True


def kind_for(arrays: Sequence[jax.Array], crc32c_everywhere: bool) -> str:
    """CRC32C where every array lives on CPU devices and every process of the job has the
    `crc32c` package (`crc32c_everywhere`: agreed across processes, since each writes its own
    part of every fingerprint and the parts combine only within one kind), else SUM."""
    return CRC32C if crc32c_everywhere and all(_on_host(x) for x in arrays) else SUM


def _require_crc32c() -> None:
    if not crc32c_installed():
        raise ImportError(
            "this checkpoint's JAX arrays carry a CRC-32C, and checking it needs the crc32c package: "
            "pip install crc32c (it comes with remat_kit[jax])"
        )


def _crc_constant(x: jax.Array) -> int:
    # The standard CRC's initial value and final xor: once per array, by process 0.
    return _crc32c.of_zeros(x.nbytes) if jax.process_index() == 0 else 0


def start(arrays: Sequence[jax.Array], kind: str = SUM) -> list[Any]:
    """Begins each array's fingerprint and returns at once. Host arrays: views of their shards
    (held until the part is read; Orbax holds the same views while it writes); SUM of device
    arrays: the jitted reduction, dispatched asynchronously (a collective when they span
    processes, so every process calls this with the same arrays). Read each with `part`."""
    if kind == CRC32C:
        return [(_host_boxes(x, kind), _crc_constant(x)) for x in arrays]
    return [_host_boxes(x, kind) if _on_host(x) else _on_device(x) for x in arrays]


def part(pending: Any) -> int:
    """This process's share of a fingerprint begun by `start`; the shares of all processes
    combine (`combine`) into the fingerprint. Blocks until computed."""
    if isinstance(pending, tuple):  # CRC32C: (byte boxes, the constant's share)
        boxes, value = pending
        for box in boxes:
            value ^= _crc32c.box_part(*box)
        return value
    if isinstance(pending, list):
        return sum(_box_sum(*box) for box in pending) % _MOD
    # A scalar reduced over the whole array is replicated: process 0 counts it, once.
    return int(np.asarray(pending.addressable_data(0))) if jax.process_index() == 0 else 0


def _pieces(x: jax.Array) -> list[tuple[Any, int, int, tuple[int, ...]]]:
    """(shard data, first row, end row, start) pieces of the shards this process holds (replica 0
    of each), split along the first dim; the data is read only when a piece is computed."""
    pieces = []
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = tuple(s.indices(n)[0] for s, n in zip(shard.index, x.shape))
        shape = shard.data.shape
        rows = shape[0] if shape else 1
        row_bytes = max(1, shard.data.nbytes // max(rows, 1))
        step = max(1, _PIECE_BYTES // row_bytes)
        pieces.extend((shard.data, r0, min(rows, r0 + step), start) for r0 in range(0, max(rows, 1), step))
    return pieces


def _piece_part(kind: str, data: Any, r0: int, r1: int, start: tuple[int, ...], shape: tuple[int, ...]) -> int:
    values = np.asarray(data)  # waits for this shard's transfer only
    if values.ndim:
        values, start = values[r0:r1], (start[0] + r0,) + start[1:]
    if kind == CRC32C:
        return _crc32c.box_part(*_crc32c.as_bytes(values, start, shape))
    return _box_sum(*_host_bits(values, start, shape))


def _host_parts(arrays: Sequence[jax.Array], kind: str) -> list[int]:
    jobs = [(i, piece) for i, x in enumerate(arrays) for piece in _pieces(x)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(jobs), cpus)

    def run(job: tuple[int, Any]) -> int:
        return _piece_part(kind, *job[1], tuple(arrays[job[0]].shape))

    if workers <= 1:
        values = [run(job) for job in jobs]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="remat_kit-fingerprint") as pool:
            values = list(pool.map(run, jobs))
    parts = [_crc_constant(x) for x in arrays] if kind == CRC32C else [0] * len(arrays)
    for (i, _), value in zip(jobs, values):
        parts[i] = _add(kind, parts[i], value)
    return parts


def all_on_host(arrays: Sequence[jax.Array], kind: str = SUM) -> bool:
    """Whether `local_parts` of these arrays runs no device computation (hence no collective:
    a process may compute its parts before it knows whether the others' reads succeeded)."""
    return kind == CRC32C or all(_on_host(x) for x in arrays)


def local_parts(arrays: Sequence[jax.Array], kind: str = SUM) -> list[int]:
    """This process's part of each array's fingerprint (see `combine`). A collective when the
    kind is SUM and some array is on an accelerator and spans processes: then every process
    calls it with the same arrays."""
    if kind == CRC32C:
        _require_crc32c()
        return _host_parts(arrays, kind)
    on_host = [i for i, x in enumerate(arrays) if _on_host(x)]
    # Device reductions first: dispatched asynchronously, they run while the host sums.
    pending = {i: _on_device(x) for i, x in enumerate(arrays) if not _on_host(x)}
    parts = dict(zip(on_host, _host_parts([arrays[i] for i in on_host], kind)))
    parts.update((i, part(value)) for i, value in pending.items())
    return [parts[i] for i in range(len(arrays))]


def combine(parts: Sequence[Sequence[int]], kind: str = SUM) -> list[int]:
    """The fingerprints from every process's `local_parts` (one list per process): SUM's parts
    add up mod 2**32, CRC32C's xor."""
    return [functools.reduce(functools.partial(_add, kind), column, 0) for column in zip(*parts)]


def fingerprints(
    arrays: Sequence[jax.Array],
    gather: Callable[[list[int]], list[list[int]]] | None = None,
    kind: str = SUM,
) -> list[int]:
    """One uint32 fingerprint of the kind per array. When the arrays span processes, every
    process calls this with the same arrays and `gather` exchanges the processes' parts (each
    process's list, in process order)."""
    parts = local_parts(arrays, kind)
    return parts if gather is None else combine(gather(parts), kind)
