"""CRC-32C of an array's C-order bytes, computed shard by shard and combined across processes.

The CRC of each contiguous run of bytes comes from the `crc32c` package (hardware CRC32C
instructions, the GIL released: about 0.1 s of CPU per GiB, half the position-weighted sum's
two NumPy passes). What no library offers is the combination: a shard of a sharded array is
rows scattered through the array's bytes, and the processes each hold some of them. A CRC
without its initial value and final xor (`crc0`, "raw") is linear over GF(2) and blind to
leading zeros, so the raw CRC of the whole array is the xor, over every row of bytes, of the
row's raw CRC times x^(8 * the bytes after it) mod the CRC polynomial (zlib's crc32_combine
does the same for two pieces). Each process xors its rows' terms into its part; the parts xor
to the raw CRC of the array; the standard CRC-32C is that xor the CRC-32C of as many zero
bytes, which process 0 adds to its part. So the value is the one `crc32c.crc32c(x.tobytes())`
gives, whatever the sharding at save or at restore.

Multiplying by x^(8 n) is done for many rows at once: n's bits pick constant multipliers
x^(8 * 2^k), each applied through four 256-entry tables (the slicing-by-4 of table CRCs).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_POLY = 0x82F63B78  # Castagnoli, bit-reflected: bit 31 - i holds the coefficient of x^i
_ONES = 0xFFFFFFFF


def _times_x(value: int) -> int:
    return (value >> 1) ^ _POLY if value & 1 else value >> 1


def _multiply(a: int, b: int) -> int:
    """a * b mod the polynomial (both bit-reflected)."""
    product = 0
    for bit in range(31, -1, -1):  # bit 31 is x^0
        if a >> bit & 1:
            product ^= b
        b = _times_x(b)
    return product


@functools.cache
def _x_8_pow_2(k: int) -> int:
    """x^(8 * 2^k) mod the polynomial."""
    return 1 << (31 - 8) if k == 0 else _multiply(_x_8_pow_2(k - 1), _x_8_pow_2(k - 1))


@functools.cache
def _tables(k: int) -> np.ndarray:
    """(4, 256) uint32: entry [m, b] is (b << 8 m) * x^(8 * 2^k), so a value times that constant
    is the xor of its four bytes' entries."""
    power = [_x_8_pow_2(k)]  # power[j] = x^(8 * 2^k) * x^j
    for _ in range(31):
        power.append(_times_x(power[-1]))
    tables = np.zeros((4, 256), np.uint32)
    byte = np.arange(256)
    for m in range(4):
        for j in range(8):
            bit = 8 * m + j  # the value's bit `bit` is x^(31 - bit)
            tables[m, (byte >> j & 1).astype(bool)] ^= np.uint32(power[31 - bit])
    return tables


@functools.cache
def _table_lists(k: int) -> tuple[list[int], ...]:
    return tuple(row.tolist() for row in _tables(k))


def _shift_one(value: int, nbytes: int) -> int:
    """`shift` of one value, in Python ints: NumPy's per-call cost is most of `shift`'s time on
    one value (about 0.3 ms against 10 us here), and a contiguous box, a row-split shard, is one
    (`box_part`'s one row)."""
    k = 0
    while nbytes:
        if nbytes & 1:
            t = _table_lists(k)
            value = t[0][value & 255] ^ t[1][value >> 8 & 255] ^ t[2][value >> 16 & 255] ^ t[3][value >> 24]
        nbytes >>= 1
        k += 1
    return value


def shift(values: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """values[i] * x^(8 * nbytes[i]) mod the polynomial: the raw CRC of a run of bytes followed
    by nbytes[i] zero bytes, from the raw CRC of the run."""
    values = np.array(values, np.uint32)
    nbytes = np.array(nbytes, np.uint64)
    if values.size == 1:
        return np.array([_shift_one(int(values[0]), int(nbytes[0]))], np.uint32)
    k = 0
    while nbytes.size and (nbytes >> np.uint64(k)).any():
        chosen = (nbytes >> np.uint64(k) & np.uint64(1)).astype(bool)
        if chosen.any():
            table, v = _tables(k), values[chosen]
            values[chosen] = table[0][v & 255] ^ table[1][v >> 8 & 255] ^ table[2][v >> 16 & 255] ^ table[3][v >> 24]
        k += 1
    return values


def of_zeros(nbytes: int) -> int:
    """The standard CRC-32C of `nbytes` zero bytes."""
    return _shift_one(_ONES, nbytes) ^ _ONES


def as_bytes(
    data: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """A box of an array (`data`, its `start` in the array of `shape`) as a box of the array's
    bytes: a trailing dim of the item size."""
    data = np.require(data, requirements="C")
    size = data.dtype.itemsize
    return data.reshape(-1).view(np.uint8).reshape(data.shape + (size,)), start + (0,), shape + (size,)


def box_part(box: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """The box's share of the raw CRC of an array of uint8 of `shape`: the xor of its rows' raw
    CRCs, each times x^(8 * the array's bytes after the row)."""
    import crc32c

    if box.size == 0:
        return 0
    # The box is rows of contiguous bytes of the array: dims `last..` of the box, where every
    # dim after `last` spans the whole array.
    last = box.ndim - 1
    while last > 0 and box.shape[last] == shape[last]:
        last -= 1
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    rows = box.reshape(-1, math.prod(box.shape[last:]))
    offsets = np.full(rows.shape[0], start[last] * strides[last], np.uint64)
    if last:
        index = np.indices(box.shape[:last]).reshape(last, -1)
        for d in range(last):
            offsets += (index[d] + start[d]).astype(np.uint64) * np.uint64(strides[d])
    after = np.uint64(math.prod(shape) - rows.shape[1]) - offsets
    # crc32c(row, ~0) starts from a zero register; its final xor undone gives the raw CRC.
    raw = np.fromiter((crc32c.crc32c(row, _ONES) for row in rows), np.uint32, rows.shape[0]) ^ np.uint32(_ONES)
    return int(np.bitwise_xor.reduce(shift(raw, after)))
