"""Profile one forward of an nn.Module under a TorchDispatchMode: the entry of the torch trace.

`profile` runs the forward once under the dispatch recorder (`_trace_recorder`), reads back what
each op's backward keeps and allocates (`_trace_backward`) and returns a `Profile`
(`_trace_ops`), from which `_graph` builds the CostGraph. The rest of the adapter imports the
trace's names from here.

By default the forward runs under FakeTensorMode: shapes only, no compute and no activation
memory, so a model too large for this machine can still be planned (parameters may be real or on
the meta device).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat_kit._core.graph import Role, Value
from remat_kit._torch._trace_backward import backward_workspace, finish
from remat_kit._torch._trace_ops import AUTOCAST_TAG, OpRecord, Profile, ignored, storage_key
from remat_kit._torch._trace_recorder import Recorder, module_hooks, reachable_tensors, register_state, state_values
from remat_kit._torch._trace_user import user_tools_paused

__all__ = [
    "AUTOCAST_TAG",
    "OpRecord",
    "Profile",
    "ignored",
    "profile",
    "state_values",
    "user_tools_paused",
]


class FakeFromFirstLayer:
    """Enters FakeTensorMode below the recorder when the first layer's forward starts.

    The code before the layers (embeddings, attention masks, position tables) then runs on real
    tensors, so the checks it makes on values (Hugging Face skips the causal mask when the
    padding mask is all ones, and builds one when it sees a fake tensor) take the path the real
    step takes; the layers and what follows them run on fake tensors, so their activations cost
    nothing. The prologue's activations are real memory: small next to the layers'.
    """

    def __init__(self, rec: Recorder, fake_mode: Any):
        self.rec, self.fake_mode, self.switched = rec, fake_mode, False

    def __call__(self) -> None:
        if self.switched:
            return
        self.switched = True
        self.rec.__exit__(None, None, None)  # the recorder stays on top: it sees each op first
        self.fake_mode.__enter__()
        self.rec.__enter__()

    def close(self) -> None:
        """Leave FakeTensorMode (once, after the recorder has left) if the first layer entered it."""
        if self.switched:
            self.fake_mode.__exit__(None, None, None)


def profile(
    root: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    fake: bool = True,
    call: Any = None,
    layers: list[str] | None = None,
    real_prologue: bool = False,
    measure_backward: bool = True,
) -> Profile:
    """Run `root(*args, **kwargs)` once under the recorder and return its ops and values.

    Needs grad mode on (what `auto` plans is a training step). With `fake=True` the run is under
    FakeTensorMode: real parameters are read for their shapes only; with `real_prologue` too,
    the code before the first of `layers` runs on real tensors (see FakeFromFirstLayer), and
    where it cannot (parameters on the meta device, say) the whole forward runs fake. The user's
    dispatch modes and global module hooks do not see it (`user_tools_paused`). With
    `measure_backward` the backward runs once too, for its workspace (`backward_workspace`).
    """
    with user_tools_paused():
        if fake and real_prologue and layers and not any(p.is_meta for p in root.parameters()):
            try:
                return _profile_once(
                    root,
                    args,
                    kwargs,
                    fake=True,
                    call=call,
                    layers=layers,
                    real_prologue=True,
                    measure_backward=measure_backward,
                )
            except Exception:  # noqa: BLE001 - a prologue that reads values it cannot have: run it all fake
                pass
        return _profile_once(
            root,
            args,
            kwargs,
            fake=fake,
            call=call,
            layers=layers,
            real_prologue=False,
            measure_backward=measure_backward,
        )


def _profile_once(
    root: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    fake: bool,
    call: Any,
    layers: list[str] | None,
    real_prologue: bool,
    measure_backward: bool,
) -> Profile:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    rec = Recorder()
    register_state(rec, root)
    calls: dict[str, int] = {}
    late = FakeFromFirstLayer(rec, fake_mode) if real_prologue else None
    early = fake_mode if late is None else None
    # The RNG ops that run for real (a real prologue's dropout, say) must not move the generators
    # the training step draws from.
    cuda = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        with early if early is not None else contextlib.nullcontext():
            fargs, fkwargs = _inputs_registered(rec, args, kwargs, early)
            try:
                with module_hooks(root, rec, calls, layers or [], on_layer=late), rec:
                    out = (call or root)(*fargs, **fkwargs)
            finally:
                if late is not None:
                    late.close()
                for g, st in rec.generators.values():
                    g.set_state(st)
            refuse_own_saved_tensor_hooks(root, rec)
            values = _values_of_run(rec, root, out, measure_backward)
            del out
    # Autocast caches parameter casts per region; the ones made here are fake tensors.
    torch.clear_autocast_cache()
    return Profile(
        ops=rec.ops,
        values=values,
        value_op=rec.value_op,
        mutated_later=rec.mutated_later,
        module_calls=calls,
        returned=rec.returned,
        fake=fake and (late is None or late.switched),  # never switched: it all ran for real
        real_prologue=late is not None and late.switched,
    )


class OwnCheckpointingError(ValueError):
    """The model checkpoints or offloads activations itself (see `refuse_own_saved_tensor_hooks`)."""


def refuse_own_saved_tensor_hooks(root: torch.nn.Module, rec: Recorder) -> None:
    """Raise when the forward changed what autograd saves by itself: a checkpoint or offload inside
    the model discards or moves activations the plan would count as kept, so no plan of it is
    priced right (Hugging Face's own `gradient_checkpointing_enable()` is caught earlier, by name)."""
    if rec.hooked_modules:
        where = ", ".join(f"`{m}`" if m else "the root's own code" for m in list(rec.hooked_modules)[:3])
        raise OwnCheckpointingError(
            f"remat_kit.auto: {type(root).__name__}'s forward ran ops of {where} under saved-tensor hooks it "
            "installed itself (torch.utils.checkpoint, torch.autograd.graph.save_on_cpu or saved_tensors_hooks "
            "inside the model). They change what the step keeps for backward, and remat_kit plans exactly that: "
            "remove the checkpoint or offload calls from the model (or its option that turns them on), or leave "
            "remat_kit.auto out."
        )


def _inputs_registered(rec: Recorder, args: tuple, kwargs: dict, fake_mode: Any | None) -> tuple[tuple, dict]:
    """The forward's arguments (fake copies under `fake_mode`), each tensor registered as an input."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and fake_mode is not None:
            t = fake_mode.from_tensor(x)
            if x.requires_grad and not t.requires_grad:
                t.requires_grad_(True)
            return t
        return x

    flat, spec = tree_flatten((args, kwargs))
    flat = [convert(x) for x in flat]
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):
            rec.register(x, f"input{i}", Role.INPUT)
    return tree_unflatten(flat, spec)


def _values_of_run(rec: Recorder, root: torch.nn.Module, out: Any, measure_backward: bool) -> list[Value]:
    """The profile's values once the forward returned `out` (its backward run once for workspace)."""
    rec.capture_nodes()
    workspace = backward_workspace(rec, out, root) if measure_backward else {}
    returned = {rec.owner.get(storage_key(t)) for t in reachable_tensors(out)}
    return finish(rec, workspace, {n for n in returned if n is not None})
