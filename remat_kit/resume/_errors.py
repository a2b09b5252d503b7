"""Exceptions and warnings of remat_kit.resume, and the exit code a preempted job returns."""

from __future__ import annotations

# A job that saved because of SIGTERM/SIGINT/SIGUSR1 exits with this code, so its job script can
# tell "preempted, resubmit me" from success (0) and from a crash (anything else). 75 is
# EX_TEMPFAIL in sysexits.h: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75


class ResumeError(Exception):
    """Base class of the errors raised by remat_kit.resume."""


class CorruptCheckpointError(ResumeError):
    """A checkpoint on disk is torn, truncated or altered; names the step and what is wrong."""

    def __init__(self, step: int | None, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(
            f"checkpoint step {step} is corrupt: {reason}. restore_latest() skips such steps; "
            "`python -m remat_kit.resume ls DIR` shows the status of every step."
        )


class TemplateMismatchError(ResumeError, ValueError):
    """The restore template's structure, shapes or dtypes differ from what was saved."""


class AsyncSaveError(ResumeError):
    """A background (async) save failed; raised at the next call so the failure is never lost."""


class CorruptCheckpointWarning(UserWarning):
    """restore_latest() skipped a corrupt or incomplete checkpoint and fell back to an older one."""


_MAX_REPORTED = 20


def report_problems(step: int | None, corrupt: list[str], mismatches: list[str]) -> None:
    """Raises for what a restore found wrong: corruption first, then every template difference."""
    if corrupt:
        raise CorruptCheckpointError(step, "; ".join(corrupt[:_MAX_REPORTED]))
    if mismatches:
        shown = "\n  ".join(mismatches[:_MAX_REPORTED])
        more = len(mismatches) - _MAX_REPORTED
        raise TemplateMismatchError(
            f"template does not match the checkpoint saved at step {step} "
            f"({len(mismatches)} difference(s)):\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nPass a template with the structure you saved, or template=None to get the saved tree as is."
        )


class CollectiveError(ResumeError):
    """A process waited at one of the layer's collectives (a save's or restore's meeting point)
    and the others did not all arrive within `collective_timeout`, or one left the job."""

    def __init__(
        self, process: int, count: int, what: str, timeout_s: float, cause: str, waited_s: float | None = None
    ) -> None:
        self.process, self.count, self.what, self.timeout_s, self.cause = process, count, what, timeout_s, cause
        waited = f" after {waited_s:.1f} s" if waited_s is not None else ""
        super().__init__(
            f"process {process} of {count} stopped waiting at remat_kit.resume's collective '{what}'{waited}: "
            f"{cause}. Another process died or hangs (see its log), or did not arrive within "
            f"collective_timeout={timeout_s:g} s. Steps committed before are intact and a save that did not "
            "finish is never restored: end the job (exit non-zero) and resubmit it to resume. If a save "
            "legitimately takes longer, raise Resumable(..., collective_timeout=...)."
        )
