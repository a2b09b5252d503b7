"""`Resumable`: save and resume a training state with Orbax doing storage, commit and async I/O.

Safety contract (Orbax's, kept): one job writes a directory; not thread-safe; multi-process
safe: in a multi-process JAX job or a torch.distributed job every process calls `save` and
`restore*` with the same steps, and they commit and decide together (see `_processes`). A save
is visible only once committed (Orbax writes a temporary directory and renames it). On top:

* the newest *sealed* step (committed, its files recorded, verified when `verify=True`) is
  never deleted by retention, so a new save cannot remove the last good checkpoint first;
* `restore_latest` checks each step (manifest, then a full read with CRC32 per array) and falls
  back to the newest good one, moving corrupt steps to `DIR/.corrupt/` with a warning;
* an async save that failed raises `AsyncSaveError` at the next call (save, restore, wait,
  close), never only in a log.
"""

from __future__ import annotations

import datetime
import logging
import math
import operator
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from remat_kit.resume import _checks, _decode, _inspect, _processes, _writing
from remat_kit.resume._errors import (
    AsyncSaveError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    ResumeError,
)
from remat_kit.resume._reading import read_step
from remat_kit.resume._retention import StepRecord, preservation_policy

log = logging.getLogger("remat_kit.resume")


class Resumable:
    """Saves numbered steps of a training state under `directory` and resumes from the newest good one.

    Args:
      directory: where step subdirectories go; created if missing.
      keep: how many of the newest steps to keep (older ones are deleted after a newer save commits).
      keep_best: `(metric, "min" | "max")`: also never delete the step with the best value of
        `metrics[metric]` passed to `save`.
      save_every: `save(step, ...)` writes only when `step % save_every == 0` (or `force=True`).
      async_save: write in a background thread; `save` returns once host arrays are copied and
        Orbax has started its device-to-host copy of the JAX arrays. None (the default): async,
        except under torch.distributed, where it is opt-in as `dcp.async_save` is: there
        `async_save=True` makes rank 0 copy the host state and write it while training goes on;
        the other ranks learn of the commit at their next save, `wait()` or `close()`.
      verify: after each save, wait for it, read it back and compare every array's checksum.
      processes: "auto" (torch.distributed if initialized with > 1 rank, else multi-process JAX
        if `jax.process_count() > 1`, else one process), or "single", "jax", "torch".
      collective_timeout: seconds a process waits for the others at a save's or restore's meeting
        points (under torch.distributed also rank 0's whole write: the other ranks wait for its
        commit; under multi-process JAX also Orbax's background write and commit). Past it, or as soon as a peer is seen gone, `CollectiveError` is raised naming
        the process and the step, so a job whose rank died ends instead of hanging.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 3,
        keep_best: tuple[str, str] | None = None,
        save_every: int | None = None,
        async_save: bool | None = None,
        verify: bool = False,
        processes: str = "auto",
        collective_timeout: float = _processes.DEFAULT_TIMEOUT_S,
    ) -> None:
        self.directory = _checks.check_directory(directory)
        self.keep = _checks.positive_int("keep", keep, allow_none=False)
        self.keep_best = _checks.check_keep_best(keep_best)
        self.save_every = _checks.positive_int("save_every", save_every, allow_none=True)
        self.verify = bool(verify)
        self.processes = _processes.detect(processes, collective_timeout)
        self.async_save = self.processes.kind != "torch" if async_save is None else bool(async_save)
        if self.processes.is_primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            _, torn = _inspect.step_dirs(self.directory)
            for step, paths in sorted(torn.items()):
                log.warning(
                    "found an incomplete save of step %d (interrupted before commit); removing %s",
                    step,
                    ", ".join(p.name for p in paths),
                )
            _inspect.empty_trash(self.directory)
            _writing.clear_staging(self.directory)
        self.processes.barrier("Resumable() start")
        self._trash = _inspect.TrashEmptier(self.directory)
        self._policy = preservation_policy(self.directory, self.keep, self.keep_best)
        self._manager = self._new_manager() if self.processes.runs_orbax else None
        self._unsealed: list[int] = []
        self._closed = False
        # Interpreter exit would otherwise drop a save still in flight.
        self._atexit = weakref.finalize(self, Resumable._wait_at_exit, weakref.ref(self))

    def _new_manager(self) -> ocp.CheckpointManager:
        from remat_kit.resume._host_item import HostHandler

        metric = self.keep_best[0] if self.keep_best else None
        # Multi-process JAX: Orbax's background wait for every process's write and commit (its
        # barriers through JAX's coordination service) ends after AsyncOptions.timeout_secs, 20 min
        # by default: that is the save's last meeting point, so it gets the layer's timeout.
        async_options = None
        if self.processes.kind == "jax":
            async_options = ocp.AsyncOptions(timeout_secs=math.ceil(self.processes.timeout_s))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.async_save,
            async_options=async_options,
            cleanup_tmp_directories=True,
            # Deleting = one rename into the trash, then rmtree: a kill mid-delete never leaves a
            # half-deleted step that looks like a checkpoint.
            todelete_subdir=_inspect.TRASH_DIR,
            # best_fn makes Orbax store metrics with each step; retention is ours (see _retention).
            best_fn=(lambda m: m[metric]) if metric else None,
            best_mode=self.keep_best[1] if self.keep_best else "max",
            preservation_policy=self._policy,
        )
        return ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _inspect.ARRAYS_ITEM: ocp.StandardCheckpointHandler(),
                _inspect.META_ITEM: ocp.JsonCheckpointHandler(),
                _inspect.HOST_ITEM: HostHandler(),
            },
        )

    # -- queries ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (a step being written asynchronously is included);
        process 0's view, the same on every process."""
        steps = sorted(self._manager.all_steps()) if self._manager is not None else []
        return steps if self.processes.kind == "single" else self.processes.broadcast(steps, "the list of saved steps")

    def latest_step(self) -> int | None:
        """The newest committed step, or None. `restore_latest` may fall back from a corrupt one."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best `keep_best` metric among committed steps, or None."""
        self.wait()
        infos = [i for i in _inspect.scan(self.directory) if i.status == "complete"]
        return _inspect.best_step(infos, self.keep_best)

    def metadata(self, step: int) -> dict[str, Any]:
        """What was saved with `step` besides the state: metrics, metadata, versions, time."""
        self._require_step(step)
        self.wait()
        meta = _inspect.read_meta(self.directory / str(step))
        return {k: v for k, v in meta.items() if k != "spec"}

    # -- save ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` as `step`; returns False when skipped by `save_every` or already saved.

        `state` may hold JAX pytrees, numpy arrays, torch tensors, objects with `state_dict()`
        (modules, optimizers, schedulers) or `get_state()` (iterators, `GlobalRNG`), and JSON
        scalars. `metadata` must be JSON-serializable (config, notes).
        """
        self._check_open()
        step = self._check_step(step)
        metrics = _checks.check_metrics(metrics)
        metadata = _checks.check_metadata(metadata)
        if not force and self.save_every is not None and step % self.save_every:
            return False
        latest = self.latest_step()  # includes a step still being written
        if latest is not None and step <= latest:
            if step == latest:
                return False  # e.g. a preemption save right after the periodic save of the same step
            raise ValueError(
                f"step={step} is older than the latest saved step {latest} in {self.directory}; steps must "
                f"increase. To continue from step {step}, delete newer steps with delete(step) or use a new directory."
            )
        # Host copies only when the write outlives this call (async, and only where Orbax runs:
        # other torch ranks write their files before `save` returns): torch optimizers update
        # tensors in place. A synchronous save writes them before returning, so it shares them.
        sync = not self.async_save or self.verify
        encoded = _writing.encode(state, self.processes, copy_host=not sync and self.processes.runs_orbax)
        self._finish_pending()
        meta = _checks.step_meta(step, metrics, metadata, self.keep_best, _inspect.FORMAT)
        args = _writing.save_args(self.directory, step, encoded, meta, self.processes)
        if self._manager is not None:
            self._manager.save(step, args=args, metrics=_checks.orbax_metrics(metrics, self.keep_best), force=True)
        self._unsealed.append(step)
        if sync:  # torch ranks other than 0 learn of the commit through the agreement in here
            self._finish_pending()
        return True

    def wait(self) -> None:
        """Blocks until an async save is committed; raises AsyncSaveError if it failed."""
        if not self._closed:
            self._finish_pending()

    def _finish_pending(self) -> None:
        error = None
        try:
            if self._manager is not None:
                self._manager.wait_until_finished()
                self._manager.check_for_errors()
        except Exception as caught:
            error = caught
        if self.processes.kind == "torch":  # rank 0 alone commits: every rank learns how it went
            if not self.processes.all_true(error is None, f"commit of step(s) {self._unsealed}") and error is None:
                error = ResumeError("rank 0 failed to commit the step")
        if error is not None:
            failed = list(self._unsealed)
            self._unsealed.clear()
            lost = None
            if self.processes.kind == "jax" and isinstance(error, TimeoutError):
                # Orbax's commit barrier timed out, or saw a process gone: the job is broken.
                lost = self.processes.fail(f"commit of step(s) {failed}", error)
            # Orbax re-raises a failed finalize at every later call; a fresh manager reports the
            # failure once and lets the caller decide (retry, or stop), with earlier steps intact.
            # A job that lost a process gets none: creating one is a barrier Orbax would wait at,
            # and every later call fails at its first collective anyway.
            if self._manager is not None:
                try:
                    self._manager.close()
                except Exception:
                    pass
                self._manager = self._new_manager() if lost is None else None
            if lost is not None:
                raise lost from error
            raise AsyncSaveError(f"saving step(s) {failed} to {self.directory} failed: {error!r}") from error
        if self.processes.is_primary:
            self._trash.empty()
        while self._unsealed:
            step = self._unsealed.pop(0)
            step_dir = self.directory / str(step)
            if self.verify:
                self._verify(step)
            if self.processes.is_primary and step_dir.is_dir():
                _inspect.seal(step_dir)
            self.processes.barrier(f"seal of step {step}")
            self._apply_retention()

    def _apply_retention(self) -> None:
        # Orbax applies the policy when a save starts, before the new step is sealed, so the
        # previous good step survives that round (as it must); drop it once the new one is sealed.
        if self._manager is None:
            return
        steps = sorted(self._manager.all_steps())
        infos = [
            StepRecord(
                step=s,
                time=datetime.datetime.now(datetime.UTC),
                metrics=self._manager.metrics(s) if self.keep_best else None,
            )
            for s in steps
        ]
        preserve = self._policy.should_preserve(infos, context=checkpoint_managers.PreservationContext())
        for step, keep in zip(steps, preserve):
            if not keep:
                self._manager.delete(step)
        if self.processes.is_primary:
            self._trash.empty()

    def _verify(self, step: int) -> None:
        try:
            self._read(step, _decode._NO_TEMPLATE)
        except CorruptCheckpointError as error:
            raise ResumeError(f"verify=True: step {step} did not read back identical: {error.reason}") from error

    # -- restore ---------------------------------------------------------------------------

    def restore(self, step: int, template: Any = None) -> Any:
        """The state saved at `step`, shaped like `template` (objects in it are loaded in place)."""
        self._check_open()
        step = self._check_step(step)
        self._finish_pending()
        self._require_step(step)
        return self._read(step, _decode._NO_TEMPLATE if template is None else template)

    def restore_latest(self, template: Any = None) -> tuple[int, Any] | None:
        """`(step, state)` of the newest good checkpoint, or None when there is nothing to resume.

        Corrupt steps (torn, truncated, deleted files, CRC32 mismatch) are skipped with a
        CorruptCheckpointWarning and moved to DIR/.corrupt/, so saving can continue past them.
        """
        self._check_open()
        self._finish_pending()
        for step in reversed(self.all_steps()):
            try:
                return step, self._read(step, _decode._NO_TEMPLATE if template is None else template)
            except CorruptCheckpointError as error:
                # Moved aside, not left in place: Orbax would refuse new saves at steps <= it.
                moved = _inspect.quarantine(self.directory / str(step)) if self.processes.is_primary else None
                self.processes.barrier(f"setting corrupt step {step} aside")
                if self._manager is not None:
                    self._manager.reload()
                where = (
                    (f"Moved it to {moved}" if moved else "It is gone from disk")
                    if self.processes.is_primary
                    else "Process 0 moved it aside"
                )
                warnings.warn(
                    f"{error} {where}; falling back to an older step.", CorruptCheckpointWarning, stacklevel=2
                )
        return None

    def _read(self, step: int, template: Any) -> Any:
        return read_step(self.directory / str(step), step, template, self.processes)

    # -- housekeeping ----------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Deletes a saved step."""
        self._check_open()
        step = self._check_step(step)
        self._finish_pending()
        self._require_step(step)
        if self._manager is not None:
            self._manager.delete(step)
        self.processes.barrier(f"delete of step {step}")

    def close(self) -> None:
        """Waits for a pending save (raising its error), releases Orbax's threads and, under
        torch.distributed, destroys the layer's own gloo group."""
        if self._closed:
            return
        try:
            self._finish_pending()
        finally:
            self._closed = True
            self._atexit.detach()
            try:
                if self._manager is not None:
                    self._manager.close()
                self._trash.join()
            finally:
                self.processes.close()

    def __enter__(self) -> Resumable:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the body already failed: still commit what is in flight, report without masking
            self.close()
        except Exception:
            log.exception("while closing %s after an error", self.directory)

    def __repr__(self) -> str:
        return (
            f"Resumable({str(self.directory)!r}, keep={self.keep}, keep_best={self.keep_best}, "
            f"save_every={self.save_every}, async_save={self.async_save}, verify={self.verify}, "
            f"processes={self.processes.kind!r})"
        )

    @staticmethod
    def _wait_at_exit(ref: weakref.ref) -> None:
        self = ref()
        if self is not None and not self._closed:
            try:
                self.close()
            except Exception:
                log.exception("the last async save to %s failed at interpreter exit", self.directory)

    def _check_open(self) -> None:
        if self._closed:
            raise ResumeError(f"{self!r} is closed; create a new Resumable to save or restore.")

    @staticmethod
    def _check_step(step: Any) -> int:
        try:
            value = operator.index(step)
        except TypeError:
            value = None
        if value is None or isinstance(step, bool) or value < 0:
            raise ValueError(f"step={step!r} is not allowed; pass an int >= 0 (e.g. the training step).")
        return value

    def _require_step(self, step: int) -> None:
        steps = self.all_steps()
        if step not in steps:
            raise ValueError(
                f"step={step} does not exist in {self.directory}; saved steps: {steps or 'none'}. "
                "Use latest_step() or all_steps() to pick one."
            )
