"""Profile one forward of an nn.Module under a TorchDispatchMode and build its CostGraph.

Each aten op the autograd layer dispatches (the same sequence a checkpoint region replays) is
recorded with its outputs' bytes, its FLOPs (torch.utils.flop_counter's formulas, so the count
matches FlopCounterMode exactly), RNG / view / in-place flags and the owning module. What the
op's backward reads (`bwd_reads`) is read back from the autograd nodes' saved tensors after the
forward, so the graph holds what torch really keeps for backward.

By default the forward runs under FakeTensorMode: shapes only, no compute and no activation
memory, so a model too large for this machine can still be planned (parameters may be real or on
the meta device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    from torch.utils.checkpoint import SAC_IGNORED_OPS
except ImportError:  # older torch: the two ops a checkpoint region may dispatch a varying number of times
    SAC_IGNORED_OPS = {torch.ops.aten.detach.default, torch.ops.prim.device.default}
from torch.utils.flop_counter import flop_registry

from remat_kit._core.graph import OpKind, Role, Value, value

# Ops whose tensor inputs are read for their metadata only: recomputing them needs no real input.
_SHAPE_ONLY_PREFIXES = (
    "aten.empty_like",
    "aten.zeros_like",
    "aten.ones_like",
    "aten.full_like",
    "aten.rand_like",
    "aten.randn_like",
    "aten.randint_like",
    "aten.new_",
)
_SCALAR_READS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.item")
_KINDS = (
    (
        (
            "aten.mm",
            "aten.addmm",
            "aten.bmm",
            "aten.baddbmm",
            "aten.matmul",
            "aten.convolution",
            "aten._convolution",
            "aten.linear",
            "aten.addbmm",
        ),
        OpKind.MATMUL,
    ),
    (
        (
            "aten._scaled_dot_product",
            "aten.scaled_dot_product",
            "aten._flash_attention",
            "aten._efficient_attention",
            "aten._softmax",
            "aten.softmax",
            "aten._safe_softmax",
            "aten._log_softmax",
        ),
        OpKind.ATTENTION,
    ),
    (
        (
            "aten.native_layer_norm",
            "aten.native_group_norm",
            "aten.native_batch_norm",
            "aten._fused_rms_norm",
            "aten.rsqrt",
            "aten._native_batch_norm",
        ),
        OpKind.NORM,
    ),
    (("aten.embedding",), OpKind.EMBEDDING),
    (
        (
            "aten.sum",
            "aten.mean",
            "aten.amax",
            "aten.max",
            "aten.min",
            "aten.var",
            "aten.std",
            "aten.nll_loss",
            "aten.norm",
            "aten.linalg_vector_norm",
        ),
        OpKind.REDUCTION,
    ),
)


AUTOCAST_TAG = "autocast:"  # value names of autocast's casts of parameters: "autocast:param:<path>"


def ignored(func: Any, args: tuple = ()) -> bool:
    """Ops a region may dispatch a different number of times between profile, forward and replay.

    SAC_IGNORED_OPS (detach, prim.device), and autocast's casts of parameters: autocast caches
    them inside one autocast region, so whether a forward or a replay casts depends on what ran
    before it, not on the plan. Their outputs count as constants (like the parameters).
    """
    if func in SAC_IGNORED_OPS:
        return True
    if func is torch.ops.aten._to_copy.default and args:
        x = args[0]
        return isinstance(x, torch.Tensor) and x.is_leaf and x.requires_grad
    return False


def op_kind(name: str, is_rng: bool) -> OpKind:
    if is_rng:
        return OpKind.RNG
    for prefixes, kind in _KINDS:
        if name.startswith(prefixes):
            return kind
    return OpKind.ELEMENTWISE


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclasses.dataclass
class OpRecord:
    """One dispatched op, in forward order."""

    index: int
    func: str  # "aten.mm.default"
    module: str  # innermost module path ("" = the root's own code)
    stack: tuple[str, ...]  # every enclosing module path, outermost first
    regions: tuple[str, ...]  # candidate layers whose `forward` (not hooks around it) is running
    outputs: tuple[str | None, ...]  # value name per tensor output; None = an alias (view) of an input
    inplace: bool
    is_rng: bool
    reads_scalar: bool
    out_spec: Any  # pytree spec of the op's result (to rebuild placeholders at replay)
    out_leaves: tuple[Any, ...]  # per leaf: ("t", shape, stride, dtype, device) or the python value
    creator: int | None = None  # in-place ops: index of the op that allocated the storage they write
    inputs: tuple[str, ...] = ()  # values the op reads (their version at the time of the op)
    draws_explicit_generator: bool = False  # an RNG op given a torch.Generator (not restored by checkpoint)


@dataclasses.dataclass
class Profile:
    ops: list[OpRecord]
    values: list[Value]
    value_op: dict[str, int]  # value name -> index of the op that produced it
    mutated_later: set[str]  # values whose storage an in-place op rewrites later
    module_calls: dict[str, int]  # module path -> number of forward calls
    fake: bool = True  # profiled under FakeTensorMode (False: with real tensors)
    replicated_from: int = 0  # >0: built from a profile of this many layers (see _replicate.py)
    real_prologue: bool = False  # the code before the layers ran on real tensors (_FakeFromFirstLayer)
    # module path -> activations its forward returned, found through pytrees and object attributes
    # (x-transformers' attention returns an Intermediates dataclass holding k, v and the attention
    # maps); the caller may hold them past their last op (see _graph.build_graph)
    returned: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


class _Recorder(TorchDispatchMode):
    """Records ops; the module stack comes from forward hooks installed by `profile`."""

    def __init__(self, fake_mode: Any | None):
        super().__init__()
        self.fake_mode = fake_mode
        self.stack: list[str] = []
        self.regions: list[str] = []
        self.ops: list[OpRecord] = []
        self.values: list[dict[str, Any]] = []
        self.owner: dict[int, str] = {}  # storage key -> current value name (latest version)
        self.roles: dict[str, Role] = {}
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.keepalive: list[Any] = []
        self.pending_nodes: list[tuple[int, list[torch.Tensor]]] = []
        self.op_nodes: dict[int, int] = {}  # op index -> id of its autograd node
        self.nodes: dict[int, Any] = {}
        self.op_io: dict[int, dict[int, str]] = {}  # op index -> storage key -> value name at op time
        self.mutated_later: set[str] = set()
        self.view_of: dict[int, str] = {}  # view op index -> the value its output aliases
        self.value_op: dict[str, int] = {}
        self.creator: dict[int, int] = {}  # storage key -> index of the op that allocated it
        self.num_consts = 0
        self.returned: dict[str, tuple[str, ...]] = {}
        # Explicit generators (torch.bernoulli(p, generator=g)) as they were before their first draw:
        # ops that run for real (a real prologue) must not move them; fork_rng covers the default ones.
        self.generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}

    # -- external tensors: parameters, buffers, inputs -----------------------------------
    def register(self, t: torch.Tensor, name: str, role: Role) -> None:
        key = storage_key(t)
        if key in self.owner:
            return
        self.owner[key] = name
        self.roles[name] = role
        self.keepalive.append(t)
        self.values.append(
            dict(
                name=name,
                num_bytes=t.untyped_storage().nbytes(),
                role=role,
                requires_grad=bool(t.requires_grad),
                deps=(),
                kind=OpKind.OTHER,
                flops=0,
                bytes_moved=0,
                module="",
                stack=(),
            )
        )

    def _value_of(self, t: torch.Tensor) -> str:
        key = storage_key(t)
        if key not in self.owner:  # a constant created outside the recorded region
            self.num_consts += 1
            self.register(t, f"const{self.num_consts - 1}", Role.INPUT)
        return self.owner[key]

    def _capture_nodes(self) -> None:
        # Autograd attaches grad_fn after the op returns from dispatch: collect it at the next op.
        for index, outs in self.pending_nodes:
            for t in outs:
                node = t.grad_fn
                if node is not None:
                    self.op_nodes[index] = id(node)
                    self.nodes[id(node)] = node
                    break
        self.pending_nodes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ignored(func, args):
            out = func(*args, **kwargs)
            if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
                # Autocast's cast of a parameter: a constant to the plan, but memory all the same
                # (the autocast cache holds every cast until the forward ends); named after the
                # parameter so the solver can count it (AUTOCAST_TAG) and replication can rename it.
                src = self.owner.get(storage_key(args[0]))
                if src is not None:
                    self.register(out, f"{AUTOCAST_TAG}{src}", Role.INPUT)
            return out
        self._capture_nodes()
        for g in (*args, *kwargs.values()):
            if isinstance(g, torch.Generator) and id(g) not in self.generators:
                self.generators[id(g)] = (g, g.get_state())
        name = str(func)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        in_values = [self._value_of(t) for t in flat_in]
        io = {storage_key(t): v for t, v in zip(flat_in, in_values)}
        out = func(*args, **kwargs)
        leaves, spec = tree_flatten(out)
        index = len(self.ops)
        module = self.stack[-1] if self.stack else ""
        packet = name.rsplit(".", 1)[0] if name.count(".") >= 2 else name
        is_rng = torch.Tag.nondeterministic_seeded in func.tags
        schema = func._schema
        inplace = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        flop_fn = flop_registry.get(func._overloadpacket)
        flops = int(flop_fn(*args, **kwargs, out_val=out)) if flop_fn is not None else 0
        shape_only = name.startswith(_SHAPE_ONLY_PREFIXES)
        deps = () if shape_only else tuple(dict.fromkeys(in_values))
        in_bytes = sum(t.numel() * t.element_size() for t in flat_in)
        outputs: list[str | None] = []
        out_leaves: list[Any] = []
        out_tensors: list[torch.Tensor] = []
        primary: str | None = None
        occurrence = 0
        is_view = not inplace and any(r.alias_info is not None for r in schema.returns)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                out_leaves.append(leaf)
                continue
            out_leaves.append(("t", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, leaf.device))
            out_tensors.append(leaf)
            key = storage_key(leaf)
            known = key in self.owner and key in io
            if (known or is_view) and not inplace:
                # A view aliases its input's storage and owns no bytes. Under FakeTensorMode a
                # view of a real parameter lands on the parameter's fake storage: map it back.
                if not known and flat_in:
                    self.owner[key] = in_values[0]
                    self.keepalive.append(leaf)
                if key in self.owner:
                    self.view_of.setdefault(index, self.owner[key])
                outputs.append(None)
                continue
            if known:  # in-place: a new version of the storage
                self.mutated_later.add(self.owner[key])
            else:
                self.creator[key] = index
            if primary is None:
                occurrence = self.counts[(module, packet)]
                self.counts[(module, packet)] += 1
            vname = f"{module or 'model'}/{packet}.{occurrence}"
            if sum(isinstance(x, torch.Tensor) for x in leaves) > 1:
                vname += f":{len(out_tensors) - 1}"
            self.values.append(
                dict(
                    name=vname,
                    num_bytes=leaf.untyped_storage().nbytes(),
                    role=Role.ACTIVATION,
                    tensor=leaf,
                    deps=deps,
                    # The op's FLOPs go to its first output; the replay runs an op when any of its
                    # outputs is recomputed, and decisions_for_torch recomputes all of them then.
                    kind=op_kind(name, is_rng),
                    flops=flops if primary is None else 0,
                    bytes_moved=in_bytes + sum(t.numel() * t.element_size() for t in out_tensors),
                    module=module,
                    stack=tuple(self.stack),
                )
            )
            primary = primary or vname
            self.owner[key] = vname
            self.value_op[vname] = index
            io[key] = vname
            outputs.append(vname)
        self.keepalive.append(out)
        self.op_io[index] = io
        self.pending_nodes.append((index, out_tensors))
        self.ops.append(
            OpRecord(
                index=index,
                func=name,
                module=module,
                stack=tuple(self.stack),
                regions=tuple(self.regions),
                outputs=tuple(outputs),
                inplace=inplace,
                is_rng=is_rng,
                reads_scalar=name.startswith(_SCALAR_READS),
                out_spec=spec,
                out_leaves=tuple(out_leaves),
                creator=self.creator.get(storage_key(out_tensors[0])) if inplace and out_tensors else None,
                inputs=tuple(dict.fromkeys(in_values)),
                draws_explicit_generator=any(isinstance(g, torch.Generator) for g in (*args, *kwargs.values())),
            )
        )
        return out


class _BackwardMeter(TorchDispatchMode):
    """Live storage during a backward, and each autograd node's transient peak above it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.node: int | None = None
        self.start = self.peak = 0
        self.workspace: dict[int, int] = {}  # node id -> bytes
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int, _ref: Any) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place ops allocate nothing
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (key := storage_key(t)) not in self._seen:
                st = t.untyped_storage()
                self._seen.add(key)
                self.live += st.nbytes()
                weakref.finalize(st, self._free, key, st.nbytes(), None)
        self.peak = max(self.peak, self.live)
        return out

    def enter_node(self, node_id: int) -> None:
        self.node, self.start, self.peak = node_id, self.live, self.live

    def leave_node(self, node_id: int) -> None:
        if self.node == node_id:
            # Above both ends: the gradients it made are counted by the simulator as buffers.
            extra = self.peak - max(self.start, self.live)
            if extra > 0:
                self.workspace[node_id] = max(self.workspace.get(node_id, 0), extra)
        self.node = None


def backward_workspace(rec: _Recorder, out: Any, root: torch.nn.Module) -> dict[int, int]:
    """Op index -> bytes its backward allocates and frees again besides the gradients it returns.

    The memory model gives each backward op its input gradients as buffers; some formulas hold
    more at once: mambapy's pscan backward (a custom Function) pads a copy of its input and
    multiplies into a temporary (a tenth of Jamba's no-remat peak), and `aten.index`'s backward
    fills a zeros buffer of its input's size (Qwen2-MoE's expert gather). Measured by running
    the backward of the profiled forward once (on fake tensors in a fake profile), gradients
    returned to this function, none stored in `.grad`. Empty where that backward cannot run.
    """
    outputs = [t for t in reachable_tensors(out) if t.requires_grad and t.is_floating_point()]
    leaves = [p for p in root.parameters() if p.requires_grad]
    if not outputs or not leaves or any(m._backward_hooks or m._backward_pre_hooks for m in root.modules()):
        return {}  # (module backward hooks are the user's code: a profile must not call them)
    meter = _BackwardMeter()
    op_of = {node_id: index for index, node_id in rec.op_nodes.items()}
    handles = []
    for node_id, node in rec.nodes.items():
        handles.append(node.register_prehook(lambda _g, node_id=node_id: meter.enter_node(node_id)))
        handles.append(node.register_hook(lambda _gi, _go, node_id=node_id: meter.leave_node(node_id)))
    try:
        with meter:
            seeds = [torch.ones_like(t) for t in outputs]
            torch.autograd.grad(outputs, leaves, seeds, retain_graph=True, allow_unused=True)
    except Exception:  # noqa: BLE001 - a backward that reads values a fake tensor lacks: no workspace known
        return {}
    finally:
        for h in handles:
            h.remove()
    return {op_of[node_id]: extra for node_id, extra in meter.workspace.items() if node_id in op_of}


def _function_inputs(rec: _Recorder, node: Any, node_op: dict[int, int]) -> list[str]:
    """The values a custom autograd.Function was applied to, found through its node's edges."""
    found = []
    for fn, nr in node.next_functions:
        if fn is None:
            continue
        leaf = getattr(fn, "variable", None)  # AccumulateGrad: a parameter or an input
        if leaf is not None:
            name = rec.owner.get(storage_key(leaf))
        elif (index := node_op.get(id(fn))) is not None:
            outs = rec.ops[index].outputs
            name = outs[nr] if nr < len(outs) and outs[nr] is not None else rec.view_of.get(index)
        else:
            name = None
        if name is not None:
            found.append(name)
    return found


def _saved_tensors(node: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    names = [a for a in dir(node) if a.startswith("_saved_")]
    for attr in names:
        try:
            item = getattr(node, attr)
        except RuntimeError:  # freed or not saved for this call
            continue
        for leaf in tree_flatten(item)[0]:
            if isinstance(leaf, torch.Tensor):
                found.append(leaf)
    if not names and hasattr(node, "saved_tensors"):  # custom autograd.Function
        with contextlib.suppress(RuntimeError):
            found.extend(t for t in node.saved_tensors if isinstance(t, torch.Tensor))
    return found


@contextlib.contextmanager
def _module_hooks(
    root: torch.nn.Module, rec: _Recorder, calls: dict[str, int], layers: list[str], on_layer: Any = None
):
    handles = []
    for path, mod in root.named_modules():

        def pre(_m, _a, path=path):
            rec.stack.append(path)
            calls[path] = calls.get(path, 0) + 1

        def post(_m, _a, _o, path=path):
            if rec.stack and rec.stack[-1] == path:
                rec.stack.pop()
            names = (rec.owner.get(storage_key(t)) for t in reachable_tensors(_o))
            rec.returned[path] = tuple(dict.fromkeys(n for n in names if n in rec.value_op))

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))
    # A checkpoint region is a layer's `forward`; hooks around it (FSDP's unshard / reshard) run
    # outside it, so region membership is recorded by wrapping the candidate layers' forward.
    wrapped = []
    for path in layers:
        mod = root.get_submodule(path)
        previous = mod.__dict__.get("forward")
        inner = mod.forward

        def forward(*args, __inner=inner, __path=path, **kwargs):
            if on_layer is not None:
                on_layer()
            rec.regions.append(__path)
            try:
                return __inner(*args, **kwargs)
            finally:
                rec.regions.pop()

        mod.forward = forward
        wrapped.append((mod, previous))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, previous in wrapped:
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous


def reachable_tensors(obj: Any, depth: int = 3) -> list[torch.Tensor]:
    """Tensors in `obj`: its pytree leaves, and the attributes of plain objects among them."""
    found = []
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif depth and hasattr(leaf, "__dict__") and not isinstance(leaf, (torch.nn.Module, type)):
            found.extend(reachable_tensors(list(vars(leaf).values()), depth - 1))
    return found


def register_state(rec: _Recorder, root: torch.nn.Module) -> None:
    """Parameters and buffers are the first values of every profile (tied ones once)."""
    for name, p in root.named_parameters():
        rec.register(p, f"param:{name}", Role.PARAM if p.requires_grad else Role.INPUT)
    for name, b in root.named_buffers():
        rec.register(b, f"buffer:{name}", Role.INPUT)


def state_values(root: torch.nn.Module) -> list[Value]:
    """The values `profile` registers for `root`'s parameters and buffers, in its order."""
    rec = _Recorder(None)
    register_state(rec, root)
    return [
        value(
            v["name"],
            v["num_bytes"],
            kind=v["kind"],
            flops=0,
            deps=(),
            bwd_reads=(),
            bytes_moved=0,
            role=v["role"],
            requires_grad=None,
        )
        for v in rec.values
    ]


class _FakeFromFirstLayer:
    """Enters FakeTensorMode below the recorder when the first layer's forward starts.

    The code before the layers (embeddings, attention masks, position tables) then runs on real
    tensors, so the checks it makes on values (Hugging Face skips the causal mask when the
    padding mask is all ones, and builds one when it sees a fake tensor) take the path the real
    step takes; the layers and what follows them run on fake tensors, so their activations cost
    nothing. The prologue's activations are real memory: small next to the layers'.
    """

    def __init__(self, rec: _Recorder, fake_mode: Any):
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
def user_tools_paused():
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
    the code before the first of `layers` runs on real tensors (see _FakeFromFirstLayer), and
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
    rec = _Recorder(fake_mode)
    register_state(rec, root)
    calls: dict[str, int] = {}
    late = _FakeFromFirstLayer(rec, fake_mode) if real_prologue else None
    early = fake_mode if late is None else None
    # The RNG ops that run for real (a real prologue's dropout, say) must not move the generators
    # the training step draws from.
    cuda = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and early is not None:
            t = fake_mode.from_tensor(x)
            if x.requires_grad and not t.requires_grad:
                t.requires_grad_(True)
            return t
        return x

    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        with early if early is not None else contextlib.nullcontext():
            flat, spec = tree_flatten((args, kwargs))
            flat = [convert(x) for x in flat]
            for i, x in enumerate(flat):
                if isinstance(x, torch.Tensor):
                    rec.register(x, f"input{i}", Role.INPUT)
            from torch.utils._pytree import tree_unflatten

            fargs, fkwargs = tree_unflatten(flat, spec)
            try:
                with _module_hooks(root, rec, calls, layers or [], on_layer=late), rec:
                    out = (call or root)(*fargs, **fkwargs)
            finally:
                if late is not None:
                    late.close()
                for g, st in rec.generators.values():
                    g.set_state(st)
            rec._capture_nodes()
            workspace = backward_workspace(rec, out, root) if measure_backward else {}
            returned = {rec.owner.get(storage_key(t)) for t in reachable_tensors(out)}
            values = _finish(rec, workspace, {n for n in returned if n is not None})
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


def _finish(rec: _Recorder, workspace: dict[int, int], returned: set[str]) -> list[Value]:
    """Attach bwd_reads from the autograd nodes' saved tensors and the backward workspace of each
    op (`workspace`: op index -> bytes), then freeze the values (`returned`: what the forward
    returns)."""
    reads: dict[str, list[str]] = defaultdict(list)
    extra_deps: dict[str, list[str]] = defaultdict(list)
    differentiable: set[str] = set()
    spent: dict[str, int] = {}  # value -> transient bytes its op's backward allocates besides gradients
    names = {v["name"] for v in rec.values}
    node_op = {node_id: index for index, node_id in rec.op_nodes.items()}
    for index, node_id in rec.op_nodes.items():
        op, node = rec.ops[index], rec.nodes[node_id]
        own = [o for o in op.outputs if o is not None]
        custom = isinstance(node, torch.autograd.function.BackwardCFunction)
        if custom:
            # A custom autograd.Function runs its forward's ops under no_grad: none of them has a
            # node, and its outputs do not require grad, so the graph would cut the gradient at
            # the Function's inputs. Its one node reads what ctx saved; when the Function returns
            # a view of a tensor it made (mambapy's pscan returns X.transpose(2, 1)[:, :L]), the
            # node hangs on that view: the value it aliases is the Function's output.
            if not own and rec.view_of.get(index) in names:
                own = [rec.view_of[index]]
            for o in own:
                differentiable.add(o)
                extra_deps[o].extend(n for n in _function_inputs(rec, node, node_op) if n in names and n != o)
        if not own:
            continue  # views: their backward reads sizes, not tensors
        if workspace.get(index):
            # The op's backward runs at the first of its outputs the backward reaches: the last.
            spent[own[-1]] = workspace[index]
        io = rec.op_io[index]
        for t in _saved_tensors(node):
            key = storage_key(t)
            name = io.get(key) or rec.owner.get(key)
            if name is None or name not in names:
                continue
            for o in own:
                if name not in reads[o]:
                    reads[o].append(name)
    # An op's backward runs when one of its differentiable outputs gets a gradient, and it may
    # read every output (layer norm reads its mean and rstd): order each op's outputs so the
    # differentiable ones come last and can list their siblings as reads.
    ordered: list[dict[str, Any]] = []
    for v in rec.values:
        ordered.append(v)
        op = rec.value_op.get(v["name"])
        k = len(ordered) - 1
        while (
            k > 0
            and op is not None
            and rec.value_op.get(ordered[k - 1]["name"]) == op
            and (ordered[k - 1]["tensor"].requires_grad and not ordered[k]["tensor"].requires_grad)
        ):
            ordered[k - 1], ordered[k] = ordered[k], ordered[k - 1]
            k -= 1
    rec.values = ordered
    position = {v["name"]: i for i, v in enumerate(rec.values)}
    out = []
    for v in rec.values:
        own_pos = position[v["name"]]
        bwd = tuple(r for r in reads.get(v["name"], ()) if position[r] <= own_pos)
        deps = tuple(dict.fromkeys((*v["deps"], *(d for d in extra_deps.get(v["name"], ()) if position[d] < own_pos))))
        out.append(
            value(
                v["name"],
                v["num_bytes"],
                kind=v["kind"],
                flops=v["flops"],
                deps=deps,
                bwd_reads=bwd,
                bytes_moved=v["bytes_moved"],
                module=v["module"],
                role=v["role"],
                # Autograd marks outputs after dispatch returns: read the flag now, after the forward.
                requires_grad=bool(v["tensor"].requires_grad or v["name"] in differentiable)
                if v["role"] is Role.ACTIVATION
                else None,
            )
        )
        if v["name"] in spent:
            out[-1] = dataclasses.replace(out[-1], bwd_workspace_bytes=spent[v["name"]])
    rewrites = {n for op in rec.ops if op.inplace for n in op.outputs if n is not None}
    return _dangling_dropped(out, rewrites - returned - {n for names in rec.returned.values() for n in names})


def _dangling_dropped(values: list[Value], candidates: set[str]) -> list[Value]:
    """The last in-place rewrites of a storage that no op, no backward and no module reads, as
    no bytes and no gradient.

    The memory model takes an activation nobody reads for an output of the step, alive until its
    backward; in torch it is garbage once the Python code drops it. mambapy's pscan multiplies its
    clone of A in place last and never reads it again: two (B, L, ED, N) outputs, a tenth of
    Jamba's no-remat peak, counted to the end of the forward. (Its earlier versions, read by the
    in-place ops after them, still count until then.) Only in-place results: a value an op makes
    anew is left an output, an upper bound."""
    read = {n for v in values for n in (*v.deps, *v.bwd_reads)}
    return [
        dataclasses.replace(v, num_bytes=0, requires_grad=False, bwd_workspace_bytes=0)
        if v.is_activation and v.name in candidates and v.name not in read
        else v
        for v in values
    ]
