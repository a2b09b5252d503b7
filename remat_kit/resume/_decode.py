"""Rebuild a saved state from (spec, host arrays), optionally shaped by a template.

With no template, containers come back as dict/list/tuple (namedtuples and custom pytree nodes
as dicts, since rebuilding an arbitrary class from a name would be pickle by another route) and
arrays in the framework they were saved from. With a template, the result has the template's
types, JAX shardings and torch devices, objects in the template (`nn.Module`, optimizers,
iterators, generators) are loaded in place, and every structural difference is reported at once.
In-place loads run only after the whole tree matched, so a failed restore changes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from remat_kit.resume import _torch_arrays
from remat_kit.resume._codec import _is_checkpointable, _is_jax_array, _is_stateful, _jax, checksum
from remat_kit.resume._errors import CorruptCheckpointError, TemplateMismatchError

_NO_TEMPLATE = object()
_MAX_REPORTED = 20


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def _template_dtype_name(template: Any) -> str | None:
    dtype = getattr(template, "dtype", None)
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


class _Decoder:
    def __init__(self, arrays: Mapping[str, np.ndarray], step: int | None) -> None:
        self.arrays = arrays
        self.step = step
        self.mismatches: list[str] = []
        self.corrupt: list[str] = []
        self.in_place: list[Callable[[], None]] = []

    def differ(self, path: str, message: str) -> Any:
        self.mismatches.append(f"{path}: {message}")
        return None

    def decode(self, node: dict[str, Any], template: Any, path: str) -> Any:
        kind = node["t"]
        has_template = template is not _NO_TEMPLATE
        if kind in ("json", "float"):
            value = node["v"] if kind == "json" else float(node["v"])
            if has_template and not (template is None or isinstance(template, (bool, int, float, str))):
                return self.differ(path, f"saved a Python {type(value).__name__}, template has {type(template).__name__}")
            return value
        if kind == "dict":
            return self._dict(node, template, path)
        if kind in ("list", "tuple", "namedtuple"):
            return self._sequence(node, template, path)
        if kind == "pytree":
            return self._pytree(node, template, path)
        if kind == "array":
            return self._array(node, template, path)
        if kind in ("stateful", "checkpointable"):
            return self._stateful(node, template, path)
        if kind == "py_random":
            return self._py_random(node, template, path)
        if kind == "np_generator":
            return self._np_generator(node, template, path)
        self.corrupt.append(f"{path}: unknown node kind {kind!r} in the checkpoint spec")
        return None

    def _dict(self, node: dict[str, Any], template: Any, path: str) -> Any:
        saved = {key: child for key, child in node["items"]}
        if template is _NO_TEMPLATE:
            return {key: self.decode(child, _NO_TEMPLATE, f"{path}[{key!r}]") for key, child in saved.items()}
        if _is_stateful(template) or _is_checkpointable(template):
            return self._stateful(node, template, path)  # saved obj.state_dict(), template is obj
        if not isinstance(template, Mapping):
            return self.differ(path, f"saved a dict, template has {type(template).__name__}")
        for key in template:
            if key not in saved:
                self.differ(f"{path}[{key!r}]", "in the template but not in the checkpoint")
        for key in saved:
            if key not in template:
                self.differ(f"{path}[{key!r}]", "in the checkpoint but not in the template")
        pairs = [(k, self.decode(saved[k], template[k], f"{path}[{k!r}]")) for k in template if k in saved]
        try:
            return type(template)(pairs)
        except TypeError:  # a Mapping subclass with another constructor (defaultdict, FrozenDict)
            return dict(pairs)

    def _sequence(self, node: dict[str, Any], template: Any, path: str) -> Any:
        items = node["items"]
        fields = node.get("fields")
        if template is _NO_TEMPLATE:
            values = [self.decode(c, _NO_TEMPLATE, f"{path}[{i}]") for i, c in enumerate(items)]
            if fields is not None:
                return dict(zip(fields, values))
            return values if node["t"] == "list" else tuple(values)
        if not isinstance(template, (list, tuple)):
            return self.differ(path, f"saved a {node['t']} of {len(items)}, template has {type(template).__name__}")
        if len(template) != len(items):
            return self.differ(path, f"saved {len(items)} items, template has {len(template)}")
        values = [self.decode(c, t, f"{path}[{i}]") for i, (c, t) in enumerate(zip(items, template))]
        if hasattr(type(template), "_fields"):
            return type(template)(*values)
        return type(template)(values)

    def _pytree(self, node: dict[str, Any], template: Any, path: str) -> Any:
        if template is _NO_TEMPLATE:
            return {k: self.decode(c, _NO_TEMPLATE, f"{path}{k}") for k, c in zip(node["keys"], node["items"])}
        jax = _jax()
        children, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=lambda x: x is not template)
        template_keys = [jax.tree_util.keystr(p) for p, _ in children]
        if template_keys != node["keys"]:
            return self.differ(
                path, f"saved a {node['type']} with children {node['keys']}, template "
                f"{type(template).__qualname__} has {template_keys}"
            )
        values = [self.decode(c, t, f"{path}{k}") for k, c, (_, t) in zip(node["keys"], node["items"], children)]
        return jax.tree_util.tree_unflatten(treedef, values)

    def _host_array(self, node: dict[str, Any], path: str) -> np.ndarray | None:
        dtype, shape = _np_dtype(node["dtype"]), tuple(node["shape"])
        if node["key"] is None:
            return np.zeros(shape, dtype)
        host = self.arrays.get(node["key"])
        if host is None:
            self.corrupt.append(f"{path}: array {node['key']} is missing from the checkpoint")
            return None
        host = np.asarray(host)
        if host.shape != shape or host.dtype != dtype:
            self.corrupt.append(f"{path}: stored {host.dtype}{list(host.shape)}, spec says {dtype}{list(shape)}")
            return None
        if checksum(host) != node["crc32"]:
            self.corrupt.append(f"{path}: CRC32 of the restored bytes does not match the one saved")
            return None
        return host

    def _array(self, node: dict[str, Any], template: Any, path: str) -> Any:
        host = self._host_array(node, path)
        kind = node["kind"]
        if template is not _NO_TEMPLATE and not self._array_matches(node, template, path):
            return None
        if host is None:
            return None
        target = kind if template is _NO_TEMPLATE else _template_kind(template)
        if target in ("torch", "torch_generator"):
            if kind == "torch_generator":
                generator = None if template is _NO_TEMPLATE else template
                if generator is not None:
                    self.in_place.append(lambda: _torch_arrays.generator_from_numpy(host, node, generator))
                    return generator
                return _torch_arrays.generator_from_numpy(host, node)
            meta = node if kind == "torch" else {**node, "torch_dtype": node["dtype"], "device": "cpu"}
            return _torch_arrays.from_numpy(host, meta, None if template is _NO_TEMPLATE else template)
        if target in ("jax", "jax_key"):
            jax = _jax() or __import__("jax")
            sharding = None if template is _NO_TEMPLATE else getattr(template, "sharding", None)
            if kind == "jax_key":
                return jax.random.wrap_key_data(jax.device_put(host, sharding), impl=node["impl"])
            return jax.device_put(host, sharding)
        if target == "numpy_scalar":
            return host[()]
        return host

    def _array_matches(self, node: dict[str, Any], template: Any, path: str) -> bool:
        kind = _template_kind(template)
        if kind is None:
            self.differ(path, f"saved an array {node['dtype']}{node['shape']}, template has {type(template).__name__}")
            return False
        if (kind == "jax_key") != (node["kind"] == "jax_key") or (kind == "torch_generator") != (
            node["kind"] == "torch_generator"
        ):
            self.differ(path, f"saved a {node['kind']} leaf, template has a {kind} leaf")
            return False
        if kind in ("jax_key", "torch_generator"):
            return True
        shape, dtype = list(getattr(template, "shape", ())), _template_dtype_name(template)
        saved_dtype = node.get("torch_dtype", node["dtype"])
        if shape != node["shape"] or dtype != saved_dtype:
            self.differ(path, f"saved {saved_dtype}{node['shape']}, template has {dtype}{shape}")
            return False
        return True

    def _stateful(self, node: dict[str, Any], template: Any, path: str) -> Any:
        inner = node["state"] if node["t"] in ("stateful", "checkpointable") else node
        if template is _NO_TEMPLATE:
            return self.decode(inner, _NO_TEMPLATE, path)
        loader = "set_state" if _is_checkpointable(template) else "load_state_dict"
        if not (_is_stateful(template) or _is_checkpointable(template)):
            # Saved an object, the template holds its state (e.g. model.state_dict()).
            return self.decode(inner, template, path)
        state = self.decode(inner, _NO_TEMPLATE, path)

        def load() -> None:
            try:
                getattr(template, loader)(state)
            except Exception as error:
                raise TemplateMismatchError(
                    f"{path}.{loader}() rejected the state saved at step {self.step}: {error}"
                ) from error

        self.in_place.append(load)
        return template

    def _py_random(self, node: dict[str, Any], template: Any, path: str) -> Any:
        state = self.decode(node["state"], _NO_TEMPLATE, path)
        if template is _NO_TEMPLATE:
            generator = random.Random()
            generator.setstate(state)
            return generator
        if not isinstance(template, random.Random):
            return self.differ(path, f"saved a random.Random, template has {type(template).__name__}")
        self.in_place.append(lambda: template.setstate(state))
        return template

    def _np_generator(self, node: dict[str, Any], template: Any, path: str) -> Any:
        state = self.decode(node["state"], _NO_TEMPLATE, path)
        if template is _NO_TEMPLATE:
            bit_generator_cls = getattr(np.random, node["bit_generator"], None)
            if not (isinstance(bit_generator_cls, type) and issubclass(bit_generator_cls, np.random.BitGenerator)):
                self.corrupt.append(f"{path}: unknown numpy bit generator {node['bit_generator']!r}")
                return None
            template = np.random.Generator(bit_generator_cls())
        elif not isinstance(template, np.random.Generator):
            return self.differ(path, f"saved a numpy.random.Generator, template has {type(template).__name__}")

        def load(generator: np.random.Generator = template) -> None:
            generator.bit_generator.state = state

        self.in_place.append(load)
        return template


def _template_kind(template: Any) -> str | None:
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


def decode(
    spec: dict[str, Any], arrays: Mapping[str, np.ndarray], template: Any = _NO_TEMPLATE, *, step: int | None = None
) -> Any:
    """Rebuilds the state; raises CorruptCheckpointError or TemplateMismatchError listing all problems."""
    decoder = _Decoder(arrays, step)
    result = decoder.decode(spec, template, "state")
    if decoder.corrupt:
        raise CorruptCheckpointError(step, "; ".join(decoder.corrupt[:_MAX_REPORTED]))
    if decoder.mismatches:
        shown = "\n  ".join(decoder.mismatches[:_MAX_REPORTED])
        more = len(decoder.mismatches) - _MAX_REPORTED
        raise TemplateMismatchError(
            f"template does not match the checkpoint saved at step {step} "
            f"({len(decoder.mismatches)} difference(s)):\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nPass a template with the structure you saved, or template=None to get the saved tree as is."
        )
    for load in decoder.in_place:
        load()
    return result
