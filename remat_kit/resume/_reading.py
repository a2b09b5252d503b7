"""Read one committed step: JAX arrays through Orbax into the template's shardings, DTensors
through torch.distributed.checkpoint into the template's tensors, host arrays from files.

Every stage that can fail on one process but not another (a truncated shard file is read by
the process that needs it) ends in an agreement: each process reports its error, and if any
failed, all raise the same error. The collectives that follow (Orbax's, the fingerprints
exchange, DCP's) are therefore entered by all processes or by none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from remat_kit.resume import _decode, _host_item, _inspect
from remat_kit.resume._errors import CorruptCheckpointError, ResumeError, TemplateMismatchError
from remat_kit.resume._processes import Processes, detect

_ERRORS = {
    "CorruptCheckpointError": CorruptCheckpointError,
    "TemplateMismatchError": TemplateMismatchError,
    "ResumeError": ResumeError,
}


def _agree(processes: Processes, step: int, stage: Callable[[], Any], share: Callable[[Any], Any] | None = None) -> Any:
    """Runs `stage` here; if it failed on any process, raises that error on every process.

    With `share`, the same round trip also exchanges `share(result)` (JSON-able, computed here
    after the stage): returns `(result, [every process's value, in process order])`."""
    failure = payload = None
    try:
        result = stage()
        if share is not None:
            payload = share(result)
    except (CorruptCheckpointError, TemplateMismatchError, ResumeError) as error:
        if processes.kind == "single":
            raise
        result = None
        kind = type(error).__name__ if type(error).__name__ in _ERRORS else "ResumeError"
        failure = [kind, error.reason if isinstance(error, CorruptCheckpointError) else str(error)]
    exchanged = processes.gather([failure, payload], f"restore of step {step}")
    for index, (failed, _) in enumerate(exchanged):
        if failed is not None:
            kind, message = failed
            if kind == "CorruptCheckpointError":
                raise CorruptCheckpointError(step, f"on process {index}: {message}")
            raise _ERRORS[kind](message if index == processes.index else f"on process {index}: {message}")
    return result if share is None else (result, [value for _, value in exchanged])


def _default_sharding() -> Any:
    """Where a JAX array goes without a template: the first device, or every device (replicated)
    when the job spans processes (no single device is addressable by all of them)."""
    import jax

    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec()
    )


def _restore_jax(step_dir: Path, meta: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    import jax

    from remat_kit.resume._codec import jax_nodes, np_dtype

    nodes = {node["key"]: node for node in jax_nodes(meta["spec"])}
    abstract = {}
    for key, sharding in targets.items():
        node = nodes[key]
        dtype = np_dtype(node["dtype"])
        abstract[key] = jax.ShapeDtypeStruct(tuple(node["shape"]), dtype, sharding=sharding or _default_sharding())
    if not abstract:
        return {}
    # Orbax's handler, not a Checkpointer: a Checkpointer's restore ends in a barrier over every
    # process (a device collective), and the layer's agreement right after the read is one.
    handler = ocp.StandardCheckpointHandler()
    try:
        return dict(handler.restore(step_dir / _inspect.ARRAYS_ITEM, args=ocp.args.StandardRestore(abstract)))
    finally:
        handler.close()


def _fingerprint_kind(meta: dict[str, Any]) -> str:
    from remat_kit.resume._fingerprint import SUM

    return meta.get("fingerprint") or SUM  # steps saved before CRC32C carry no kind


def _saved_fingerprints(step_dir: Path, meta: dict[str, Any]) -> dict[str, int]:
    """The JAX arrays' fingerprints: the parts each saving process stored, combined."""
    if not meta.get("num_jax_arrays"):
        return {}
    from remat_kit.resume._fingerprint import combine

    try:
        parts = []
        for index in range(meta.get("fingerprint_parts", 1)):
            path = step_dir / _host_item.HOST_ITEM / _host_item.fingerprints_file(index)
            parts.append({key: int(value) for key, value in json.loads(path.read_text()).items()})
        keys = sorted(set().union(*parts))
        total = combine([[values.get(key, 0) for key in keys] for values in parts], _fingerprint_kind(meta))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise CorruptCheckpointError(meta["step"], f"the JAX arrays' fingerprints are unreadable ({error})") from error
    return dict(zip(keys, total))


def _local_parts(arrays: dict[str, Any], kind: str) -> list[int] | None:
    """This process's parts of the restored arrays' fingerprints, or None when computing them
    is a device computation (a collective: it waits until every process's read succeeded)."""
    if not arrays:
        return []
    from remat_kit.resume._fingerprint import all_on_host, local_parts

    values = [arrays[k] for k in sorted(arrays)]
    return local_parts(values, kind) if all_on_host(values, kind) else None


def _restored_fingerprints(
    arrays: dict[str, Any], processes: Processes, parts: list[list[int] | None], kind: str
) -> dict[str, int]:
    """The fingerprints of the restored arrays from every process's `_local_parts`; those not
    computed yet are computed here, a collective in a multi-process JAX job (every process adds
    the shards it holds)."""
    keys = sorted(arrays)
    if not keys:
        return {}
    from remat_kit.resume._fingerprint import combine, fingerprints

    if all(value is not None for value in parts):
        return dict(zip(keys, combine(parts, kind)))
    gather = None
    if processes.kind == "jax":
        gather = lambda parts: processes.gather(parts, "the restored arrays' fingerprints")  # noqa: E731
    return dict(zip(keys, fingerprints([arrays[k] for k in keys], gather, kind)))


def _check_fingerprints(meta: dict[str, Any], got: dict[str, int], saved: dict[str, int]) -> None:
    bad = [key for key in sorted(got) if got[key] != saved.get(key)]
    if bad:
        raise CorruptCheckpointError(
            meta["step"],
            f"the fingerprint of JAX array(s) {bad[:5]} restored from "
            f"{_inspect.ARRAYS_ITEM}/ does not match the one saved",
        )


def _load_dtensors(step_dir: Path, targets: dict[str, Any], group: Any) -> dict[str, Any]:
    if not targets:
        return {}
    import torch.distributed.checkpoint as dcp

    # Into the template's own tensors, as dcp.load does: no second copy of the sharded state.
    loaded = dict(targets)
    dcp.load(loaded, checkpoint_id=str(step_dir / _host_item.HOST_ITEM / _host_item.DCP_DIR), process_group=group)
    return loaded


def _local_specs(step_dir: Path, meta: dict[str, Any], processes: Processes) -> list[Any] | None:
    if not meta.get("per_process"):
        return None
    saved = meta.get("num_processes", 1)
    if processes.index >= saved:
        raise TemplateMismatchError(
            f"step {meta['step']} was saved by {saved} process(es); process {processes.index} has no "
            "PerProcess part to restore. Resume with at most as many processes, or move that part out of PerProcess."
        )
    try:
        return _host_item.read_local_spec(step_dir / _host_item.HOST_ITEM, processes.index)
    except (OSError, ValueError, KeyError) as error:
        raise CorruptCheckpointError(
            meta["step"], f"process {processes.index}'s PerProcess spec is unreadable ({error})"
        ) from error


def read_step(
    step_dir: Path, step: int, template: Any = _decode._NO_TEMPLATE, processes: Processes | None = None
) -> Any:
    """Reads one committed step directory; raises CorruptCheckpointError naming what is wrong
    (on every process, when any process found it)."""
    processes = processes or detect()
    # Each agreement is a round trip between the processes: stages that read small files are
    # run as one, and the checks whose inputs every process already shares need none.
    meta, local_specs, (jax_targets, dtensor_targets) = _agree(
        processes, step, lambda: _prepare(step_dir, step, template, processes)
    )
    if meta.get("format") == _inspect.FORMAT_V1:
        return _agree(processes, step, lambda: _read_v1(step_dir, step, meta, template))

    def orbax_read() -> tuple[dict[str, Any], dict[str, int]]:
        saved = _saved_fingerprints(step_dir, meta)
        try:
            return _restore_jax(step_dir, meta, jax_targets), saved
        except Exception as error:  # tensorstore/Orbax errors on truncated or missing data
            raise CorruptCheckpointError(step, f"Orbax could not read the arrays ({_first_line(error)})") from error

    # The agreement on the read also carries each process's part of the restored arrays'
    # fingerprints (summed from CPU shards, no collective), so they cost no round trip of their own.
    kind = _fingerprint_kind(meta)
    (jax_arrays, saved), parts = _agree(processes, step, orbax_read, share=lambda read: _local_parts(read[0], kind))
    if processes.kind == "torch":  # each rank restores its own JAX world: its own parts only
        parts = [parts[processes.index]]
    # Every process holds the same gathered fingerprints and the same saved ones, so each
    # reaches the same verdict without another agreement.
    _check_fingerprints(meta, _restored_fingerprints(jax_arrays, processes, parts, kind), saved)

    def dcp_read() -> dict[str, Any]:
        try:
            return _load_dtensors(step_dir, dtensor_targets, processes.group)
        except Exception as error:  # DCP raises CheckpointException / OSError on torn or missing files
            raise CorruptCheckpointError(
                step, f"torch.distributed.checkpoint could not read the DTensors ({_first_line(error)})"
            ) from error

    # Whether there are DTensors comes from the step's own metadata, the same on every process.
    dtensors = _agree(processes, step, dcp_read) if meta.get("dtensors") or dtensor_targets else {}
    host_dir = step_dir / _host_item.HOST_ITEM

    def host(key: str, dtype: np.dtype, shape: list, local: bool, out: np.ndarray | None = None) -> np.ndarray:
        directory = host_dir / _host_item.process_dir(processes.index) if local else host_dir
        return _host_item.read_array(directory, key, dtype, shape, out)

    return _agree(processes, step, lambda: _decode_step(meta, template, host, jax_arrays, dtensors, local_specs))


def _prepare(
    step_dir: Path, step: int, template: Any, processes: Processes
) -> tuple[dict[str, Any], list[Any] | None, tuple[dict[str, Any], dict[str, Any]]]:
    """The step's metadata, this process's PerProcess specs and the JAX / DTensor targets."""
    meta = _read_meta(step_dir, step)
    if meta.get("format") == _inspect.FORMAT_V1:
        return meta, None, ({}, {})
    local_specs = _local_specs(step_dir, meta, processes)
    return meta, local_specs, _decode.plan(meta["spec"], template, local_specs=local_specs, step=step)


def _decode_step(
    meta: dict[str, Any],
    template: Any,
    host: Any,
    jax_arrays: dict[str, Any],
    dtensors: dict[str, Any],
    local_specs: list[Any] | None,
) -> Any:
    try:
        return _decode.decode(
            meta["spec"],
            template,
            host=host,
            jax_arrays=jax_arrays,
            dtensors=dtensors,
            local_specs=local_specs,
            step=meta["step"],
        )
    except (KeyError, IndexError, TypeError, AttributeError) as error:  # valid JSON, wrong content
        raise CorruptCheckpointError(
            meta["step"], f"{_inspect.META_ITEM}/metadata holds a malformed spec ({error!r})"
        ) from error


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def _read_meta(step_dir: Path, step: int) -> dict[str, Any]:
    foreign = _inspect.foreign_reason(step_dir)
    if foreign:
        raise ResumeError(
            f"step {step} in {step_dir.parent} is {foreign}; it is left untouched. Use a new "
            "directory for remat_kit.resume, or read it with orbax.checkpoint directly."
        )
    reason = _inspect.quick_check(step_dir)
    if reason:
        raise CorruptCheckpointError(step, reason)
    return _inspect.read_meta(step_dir)


def _read_v1(step_dir: Path, step: int, meta: dict[str, Any], template: Any) -> Any:
    """Steps written before JAX arrays went to Orbax as they are: every array is a host array
    in one PyTree item under keys a0, a1, ..."""
    arrays: dict[str, Any] = {}
    if meta["num_arrays"]:
        keys = [f"a{i}" for i in range(meta["num_arrays"])]
        restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in keys}
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                arrays = checkpointer.restore(
                    step_dir / _inspect.ARRAYS_ITEM, args=ocp.args.PyTreeRestore(restore_args=restore_args)
                )
        except Exception as error:
            raise CorruptCheckpointError(step, f"Orbax could not read the arrays ({_first_line(error)})") from error

    def host(key: str, dtype: np.dtype, shape: list, local: bool, out: np.ndarray | None = None) -> np.ndarray:
        array = np.asarray(arrays[key])
        if array.dtype != dtype or list(array.shape) != list(shape):
            raise ValueError(f"stored {array.dtype}{list(array.shape)}, spec says {dtype}{list(shape)}")
        if out is not None:
            out[...] = array
            return out
        return array

    return _decode_step(meta, template, host, {}, {}, None)
