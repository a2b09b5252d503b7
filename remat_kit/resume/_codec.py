"""Turn a training state into (flat dict of numpy arrays, JSON spec) and back, without pickle.

Orbax stores the arrays (one `StandardSave` item); the spec (an item saved with `JsonSave`)
records the tree: containers, JSON scalars, which framework each array came from (JAX, NumPy,
torch with dtype and device), a CRC32 of every array's bytes, and the state of objects that
carry their own (`state_dict()` / `get_state()`). Nothing is ever unpickled on restore: a
checkpoint from an untrusted source can at worst hold wrong numbers, not run code.

Arrays are copied to host memory when `encode` runs, so an async save is safe against the
training loop mutating tensors in place (torch optimizers do) while Orbax writes.
"""

from __future__ import annotations

import random
import sys
import zlib
from typing import Any

import numpy as np

from remat_kit.resume import _torch_arrays

# Orbax refuses zero-size arrays ("Cannot save arrays with zero size"): they live in the spec.
_ARRAY_PREFIX = "a"


def checksum(array: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order); the same value Orbax-restored data must give."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return zlib.crc32(flat.view(np.uint8).data) if flat.size else 0


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _jax():
    # Only touch jax when the state holds JAX objects; orbax has imported it already anyway.
    return sys.modules.get("jax")


def _is_jax_array(obj: Any) -> bool:
    jax = _jax()
    return jax is not None and isinstance(obj, jax.Array)


def _is_jax_key(obj: Any) -> bool:
    jax = _jax()
    return _is_jax_array(obj) and jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key)


def _is_stateful(obj: Any) -> bool:
    # torch modules, optimizers, LR schedulers, GradScaler, torchdata/StatefulDataLoader, ...
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _is_checkpointable(obj: Any) -> bool:
    return callable(getattr(obj, "get_state", None)) and callable(getattr(obj, "set_state", None))


class Encoder:
    """Walks a state once; collects host arrays under keys `a0, a1, ...` and returns the spec."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def encode(self, obj: Any, path: str = "state") -> dict[str, Any]:
        if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
            # before the float check: np.float64 subclasses float, and must come back as np.float64
            return self._array(np.array(obj, copy=True), path, {"kind": "numpy_scalar"})
        if obj is None or isinstance(obj, (bool, int, str)):
            return {"t": "json", "v": obj}
        if isinstance(obj, float):
            # JSON has no inf/nan literal that every reader accepts: keep floats exact as repr.
            return {"t": "float", "v": repr(obj)}
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(
                        f"{path} has the key {key!r} of type {type(key).__name__}; checkpointed "
                        "dicts may only use str or int keys. Convert the key, e.g. to str(key)."
                    )
                items.append([key, self.encode(value, f"{path}[{key!r}]")])
            return {"t": "dict", "items": items}
        if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
            return {
                "t": "namedtuple",
                "type": _type_name(obj),
                "fields": list(obj._fields),
                "items": [self.encode(v, f"{path}.{f}") for f, v in zip(obj._fields, obj)],
            }
        if isinstance(obj, (list, tuple)):
            kind = "list" if isinstance(obj, list) else "tuple"
            return {"t": kind, "items": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, random.Random):
            return {"t": "py_random", "state": self.encode(obj.getstate(), f"{path}.getstate()")}
        if isinstance(obj, np.random.Generator):
            bit_generator = obj.bit_generator
            return {
                "t": "np_generator",
                "bit_generator": type(bit_generator).__name__,
                "state": self.encode(bit_generator.state, f"{path}.bit_generator.state"),
            }
        if _jax() is not None and (_is_jax_array(obj) or isinstance(obj, _jax().ShapeDtypeStruct)):
            return self._jax_leaf(obj, path)
        if isinstance(obj, np.ndarray):
            return self._array(np.array(obj, copy=True), path, {"kind": "numpy"})
        if _torch_arrays.is_tensor(obj):
            host, extra = _torch_arrays.to_numpy(obj, path)
            return self._array(host, path, extra)
        if _torch_arrays.is_generator(obj):
            host, extra = _torch_arrays.generator_state(obj)
            return self._array(host, path, extra)
        if _is_checkpointable(obj):
            state = obj.get_state()
            return {"t": "checkpointable", "type": _type_name(obj), "state": self.encode(state, f"{path}.get_state()")}
        if _is_stateful(obj):
            state = obj.state_dict()
            return {"t": "stateful", "type": _type_name(obj), "state": self.encode(state, f"{path}.state_dict()")}
        return self._pytree_node(obj, path)

    def _jax_leaf(self, obj: Any, path: str) -> dict[str, Any]:
        jax = _jax()
        if isinstance(obj, jax.ShapeDtypeStruct):
            raise TypeError(
                f"{path} is an abstract jax.ShapeDtypeStruct{tuple(obj.shape)}; save() needs "
                "concrete values. Abstract leaves are only allowed in a restore template."
            )
        if not obj.is_fully_addressable:
            raise ValueError(
                f"{path} is a jax.Array sharded across processes; remat_kit.resume saves from "
                "one process only. Use orbax.checkpoint.CheckpointManager directly for multi-host."
            )
        if _is_jax_key(obj):
            impl = str(jax.random.key_impl(obj))
            data = np.asarray(jax.random.key_data(obj)).copy()
            return self._array(data, path, {"kind": "jax_key", "impl": impl})
        return self._array(np.asarray(obj).copy(), path, {"kind": "jax"})

    def _array(self, host: np.ndarray, path: str, extra: dict[str, Any]) -> dict[str, Any]:
        if host.dtype.kind in "OUSMm":
            raise TypeError(
                f"{path} is an array of dtype {host.dtype}; only numeric and bool arrays can be saved "
                "(strings, objects and datetimes cannot). Store strings as a list of str."
            )
        node = {"t": "array", "dtype": host.dtype.name, "shape": list(host.shape), **extra}
        if host.size == 0:
            node["key"] = None
            node["crc32"] = 0
            return node
        key = f"{_ARRAY_PREFIX}{len(self.arrays)}"
        self.arrays[key] = host
        node["key"] = key
        node["crc32"] = checksum(host)
        return node

    def _pytree_node(self, obj: Any, path: str) -> dict[str, Any]:
        # Custom JAX pytree nodes (flax.struct dataclasses, equinox modules, ...): one level.
        jax = _jax()
        if jax is not None:
            children, treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
            if treedef.num_nodes > 1 or treedef.num_leaves != 1:
                keys = [jax.tree_util.keystr(p) for p, _ in children]
                items = [self.encode(child, f"{path}{k}") for k, (_, child) in zip(keys, children)]
                return {"t": "pytree", "type": _type_name(obj), "keys": keys, "items": items}
        raise TypeError(
            f"{path} is a {_type_name(obj)}, which remat_kit.resume cannot save without pickle. "
            "Allowed: dict/list/tuple/namedtuple, JAX pytrees, numpy/JAX arrays and PRNG keys, "
            "torch tensors and objects with state_dict()/load_state_dict() or "
            "get_state()/set_state(), None/bool/int/float/str. Convert it to one of these."
        )


def encode(state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Returns (flat dict of host arrays for Orbax, JSON-serializable spec of the tree)."""
    encoder = Encoder()
    spec = encoder.encode(state)
    return encoder.arrays, spec

