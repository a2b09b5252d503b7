"""Turn a training state into (spec, arrays by where they go) and back, without pickle.

The spec (JSON) records the tree: containers, JSON scalars, which framework each array came
from, and a checksum per array. The arrays go three ways:

* JAX arrays go to Orbax as they are (`jax_arrays`, keys `j0, j1, ...`): sharded or not, never
  copied to host here; Orbax does the device-to-host copy (asynchronously) and each process
  writes the shards it holds. Their checksum is a fingerprint computed on device
  (`_fingerprint`), stored by the host item once computed.
* torch DTensors (FSDP2 parameters and optimizer state) go to torch.distributed.checkpoint
  (`dtensors`, keys `d0, ...`), written by the ranks that hold their shards.
* everything else (numpy, torch tensors, generators) is copied to host memory now (`arrays`,
  keys `a0, ...`, with a CRC32), so an async save is safe against the training loop mutating
  tensors in place (torch optimizers do) while the write runs.

Subtrees wrapped in `PerProcess` are encoded separately, one copy per process; the rest of the
host state is the same on every process and written by process 0.
Nothing is ever unpickled on restore: a checkpoint from an untrusted source can at worst hold
wrong numbers, not run code.
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
_JAX_PREFIX = "j"
_DTENSOR_PREFIX = "d"


class PerProcess:
    """Marks a part of the state that differs between processes (a data iterator reading this
    rank's shard, per-rank RNGs): every process saves its own copy and restores its own.

    Everything else outside JAX arrays and torch DTensors is taken to be the same on every
    process and is written by process 0 only. Put `PerProcess(template_part)` at the same place
    in the restore template; the restored tree holds `PerProcess(restored_part)` there.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerProcess({self.value!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PerProcess) and other.value == self.value


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a saved dtype name (ml_dtypes for bfloat16, float8)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


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
    """Walks a state once; collects arrays by destination (see the module docstring)."""

    def __init__(self, *, per_process: bool = False, shared: Encoder | None = None, copy_host: bool = True) -> None:
        self.copy_host = copy_host  # False only when the write finishes before save() returns
        self.arrays: dict[str, np.ndarray] = {}
        self.jax_arrays: dict[str, Any] = {} if shared is None else shared.jax_arrays
        self.dtensors: dict[str, Any] = {} if shared is None else shared.dtensors
        self.per_process = per_process  # inside PerProcess: JAX arrays go to host too
        self.local: Encoder | None = None  # encodes the PerProcess parts, into local_specs
        self.local_specs: list[Any] = []
        self.spec: Any = None

    def encode(self, obj: Any, path: str = "state") -> dict[str, Any]:
        if isinstance(obj, PerProcess):
            return self._per_process(obj, path)
        # In this order: np.float64 is a float, a namedtuple a tuple, a tensor may have state_dict().
        for kind in (self._scalar, self._container, self._rng, self._array_leaf, self._object):
            node = kind(obj, path)
            if node is not None:
                return node
        return self._pytree_node(obj, path)

    def _per_process(self, obj: PerProcess, path: str) -> dict[str, Any]:
        if self.per_process:
            raise TypeError(f"{path} is a PerProcess inside a PerProcess; mark the outer part only.")
        if self.local is None:
            self.local = Encoder(per_process=True, shared=self, copy_host=self.copy_host)
        # The shared spec (written by process 0) holds only the index: each process's part
        # lives in its own file (see _host_item).
        self.local_specs.append(self.local.encode(obj.value, f"{path}.value"))
        return {"t": "per_process", "index": len(self.local_specs) - 1}

    def _scalar(self, obj: Any, path: str) -> dict[str, Any] | None:
        if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
            # before the float check: np.float64 subclasses float, and must come back as np.float64
            return self._array(np.array(obj, copy=True), path, {"kind": "numpy_scalar"})
        if obj is None or isinstance(obj, (bool, int, str)):
            return {"t": "json", "v": obj}
        if isinstance(obj, float):
            # JSON has no inf/nan literal that every reader accepts: keep floats exact as repr.
            return {"t": "float", "v": repr(obj)}
        return None

    def _container(self, obj: Any, path: str) -> dict[str, Any] | None:
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
        return None

    def _rng(self, obj: Any, path: str) -> dict[str, Any] | None:
        if isinstance(obj, random.Random):
            return {"t": "py_random", "state": self.encode(obj.getstate(), f"{path}.getstate()")}
        if isinstance(obj, np.random.Generator):
            bit_generator = obj.bit_generator
            return {
                "t": "np_generator",
                "bit_generator": type(bit_generator).__name__,
                "state": self.encode(bit_generator.state, f"{path}.bit_generator.state"),
            }
        return None

    def _array_leaf(self, obj: Any, path: str) -> dict[str, Any] | None:
        if _jax() is not None and (_is_jax_array(obj) or isinstance(obj, _jax().ShapeDtypeStruct)):
            return self._jax_leaf(obj, path)
        if isinstance(obj, np.ndarray):
            return self._array(np.array(obj, copy=True) if self.copy_host else np.asarray(obj), path, {"kind": "numpy"})
        if _torch_arrays.is_dtensor(obj) and not self.per_process:
            key = f"{_DTENSOR_PREFIX}{len(self.dtensors)}"
            self.dtensors[key] = obj
            return {
                "t": "array",
                "kind": "dtensor",
                "key": key,
                "dtype": _torch_arrays.dtype_name(obj.dtype),
                "shape": list(obj.shape),
                "crc32": None,
            }
        if _torch_arrays.is_tensor(obj):
            host, extra = _torch_arrays.to_numpy(obj, path, copy=self.copy_host)
            return self._array(host, path, extra)
        if _torch_arrays.is_generator(obj):
            host, extra = _torch_arrays.generator_state(obj)
            return self._array(host, path, extra)
        return None

    def _object(self, obj: Any, path: str) -> dict[str, Any] | None:
        if _is_checkpointable(obj):
            state = obj.get_state()
            return {"t": "checkpointable", "type": _type_name(obj), "state": self.encode(state, f"{path}.get_state()")}
        if _is_stateful(obj):
            state = obj.state_dict()
            return {"t": "stateful", "type": _type_name(obj), "state": self.encode(state, f"{path}.state_dict()")}
        return None

    def _jax_leaf(self, obj: Any, path: str) -> dict[str, Any]:
        jax = _jax()
        if isinstance(obj, jax.ShapeDtypeStruct):
            raise TypeError(
                f"{path} is an abstract jax.ShapeDtypeStruct{tuple(obj.shape)}; save() needs "
                "concrete values. Abstract leaves are only allowed in a restore template."
            )
        extra: dict[str, Any] = {"kind": "jax"}
        if _is_jax_key(obj):
            extra = {"kind": "jax_key", "impl": str(jax.random.key_impl(obj))}
            obj = jax.random.key_data(obj)  # stays on its devices
        if self.per_process and not obj.is_fully_addressable:
            raise ValueError(
                f"{path} is a jax.Array sharded across processes inside PerProcess; "
                "global arrays are saved once for all processes: move it out of PerProcess."
            )
        if self.per_process or (obj.is_fully_addressable and jax.process_count() > 1):
            # An array that lives on one process of a multi-process job (a PRNG key, a step
            # counter made with jnp) is host state like any other: process 0's copy is saved.
            return self._array(np.asarray(obj).copy(), path, extra)
        if obj.size == 0:
            return {"t": "array", "dtype": obj.dtype.name, "shape": list(obj.shape), "key": None, "crc32": 0, **extra}
        key = f"{_JAX_PREFIX}{len(self.jax_arrays)}"
        self.jax_arrays[key] = obj
        # A JAX array's checksum is its device fingerprint, stored apart (host/fingerprints.json)
        # because it is computed while the save goes on (see _fingerprint, _host_item).
        return {
            "t": "array",
            "dtype": obj.dtype.name,
            "shape": list(obj.shape),
            "key": key,
            "crc32": None,
            "sharding": repr(obj.sharding),
            **extra,
        }

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


def encode(state: Any, *, copy_host: bool = True) -> Encoder:
    """Walks `state`; the returned encoder holds `.spec` and the arrays by destination
    (`.arrays`, `.jax_arrays`, `.dtensors`, and `.local` for the PerProcess parts).
    `copy_host=False` shares host arrays and CPU tensors instead of copying them: only for a
    save that is written before the caller can change them again."""
    encoder = Encoder(copy_host=copy_host)
    encoder.spec = encoder.encode(state)
    return encoder


def jax_nodes(spec: Any) -> list[dict[str, Any]]:
    """The spec nodes of JAX arrays stored through Orbax, in encoding order."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("t") == "array" and str(node.get("key") or "").startswith(_JAX_PREFIX):
                found.append(node)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    return found


def template_dtype_name(template: Any) -> str | None:
    dtype = getattr(template, "dtype", None)
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def template_kind(template: Any) -> str | None:
    """The saved-node kind a template leaf asks for (None: not an array leaf)."""
    if _torch_arrays.is_tensor(template):
        return "torch"
    if _torch_arrays.is_generator(template):
        return "torch_generator"
    jax = _jax()
    if jax is not None and (_is_jax_array(template) or isinstance(template, jax.ShapeDtypeStruct)):
        return "jax_key" if jax.dtypes.issubdtype(template.dtype, jax.dtypes.prng_key) else "jax"
    if isinstance(template, np.ndarray):
        return "numpy"
    if isinstance(template, np.generic):
        return "numpy_scalar"
    return None
