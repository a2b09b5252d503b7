"""Keep the user's profiling tools out of remat_kit's own profile runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# Module-level hooks that every module's call runs: torch's own tools (ModTracker under MemTracker,
# ModuleTracker under FlopCounterMode) install theirs here.
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


@contextlib.contextmanager
def user_tools_paused() -> Iterator[None]:
    """Hide the user's TorchDispatchModes and global module hooks while a profile runs.

    A profile is planning, not a step of the user's: MemTracker raises on a second call of the
    root module ("does not support memory tracking for multiple iterative calls"), FlopCounterMode
    and a user's own modes would count the profile's real ops as part of their step. Infra modes
    (FakeTensorMode, proxy, functional: a user planning on fake tensors) stay; module hooks
    registered on the modules themselves (FSDP's unshard) stay, they are part of the model.
    """
    from torch.nn.modules import module as nn_module
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode, _push_mode

    stack = _get_current_dispatch_mode_stack()
    # User modes sit above infra modes and pop first (torch/csrc/utils/torch_dispatch_mode.h).
    popped = [_pop_mode() for m in stack if not getattr(m, "is_infra_mode", lambda: False)()]
    hooks = [h for h in (getattr(nn_module, n, None) for n in _GLOBAL_HOOKS) if isinstance(h, dict)]
    saved = [dict(h) for h in hooks]
    for h in hooks:
        h.clear()
    try:
        yield
    finally:
        for h, old in zip(hooks, saved):
            added = dict(h)
            h.clear()
            h.update(old)
            h.update(added)
        for m in reversed(popped):
            _push_mode(m)
