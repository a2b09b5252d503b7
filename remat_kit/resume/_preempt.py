"""Preemption: on SIGTERM / SIGINT / SIGUSR1, finish the current step, save, exit with 75.

Schedulers warn before they kill: SLURM sends SIGTERM (or the signal of `--signal=USR1@120`)
and SIGKILL some time later, Kubernetes sends SIGTERM and waits `terminationGracePeriodSeconds`,
cloud spot VMs give 30 s to 2 min. A signal handler that saves at once would save a
half-updated state from the middle of a step; this one only records the signal, and the
training loop calls `exit_if_requested` between steps.

In a job of several processes (torch.distributed ranks, multi-process JAX) the signal may reach
one rank only (a node's agent, a user's `kill`), or all of them at different moments within a
step. `exit_if_requested` then asks every rank whether any received one (one small all-gather
per call), so all ranks leave after the same step, save one checkpoint together and exit with
the same code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from remat_kit.resume._errors import EXIT_PREEMPTED

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class PreemptionHandler:
    """Records preemption signals so the loop can save between steps and exit with `EXIT_PREEMPTED`.

    Use as a context manager (the previous handlers come back on exit):

        with Resumable(d) as ckpt, PreemptionHandler() as preemption:
            for step in range(start, num_steps):
                state = train_step(state)
                ckpt.save(step, state)
                preemption.exit_if_requested(ckpt, step, state)

    A second signal while the save is running restores the previous handlers and re-sends
    itself, so a user pressing Ctrl-C twice, or a scheduler insisting, is not ignored. A kill at
    that point is safe: an interrupted save is never committed and never restored.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS, *, exit_code: int = EXIT_PREEMPTED) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionHandler() must be created in the main thread: Python delivers "
                "signals only there. Create it before starting worker threads."
            )
        if not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
            raise ValueError(f"exit_code={exit_code!r} must be an int in [0, 255] (a process exit status).")
        names = []
        for sig in signals:
            try:
                names.append(signal.Signals(sig).name)
            except ValueError:
                raise ValueError(f"signals contains {sig!r}, not a signal number; use e.g. signal.SIGTERM.") from None
        self.signals = tuple(signals)
        self.exit_code = exit_code
        self.received: int | None = None
        self.received_at: float | None = None
        self._signalled_here = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived."""
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._signalled_here:  # second signal: stop deferring
            self.uninstall()
            os.kill(os.getpid(), signum)
            return
        self._signalled_here = True
        if self.received is None:  # not yet learned from another process
            self.received, self.received_at = signum, time.monotonic()
        print(
            f"[remat_kit.resume] received {signal.Signals(signum).name}: will save after this step and "
            f"exit with code {self.exit_code}",
            file=sys.stderr,
            flush=True,
        )

    def exit_if_requested(
        self, checkpointer: Any, step: int, state: Any, *, metrics: Any = None, metadata: Any = None
    ) -> None:
        """If a signal arrived (here or, for a multi-process `Resumable`, on any process): save
        `state` as `step` (unless already saved), wait for the write to commit, close
        `checkpointer`, and raise SystemExit(exit_code). Otherwise return.

        Every process of a multi-process job must call it after every step (it is a collective)."""
        processes = getattr(checkpointer, "processes", None)
        if processes is not None and processes.kind != "single":
            signals = processes.gather(self.received, f"preemption check after step {step}")
            first = next((s for s in signals if s is not None), None)
            if first is None:
                # Decided on what was gathered, never on a signal that arrived here since: the other
                # processes did not see it and go on to the next step (a save here alone would wait
                # for them forever). Every process sees it after the next step.
                return
            if self.received is None:
                self.received, self.received_at = first, time.monotonic()
                print(
                    f"[remat_kit.resume] another process received {signal.Signals(first).name}: saving "
                    f"after this step with every process",
                    file=sys.stderr,
                    flush=True,
                )
        elif not self.requested:
            return
        checkpointer.save(step, state, metrics=metrics, metadata=metadata, force=True)
        checkpointer.close()
        waited = time.monotonic() - (self.received_at or time.monotonic())
        print(
            f"[remat_kit.resume] saved step {step} {waited:.1f}s after {signal.Signals(self.received).name}; "
            f"exiting with code {self.exit_code} (resubmit to resume)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(self.exit_code)

    def uninstall(self) -> None:
        """Puts the previous signal handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.uninstall()
