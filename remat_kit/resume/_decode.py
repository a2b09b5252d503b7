"""Rebuild a saved state from its spec and arrays, optionally shaped by a template.

With no template, containers come back as dict/list/tuple (namedtuples and custom pytree nodes
as dicts, since rebuilding an arbitrary class from a name would be pickle by another route) and
arrays in the framework they were saved from. With a template, the result has the template's
types, JAX shardings and torch devices, objects in the template (`nn.Module`, optimizers,
iterators, generators) are loaded in place, and every structural difference is reported at once.
A mismatched template changes nothing (`plan` reports it before any data is read). Template
tensors (a module's too) receive the data as it is read, as with `dcp.load`: a step found
corrupt while reading may leave them partly written. Other in-place loads run after the read.

A restore walks the spec twice: `plan` (no data read) checks the template and collects where
each JAX array and DTensor goes (the template's sharding, the template tensor), so Orbax and
torch.distributed.checkpoint read every array straight into its target layout; `decode` then
builds the tree from what they read.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from remat_kit.resume import _torch_arrays
from remat_kit.resume._codec import (
    PerProcess,
    _is_checkpointable,
    _is_stateful,
    _jax,
    checksum,
    np_dtype,
    template_dtype_name,
    template_kind,
)
from remat_kit.resume._errors import TemplateMismatchError, report_problems

_NO_TEMPLATE = object()


HostReader = Callable[..., np.ndarray]  # (key, dtype, shape, per_process, out=None): out is filled when given


class _Decoder:
    def __init__(
        self,
        step: int | None,
        *,
        host: HostReader | None = None,
        jax_arrays: Mapping[str, Any] = None,
        dtensors: Mapping[str, Any] = None,
        local_specs: list[Any] | None = None,
        planning: bool = False,
    ) -> None:
        self.host = host
        self.jax_arrays = jax_arrays or {}
        self.dtensors = dtensors or {}
        self.local_specs = local_specs
        self.planning = planning
        self.step = step
        self.mismatches: list[str] = []
        self.corrupt: list[str] = []
        self.in_place: list[Callable[[], None]] = []
        self.jax_targets: dict[str, Any] = {}  # key -> template sharding (or None)
        self.dtensor_targets: dict[str, Any] = {}  # key -> template tensor
        self._local = False  # decoding a PerProcess part: host keys refer to this process's files

    def differ(self, path: str, message: str) -> Any:
        self.mismatches.append(f"{path}: {message}")
        return None

    def decode(self, node: dict[str, Any], template: Any, path: str) -> Any:
        kind = node["t"]
        has_template = template is not _NO_TEMPLATE
        if kind in ("json", "float"):
            value = node["v"] if kind == "json" else float(node["v"])
            if has_template and not (template is None or isinstance(template, (bool, int, float, str))):
                return self.differ(
                    path, f"saved a Python {type(value).__name__}, template has {type(template).__name__}"
                )
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
        if kind == "per_process":
            return self._per_process(node, template, path)
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
                path,
                f"saved a {node['type']} with children {node['keys']}, template "
                f"{type(template).__qualname__} has {template_keys}",
            )
        values = [self.decode(c, t, f"{path}{k}") for k, c, (_, t) in zip(node["keys"], node["items"], children)]
        return jax.tree_util.tree_unflatten(treedef, values)

    def _per_process(self, node: dict[str, Any], template: Any, path: str) -> Any:
        if template is not _NO_TEMPLATE:
            if not isinstance(template, PerProcess):
                return self.differ(
                    path,
                    f"saved a PerProcess part, template has {type(template).__name__}; "
                    "wrap that part of the template in resume.PerProcess(...)",
                )
            template = template.value
        if self.local_specs is None:
            self.corrupt.append(f"{path}: this process has no saved PerProcess part")
            return None
        try:
            spec = self.local_specs[node["index"]]
        except IndexError:
            self.corrupt.append(f"{path}: PerProcess part {node['index']} is missing from this process's file")
            return None
        self._local = True
        try:
            return PerProcess(self.decode(spec, template, f"{path}.value"))
        finally:
            self._local = False

    def _host_array(self, node: dict[str, Any], path: str, out: np.ndarray | None = None) -> np.ndarray | None:
        dtype, shape = np_dtype(node["dtype"]), tuple(node["shape"])
        if node["key"] is None:
            return np.zeros(shape, dtype)
        if self.planning:
            return None
        try:
            args = (node["key"], dtype, list(shape), self._local)
            host = self.host(*args) if out is None else self.host(*args, out=out)
        except (OSError, ValueError, KeyError) as error:
            self.corrupt.append(f"{path}: array {node['key']} could not be read ({error})")
            return None
        if checksum(host) != node["crc32"]:
            self.corrupt.append(f"{path}: CRC32 of the restored bytes does not match the one saved")
            return None
        return host

    def _stored_array(self, node: dict[str, Any], template: Any, path: str) -> Any:
        """A JAX array restored by Orbax (already in the template's sharding) or a DTensor target."""
        key = node["key"]
        if node["kind"] == "dtensor":
            if self.planning:
                if template is _NO_TEMPLATE or not _torch_arrays.is_tensor(template):
                    self.differ(
                        path,
                        "saved a torch DTensor (sharded through torch.distributed.checkpoint); "
                        "the template must hold a tensor there to load it into, e.g. from "
                        "torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)",
                    )
                else:
                    self.dtensor_targets[key] = template
                return None
            return self.dtensors[key]
        if self.planning:
            # An uncommitted template leaf (optax's step count) may meet arrays on any devices in a
            # jit: it gets the default placement (every device, when the job spans processes).
            committed = template is not _NO_TEMPLATE and getattr(template, "committed", True)
            self.jax_targets[key] = getattr(template, "sharding", None) if committed else None
            return None
        array = self.jax_arrays[key]
        if node["kind"] == "jax_key":
            jax = _jax()
            array = jax.random.wrap_key_data(array, impl=node["impl"])
        if template is not _NO_TEMPLATE and template_kind(template) in ("torch", "numpy", "numpy_scalar"):
            host = np.asarray(array)
            if template_kind(template) == "torch":
                return _torch_arrays.from_numpy(host, {**node, "torch_dtype": node["dtype"]}, template)
            return host[()] if template_kind(template) == "numpy_scalar" else host
        return array

    def _array(self, node: dict[str, Any], template: Any, path: str) -> Any:
        kind = node["kind"]
        if template is not _NO_TEMPLATE and not self._array_matches(node, template, path):
            return None
        if node["key"] is not None and node["key"][0] != "a" and not self._local:
            return self._stored_array(node, template, path)
        if kind != "torch_generator" and template_kind(template) == "torch":
            return self._into_tensor(node, template, path)
        host = self._host_array(node, path)
        if host is None:
            return None
        target = kind if template is _NO_TEMPLATE else template_kind(template)
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
            if not getattr(template, "committed", True):
                # An uncommitted template (jax.random.key(0), jnp.zeros(...)) may meet arrays on
                # any devices in a jit; committing it to its device would break that.
                sharding = None
            if kind == "jax_key":
                return jax.random.wrap_key_data(jax.device_put(host, sharding), impl=node["impl"])
            return jax.device_put(host, sharding)
        if target == "numpy_scalar":
            return host[()]
        return host

    def _into_tensor(self, node: dict[str, Any], template: Any, path: str) -> Any:
        """Reads a host array into the template's tensor (straight into its memory when it can)."""
        if self.planning:
            return None
        view = _torch_arrays.host_view(template)
        host = self._host_array(node, path, out=view)
        if host is not None and view is None:
            meta = node if node["kind"] == "torch" else {**node, "torch_dtype": node["dtype"], "device": "cpu"}
            _torch_arrays.copy_into(template, _torch_arrays.from_numpy(host, meta, template))
        return None if host is None else template

    @staticmethod
    def _module_state(template: Any, node: dict[str, Any]) -> Any:
        own = _torch_arrays.module_state(template, [k for k, _ in node["items"]] if node["t"] == "dict" else None)
        return _NO_TEMPLATE if own is None else own  # no template: load_state_dict says what differs

    def _array_matches(self, node: dict[str, Any], template: Any, path: str) -> bool:
        kind = template_kind(template)
        if kind is None:
            self.differ(path, f"saved an array {node['dtype']}{node['shape']}, template has {type(template).__name__}")
            return False
        if (kind == "jax_key") != (node["kind"] == "jax_key") or (kind == "torch_generator") != (
            node["kind"] == "torch_generator"
        ):
            self.differ(path, f"saved a {node['kind']} leaf, template has a {kind} leaf")
            return False
        if kind == "torch_generator":
            return True
        saved_shape = node["shape"][:-1] if kind == "jax_key" else node["shape"]  # key data: one more dim
        shape, dtype = list(getattr(template, "shape", ())), template_dtype_name(template)
        saved_dtype = node.get("torch_dtype", node["dtype"])
        if shape != saved_shape or (kind != "jax_key" and dtype != saved_dtype):
            self.differ(path, f"saved {saved_dtype}{saved_shape}, template has {dtype}{shape}")
            return False
        sharding = getattr(template, "sharding", None) if kind in ("jax", "jax_key") else None
        if sharding is not None:
            try:
                sharding.shard_shape(tuple(shape))
            except Exception as error:  # jax raises ValueError / TypeError for shapes a mesh cannot split
                self.differ(path, f"the template's sharding {sharding} cannot hold shape {shape} ({error})")
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
        state = self.decode(inner, self._module_state(template, inner), path)

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
        if self.planning:
            return None
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
        if self.planning:
            return None
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


def plan(
    spec: dict[str, Any], template: Any, *, local_specs: list[Any] | None, step: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks the template against the spec without reading data; returns where each JAX array
    (key -> template sharding or None) and each DTensor (key -> template tensor) goes."""
    decoder = _Decoder(step, local_specs=local_specs, planning=True)
    decoder.decode(spec, template, "state")
    report_problems(step, decoder.corrupt, decoder.mismatches)
    return decoder.jax_targets, decoder.dtensor_targets


def decode(
    spec: dict[str, Any],
    template: Any = _NO_TEMPLATE,
    *,
    host: HostReader,
    jax_arrays: Mapping[str, Any] | None = None,
    dtensors: Mapping[str, Any] | None = None,
    local_specs: list[Any] | None = None,
    step: int | None = None,
) -> Any:
    """Rebuilds the state; raises CorruptCheckpointError or TemplateMismatchError listing all problems."""
    decoder = _Decoder(step, host=host, jax_arrays=jax_arrays, dtensors=dtensors, local_specs=local_specs)
    result = decoder.decode(spec, template, "state")
    report_problems(step, decoder.corrupt, decoder.mismatches)
    for load in decoder.in_place:
        load()
    return result
