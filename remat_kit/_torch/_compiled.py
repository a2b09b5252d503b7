"""Run a planned region under torch.compile: the plan as a selective-checkpoint policy.

Eagerly a region runs through the op-indexed replay modes (_replay.py), which dynamo cannot
trace. Under compile the same plan is handed to torch's selective activation checkpoint
(`checkpoint(use_reentrant=False, context_fn=create_selective_checkpoint_contexts(policy))`),
which dynamo traces into one `tag_activation_checkpoint` region and AOTAutograd's partitioner
honours: an op tagged `MUST_SAVE` is saved, one tagged `MUST_RECOMPUTE` is recomputed
(`PREFER_*` tags it may override, so none are used).

The policy sees the ops AOTAutograd traces, not the ones the eager profile saw: under the
python dispatcher `dropout` is one `native_dropout` where eagerly it is `empty_like`,
`bernoulli_`, `div_`, `mul`; `_unsafe_view` is `view`. So the first trace of a region
(AOTAutograd's metadata pass on fake tensors, whose tags nothing reads) records the op names the
policy sees, and they are aligned with the region's eager steps by longest common subsequence
(`difflib`, no junk heuristic). Matched ops take their step's decision: kept whole -> MUST_SAVE,
anything else -> MUST_RECOMPUTE (the partitioner then recomputes it from kept values or the
region's inputs, so nothing the plan did not keep is saved). A run of ops that differ takes one
decision: its last op MUST_SAVE when the eager plan keeps everything the run's backward reads,
MUST_RECOMPUTE when it keeps nothing, or when it keeps only RNG draws (a dropout mask) of a run
that draws random numbers: the partitioner recomputes a random op from the generator state it
saves (a seed under Inductor, the generator state under aot_eager), so the draws are those of no
remat (tests/test_torch_compile.py). Eager ops with no traced op at all are outside the compiled
region (constants dynamo folds or computes before it) and need no tag. Any other case (an offloaded value, a kept value with no
traced counterpart, a later trace whose op sequence differs from the first) is a region the
mapping cannot express: it runs on the eager path as a graph break from the next call on, with a
warning naming the layer (the call being traced recomputes every op of the region: within
budget, exact). A region over several layers (a plan segment, below per-layer checkpointing)
is entered and left in separate layer calls and stays on the eager path (_replay.SegmentRun).

The plan is made from the eager profile. The frames holding planned regions compile under
`region_settings`, which keep each region's recompute to itself and free each buffer at its last
read, so the compiled step holds what the plan holds; its activation peak is read from Inductor's
generated code in tests/test_torch_compile_budget.py and reports/torch/compile_budget.md
(benchmarks/inductor_memory.py).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import warnings
import weakref
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

SAVE, RECOMPUTE = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.MUST_RECOMPUTE
_RANDOM_WORDS = ("dropout", "bernoulli", "rand", "normal", "multinomial")

# Every planned region on the eager path (graph breaks), as before issue 12: for benchmarks.
FORCE_EAGER = os.environ.get("REMAT_KIT_COMPILE_EAGER") == "1"
# id(region) -> reason the region runs eagerly. Read by traced code: dynamo guards on it, so a
# region found unmappable while tracing is recompiled onto the eager path at the next call.
EAGER_REGIONS: dict[int, str] = {}
_POLICIES: dict[int, RegionPolicy] = {}  # by id(region); dropped when the region is
_PENDING: dict[int, str] = {}


def _move_pending(_args: Any = None) -> None:
    EAGER_REGIONS.update(_PENDING)
    _PENDING.clear()


def _is_random(name: str) -> bool:
    return any(w in name for w in _RANDOM_WORDS)


def _base(name: str) -> str:
    """`aten._unsafe_view.default` and `aten.view.default` are one op for alignment."""
    op = name.split(".")[1] if name.count(".") >= 2 else name
    return op.removeprefix("_unsafe_").rstrip("_")


def _step_policy(step: Any) -> CheckpointPolicy | None:
    """The tag of an op matched one to one with `step`; None: the plan cannot be expressed."""
    if step.action != "cache":
        return RECOMPUTE
    if step.offload:
        return None  # compiled code has no host copy to hand back
    num_tensors = sum(1 for leaf in step.out_leaves if isinstance(leaf, tuple) and leaf and leaf[0] == "t")
    # Saving an op saves every output its backward needs; keeping a part (layer norm's
    # statistics without its output) is expressed as recomputing the op from its input, which
    # the plan holds anyway to recompute that output.
    return SAVE if len(step.cache) == num_tensors or step.inplace else RECOMPUTE


def _run_policy(steps: list[Any], names: list[str]) -> CheckpointPolicy | None:
    """One tag for a run of compiled ops `names` standing for the eager `steps`."""
    kept = [s for s in steps if s.action == "cache"]
    if not kept:
        return RECOMPUTE
    if any(s.offload for s in kept):
        return None
    recomputed = [s for s in steps if s.action == "run" and s.out_leaves and not _is_view_name(s.func)]
    if not recomputed and steps[-1].action == "cache":
        return SAVE
    if any(_is_random(n) for n in names):
        return RECOMPUTE
    return None


def _is_view_name(func: str) -> bool:
    return _base(func) in {
        "view",
        "reshape",
        "expand",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "split",
        "unbind",
        "slice",
        "select",
        "alias",
        "as_strided",
        "detach",
        "chunk",
    }


def align(steps: tuple[Any, ...], names: list[str]) -> tuple[list[CheckpointPolicy] | None, str]:
    """Tags for the compiled op sequence `names`, from the region's eager `steps` (None, why: the
    plan cannot be expressed)."""
    eager = [_base(s.func) for s in steps]
    matcher = difflib.SequenceMatcher(None, eager, [_base(n) for n in names], autojunk=False)
    tags: list[CheckpointPolicy] = []
    for kind, i0, i1, j0, j1 in matcher.get_opcodes():
        if kind == "equal":
            for i in range(i0, i1):
                tag = _step_policy(steps[i])
                if tag is None:
                    return None, f"it offloads the output of {steps[i].func}"
                tags.append(tag)
            continue
        if kind == "delete":
            # Eager ops the traced region does not run at all (HF Llama's causal mask, tril and
            # scalar_tensor inside its first layer: dynamo computes it outside or folds it), so
            # they are no memory of the region, kept or not.
            continue
        tag = _run_policy(list(steps[i0:i1]), names[j0:j1])
        if tag is None:
            kept = [s.func for s in steps[i0:i1] if s.action == "cache"]
            return None, (
                f"the plan keeps outputs of eager ops {kept} that the compiled trace computes as "
                f"{names[j0:j1] or 'nothing'}"
            )
        # A run kept whole is kept as its last op's outputs (what the ops after it read); the
        # run's intermediates, which the eager plan never held, are recomputed from its inputs.
        tags.extend([RECOMPUTE] * (j1 - j0 - 1) + [tag] * (j1 > j0))
    return tags, ""


class RegionPolicy:
    """A region's tags under compile, made from its first traced op sequence."""

    def __init__(self, region: Any):
        # Not the region itself: an entry lives as long as its region, which a plan holds.
        self.key, self.module, self.steps = id(region), region.module, region.steps
        self.first: list[str] | None = None  # the op names of the first trace
        self.tags: list[CheckpointPolicy] | None = None
        self.current: list[str] = []

    def begin_trace(self) -> None:
        if self.first is None and self.current:
            self.first = self.current
            self.tags, why = align(self.steps, self.first)
            if self.tags is None:
                self.give_up(why)
        self.current = []

    def give_up(self, why: str) -> None:
        if self.key not in EAGER_REGIONS and self.key not in _PENDING:
            # Into EAGER_REGIONS when this compile ends: dynamo checks the guards it made on that
            # dict against the frame it compiled, and a change during the compile fails them.
            _PENDING[self.key] = why
            if _move_pending not in torch._dynamo.callback_handler.end_callbacks:
                torch._dynamo.callback_handler.register_end_callback(_move_pending)
            warnings.warn(
                f"remat_kit: layer `{self.module or 'the model'}` runs eagerly under torch.compile "
                f"(a graph break) from the next call on: {why}. Its plan is applied exactly there.",
                stacklevel=2,
            )
        self.tags = None

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        k = len(self.current)
        name = str(func)
        self.current.append(name)
        if self.first is None or self.tags is None:
            return RECOMPUTE  # the metadata trace (its tags are not read), or a region given up
        if k >= len(self.first) or _base(self.first[k]) != _base(name):
            self.give_up(f"its traced op sequence changed between traces (op #{k} is {name})")
            return RECOMPUTE
        return self.tags[k]


def policy_for(region: Any) -> RegionPolicy:
    policy = _POLICIES.get(id(region))
    if policy is None:
        policy = _POLICIES[id(region)] = RegionPolicy(region)
        # A later region may get this id: forget what was learnt about this one when it goes.
        weakref.finalize(region, _forget, id(region))
    return policy


def _forget(key: int) -> None:
    for table in (_POLICIES, EAGER_REGIONS, _PENDING):
        table.pop(key, None)


def _trace_kind() -> str:
    """ "record" while AOTAutograd records a graph, "fake" in its metadata pass, "eager" when the
    captured region runs on real tensors (backend="eager", `torch._dynamo.explain`)."""
    from torch._C import _get_dispatch_mode, _TorchDispatchModeKey

    if _get_dispatch_mode(_TorchDispatchModeKey.PROXY) is not None:
        return "record"
    return "fake" if _get_dispatch_mode(_TorchDispatchModeKey.FAKE) is not None else "eager"


class _RngStates:
    """The generator states a region's forward started from, set again for its recompute (the
    captured region runs with `preserve_rng_state=False`: torch relies on the compiler's RNG
    functionalization, which an eagerly run region does not get)."""

    def __init__(self) -> None:
        self.states: list[tuple[Any, torch.Tensor]] = []

    @staticmethod
    def _now() -> list[tuple[Any, torch.Tensor]]:
        out: list[tuple[Any, torch.Tensor]] = [(None, torch.get_rng_state())]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out += [(d, torch.cuda.get_rng_state(d)) for d in range(torch.cuda.device_count())]
        return out

    @staticmethod
    def _set(states: list[tuple[Any, torch.Tensor]]) -> None:
        for device, st in states:
            torch.set_rng_state(st) if device is None else torch.cuda.set_rng_state(st, device)

    def stash(self) -> Any:
        self.states = self._now()
        return None

    def replay(self) -> Any:
        now = self._now()
        self._set(self.states)
        return lambda: self._set(now)


class _Entered:
    """`mode` entered after `before()`; on exit, the callable `before` returned runs."""

    def __init__(self, before: Any, mode: Any):
        self.before, self.mode, self.after = before, mode, None

    def __enter__(self) -> Any:
        self.after = self.before()
        return self.mode.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self.mode.__exit__(*exc)
        finally:
            if self.after is not None:
                self.after()


@contextlib.contextmanager
def region_settings() -> Any:
    """The settings a compile of frames holding planned regions runs under, put back on exit.

    Each region's recompute is kept to itself. AOTAutograd's common-subexpression pass merged
    equal ops of different regions (the same mask or zeros built in every layer) into the first
    region's node, which `cleanup_recompute_tags` then saves because later regions read it. And
    Inductor fuses kernels that only share a read (horizontal fusion): two layers' recomputes that
    read one tensor (that merged constant, or the rotary cos/sin HF's Llama computes once for all
    layers) ran as one kernel, so both layers' recomputed activations were live at once. And
    Inductor's buffer reuse keeps a buffer past its last read until a later allocation of the same
    size takes it over, where the plan (as eager autograd) frees it: a layer's recomputed qkv
    projection stayed alive across that layer's backward peak. Each way the compiled step held more
    than the plan (tests/test_torch_compile.py, tests/test_torch_compile_budget.py). So these
    compiles partition without CSE, fuse only kernels where one reads what the other writes, and
    free each buffer after its last read (a kernel writing in place into an input it reads last
    still does); the backward is lowered in the same compile (not at the first backward, when
    these settings are gone). Gradients are unchanged: none of them changes what is computed."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    settings = (
        (functorch_config, "cse", False),
        (functorch_config, "force_non_lazy_backward_lowering", True),
        (inductor_config, "score_fusion_memory_threshold", 2**62),
        (inductor_config, "allow_buffer_reuse", False),
    )
    # Set and put back by hand, not through the configs' `patch`: this wraps every compiled call of
    # a planned model, compiling or not, and `patch` costs several times as much per call.
    before = [(config, name, getattr(config, name)) for config, name, _ in settings]
    for config, name, value in settings:
        setattr(config, name, value)
    try:
        yield
    finally:
        for config, name, value in before:
            setattr(config, name, value)


def _contexts(region: Any) -> Any:
    kind = _trace_kind()
    if kind == "eager":
        # Real tensors run the region's eager ops: the exact replay modes apply (the import is
        # here because _replay dispatches to this module).
        from remat_kit._torch._replay import _ForwardMode, _ReplayMode, _State

        state, rng = _State(region), _RngStates()
        return _Entered(rng.stash, _ForwardMode(state)), _Entered(rng.replay, _ReplayMode(state))
    policy = policy_for(region)
    policy.begin_trace()
    if kind == "record" and policy.first is None:
        policy.give_up("AOTAutograd recorded it without a trace before to align the plan with")
    return create_selective_checkpoint_contexts(policy)


def _plain_contexts() -> Any:
    """A plain region's contexts: none when compiled; run on real tensors (backend="eager"), the
    generator states its forward started from, set again for its recompute (see _RngStates)."""
    if _trace_kind() != "eager":  # torch.compile takes dispatch modes only: SAC recomputing every op
        return create_selective_checkpoint_contexts(lambda *args, **kwargs: RECOMPUTE)
    rng = _RngStates()
    return _Entered(rng.stash, contextlib.nullcontext()), _Entered(rng.replay, contextlib.nullcontext())


def run_compiled(region: Any, fn: Any, args: tuple, kwargs: dict, eager: Any) -> Any:
    """`fn(*args, **kwargs)` under torch.compile as a selective checkpoint that keeps what `region`
    keeps; `eager(region, fn, args, kwargs)` (a graph break) where the plan cannot be expressed."""
    if FORCE_EAGER or EAGER_REGIONS.get(id(region)) is not None:
        return eager(region, fn, args, kwargs)
    if getattr(region, "plain", False):  # keeps nothing inside: every op recomputed, as dynamo traces it
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_plain_contexts, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=functools.partial(_contexts, region), **kwargs)
