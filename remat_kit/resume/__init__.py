"""remat_kit.resume: save and resume training state with Orbax; survive preemption and kill -9.

    from remat_kit import resume

    with resume.Resumable("ckpt", keep=3) as ckpt, resume.PreemptionHandler() as preemption:
        restored = ckpt.restore_latest(template=state)
        start = 0 if restored is None else restored[0] + 1
        ...

Needs `orbax-checkpoint` (and so jax); torch is used only when the state holds torch objects.
`python -m remat_kit.resume ls DIR` lists the steps in a checkpoint directory.
"""

try:
    import orbax.checkpoint  # noqa: F401
except ImportError as _error:  # say what to install instead of a bare ModuleNotFoundError
    raise ImportError(
        "remat_kit.resume needs orbax-checkpoint (which needs jax): pip install 'remat_kit[jax]' "
        f"or pip install orbax-checkpoint ({_error})"
    ) from _error

from remat_kit.resume._codec import PerProcess as PerProcess
from remat_kit.resume._errors import EXIT_PREEMPTED as EXIT_PREEMPTED
from remat_kit.resume._errors import AsyncSaveError as AsyncSaveError
from remat_kit.resume._errors import CollectiveError as CollectiveError
from remat_kit.resume._errors import CorruptCheckpointError as CorruptCheckpointError
from remat_kit.resume._errors import CorruptCheckpointWarning as CorruptCheckpointWarning
from remat_kit.resume._errors import ResumeError as ResumeError
from remat_kit.resume._errors import TemplateMismatchError as TemplateMismatchError
from remat_kit.resume._inspect import StepInfo as StepInfo
from remat_kit.resume._iterators import CheckpointableIterator as CheckpointableIterator
from remat_kit.resume._iterators import GlobalRNG as GlobalRNG
from remat_kit.resume._iterators import ShuffledIterator as ShuffledIterator
from remat_kit.resume._iterators import capture_rng as capture_rng
from remat_kit.resume._iterators import restore_rng as restore_rng
from remat_kit.resume._listing import list_steps as list_steps
from remat_kit.resume._manager import Resumable as Resumable
from remat_kit.resume._preempt import PreemptionHandler as PreemptionHandler

__all__ = [
    "EXIT_PREEMPTED",
    "AsyncSaveError",
    "CheckpointableIterator",
    "CollectiveError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "GlobalRNG",
    "PerProcess",
    "PreemptionHandler",
    "ResumeError",
    "Resumable",
    "ShuffledIterator",
    "StepInfo",
    "TemplateMismatchError",
    "capture_rng",
    "list_steps",
    "restore_rng",
]
