"""The dispatch recorder: each aten op of a forward as an `OpRecord`, each tensor it makes as a value.

Each aten op the autograd layer dispatches (the same sequence a checkpoint region replays) is
recorded with its outputs' bytes, its FLOPs (torch.utils.flop_counter's formulas, so the count
matches FlopCounterMode exactly), RNG / view / in-place flags and the owning module, which forward
hooks (`module_hooks`) push and pop. Values are kept as dicts holding their tensor until the
forward ends: autograd marks `requires_grad` and attaches `grad_fn` only after dispatch returns
(`_trace_backward.finish` freezes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from remat_kit._core.graph import OpKind, Role, Value, value
from remat_kit._torch._trace_ops import (
    AUTOCAST_TAG,
    SCALAR_READS,
    SHAPE_ONLY_PREFIXES,
    OpRecord,
    ignored,
    op_kind,
    storage_key,
)


@dataclasses.dataclass(frozen=True)
class _OpFacts:
    """What the recorder knows of one op once it has run, before it names the op's outputs."""

    index: int
    name: str  # "aten.mm.default"
    module: str
    packet: str  # "aten.mm": outputs are numbered per (module, packet)
    is_rng: bool
    inplace: bool
    is_view: bool
    flops: int
    deps: tuple[str, ...]
    in_values: tuple[str, ...]  # one per tensor input, repeats kept
    in_bytes: int


def saved_tensor_hooks() -> Any:
    """The innermost saved-tensor hooks in force (`torch.autograd.graph.saved_tensors_hooks`), or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


class Recorder(TorchDispatchMode):
    """Records ops; the module stack comes from forward hooks installed by `module_hooks`."""

    def __init__(self) -> None:
        super().__init__()
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
        # Saved-tensor hooks the forward installs itself (torch.utils.checkpoint, save_on_cpu):
        # those around the profile are the caller's; modules whose ops ran under others are noted.
        self.outer_hooks = saved_tensor_hooks()
        self.hooked_modules: dict[str, None] = {}

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

    def capture_nodes(self) -> None:
        # Autograd attaches grad_fn after the op returns from dispatch: collect it at the next op.
        for index, outs in self.pending_nodes:
            for t in outs:
                node = t.grad_fn
                if node is not None:
                    self.op_nodes[index] = id(node)
                    self.nodes[id(node)] = node
                    break
        self.pending_nodes = []

    # -- one op -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ignored(func, args):
            return self._run_ignored(func, args, kwargs)
        if not func.is_view:
            # A view op can arrive from inside autograd holding a tensor's lock: an in-place op
            # on a view (MobileNetV2's Dropout(inplace=True) on its flattened features) rebuilds
            # the view's grad_fn by replaying the view, and reading that tensor's grad_fn here
            # would wait on the lock forever. Views change no grad_fn: the next op captures them.
            self.capture_nodes()
        for g in (*args, *kwargs.values()):
            if isinstance(g, torch.Generator) and id(g) not in self.generators:
                self.generators[id(g)] = (g, g.get_state())
        if torch.is_grad_enabled() and saved_tensor_hooks() != self.outer_hooks:
            self.hooked_modules[self.stack[-1] if self.stack else ""] = None
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        in_values = [self._value_of(t) for t in flat_in]
        io = {storage_key(t): v for t, v in zip(flat_in, in_values)}
        out = func(*args, **kwargs)
        op = self._facts(func, args, kwargs, out, flat_in, in_values)
        leaves, spec = tree_flatten(out)
        outputs, out_leaves, out_tensors = self._name_outputs(op, leaves, io)
        self.keepalive.append(out)
        self.op_io[op.index] = io
        self.pending_nodes.append((op.index, out_tensors))
        self.ops.append(
            OpRecord(
                index=op.index,
                func=op.name,
                module=op.module,
                stack=tuple(self.stack),
                regions=tuple(self.regions),
                outputs=tuple(outputs),
                inplace=op.inplace,
                is_rng=op.is_rng,
                reads_scalar=op.name.startswith(SCALAR_READS),
                out_spec=spec,
                out_leaves=tuple(out_leaves),
                creator=self.creator.get(storage_key(out_tensors[0])) if op.inplace and out_tensors else None,
                inputs=tuple(dict.fromkeys(in_values)),
                draws_explicit_generator=any(isinstance(g, torch.Generator) for g in (*args, *kwargs.values())),
            )
        )
        return out

    def _run_ignored(self, func, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            # Autocast's cast of a parameter: a constant to the plan, but memory all the same
            # (the autocast cache holds every cast until the forward ends); named after the
            # parameter so the solver can count it (AUTOCAST_TAG) and replication can rename it.
            src = self.owner.get(storage_key(args[0]))
            if src is not None:
                self.register(out, f"{AUTOCAST_TAG}{src}", Role.INPUT)
        return out

    def _facts(self, func, args: tuple, kwargs: dict, out: Any, flat_in: list, in_values: list[str]) -> _OpFacts:
        name = str(func)
        schema = func._schema
        inplace = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        flop_fn = flop_registry.get(func._overloadpacket)
        return _OpFacts(
            index=len(self.ops),
            name=name,
            module=self.stack[-1] if self.stack else "",
            packet=name.rsplit(".", 1)[0] if name.count(".") >= 2 else name,
            is_rng=torch.Tag.nondeterministic_seeded in func.tags,
            inplace=inplace,
            is_view=not inplace and any(r.alias_info is not None for r in schema.returns),
            flops=int(flop_fn(*args, **kwargs, out_val=out)) if flop_fn is not None else 0,
            deps=() if name.startswith(SHAPE_ONLY_PREFIXES) else tuple(dict.fromkeys(in_values)),
            in_values=tuple(in_values),
            in_bytes=sum(t.numel() * t.element_size() for t in flat_in),
        )

    def _name_outputs(
        self, op: _OpFacts, leaves: list[Any], io: dict[int, str]
    ) -> tuple[list[str | None], list[Any], list[torch.Tensor]]:
        """Each tensor output becomes a new value, a new version of an input (in-place) or an
        alias of an input (a view: None); `io` gains the new values."""
        outputs: list[str | None] = []
        out_leaves: list[Any] = []
        out_tensors: list[torch.Tensor] = []
        primary: str | None = None
        occurrence = 0
        num_tensors = sum(isinstance(x, torch.Tensor) for x in leaves)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                out_leaves.append(leaf)
                continue
            out_leaves.append(("t", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, leaf.device))
            out_tensors.append(leaf)
            key = storage_key(leaf)
            known = key in self.owner and key in io
            if (known or op.is_view) and not op.inplace:
                self._alias(op, key, leaf, known)
                outputs.append(None)
                continue
            if known:  # in-place: a new version of the storage
                self.mutated_later.add(self.owner[key])
            else:
                self.creator[key] = op.index
            if primary is None:
                occurrence = self.counts[(op.module, op.packet)]
                self.counts[(op.module, op.packet)] += 1
            vname = f"{op.module or 'model'}/{op.packet}.{occurrence}"
            if num_tensors > 1:
                vname += f":{len(out_tensors) - 1}"
            self._add_activation(op, vname, leaf, out_tensors, first=primary is None)
            primary = primary or vname
            self.owner[key] = vname
            self.value_op[vname] = op.index
            io[key] = vname
            outputs.append(vname)
        return outputs, out_leaves, out_tensors

    def _alias(self, op: _OpFacts, key: int, leaf: torch.Tensor, known: bool) -> None:
        # A view aliases its input's storage and owns no bytes. Under FakeTensorMode a view of a
        # real parameter lands on the parameter's fake storage: map it back.
        if not known and op.in_values:
            self.owner[key] = op.in_values[0]
            self.keepalive.append(leaf)
        if key in self.owner:
            self.view_of.setdefault(op.index, self.owner[key])

    def _add_activation(
        self, op: _OpFacts, vname: str, leaf: torch.Tensor, out_tensors: list[torch.Tensor], first: bool
    ) -> None:
        self.values.append(
            dict(
                name=vname,
                num_bytes=leaf.untyped_storage().nbytes(),
                role=Role.ACTIVATION,
                tensor=leaf,
                deps=op.deps,
                # The op's FLOPs go to its first output; the replay runs an op when any of its
                # outputs is recomputed, and its outputs share one fate (the solver's same_fate constraint).
                kind=op_kind(op.name, op.is_rng),
                flops=op.flops if first else 0,
                # The inputs' bytes go to the first output too, each output's own bytes to it: the
                # op's outputs together move what the op moves (a layer norm was priced 3 times).
                bytes_moved=(op.in_bytes if first else 0) + leaf.numel() * leaf.element_size(),
                module=op.module,
                stack=tuple(self.stack),
                op=op.packet,  # priced at its own measured rate where the device has one (DeviceSpec.op_bandwidth)
            )
        )


@contextlib.contextmanager
def module_hooks(root: torch.nn.Module, rec: Recorder, calls: dict[str, int], layers: list[str], on_layer: Any = None):
    """Keep `rec.stack` (the enclosing module paths), `calls` (forward calls per module path),
    `rec.returned` and `rec.regions` (the candidate layers whose `forward` is running) while the
    forward runs."""
    handles = []
    entered: list[tuple[int, tuple[str, ...]]] = []  # per open call: values made before it, its inputs
    for path, mod in root.named_modules():

        def pre(_m, args, kwargs, path=path):
            rec.stack.append(path)
            calls[path] = calls.get(path, 0) + 1
            names = (rec.owner.get(storage_key(t)) for t in reachable_tensors((args, kwargs)))
            entered.append((len(rec.values), tuple(dict.fromkeys(n for n in names if n in rec.value_op))))

        def post(_m, _a, _o, path=path):
            if rec.stack and rec.stack[-1] == path:
                rec.stack.pop()
            names = (rec.owner.get(storage_key(t)) for t in reachable_tensors(_o))
            rec.returned[path] = tuple(dict.fromkeys(n for n in names if n in rec.value_op))
            if entered:
                made_before, inputs = entered.pop()
                if inputs and len(rec.values) > made_before:
                    # The caller holds the call's inputs until it returns: the last value the call
                    # made is where they can go (Value.holds).
                    last = rec.values[-1]
                    last["holds"] = tuple(dict.fromkeys((*last.get("holds", ()), *inputs)))

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, always_call=True))
    wrapped = _regions_marked(root, rec, layers, on_layer)
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


def _regions_marked(
    root: torch.nn.Module, rec: Recorder, layers: list[str], on_layer: Any
) -> list[tuple[torch.nn.Module, Any]]:
    """Wrap each candidate layer's `forward` so `rec.regions` holds it while it runs; returns
    (module, the instance `forward` it had or None) to undo it.

    A checkpoint region is a layer's `forward`; hooks around it (FSDP's unshard / reshard) run
    outside it, so region membership is recorded by the `forward` itself, not by hooks.
    """
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
    return wrapped


def reachable_tensors(obj: Any, depth: int = 3) -> list[torch.Tensor]:
    """Tensors in `obj`: its pytree leaves, and the attributes of plain objects among them."""
    found = []
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif depth and hasattr(leaf, "__dict__") and not isinstance(leaf, (torch.nn.Module, type)):
            found.extend(reachable_tensors(list(vars(leaf).values()), depth - 1))
    return found


def register_state(rec: Recorder, root: torch.nn.Module) -> None:
    """Parameters and buffers are the first values of every profile (tied ones once)."""
    for name, p in root.named_parameters():
        rec.register(p, f"param:{name}", Role.PARAM if p.requires_grad else Role.INPUT)
    for name, b in root.named_buffers():
        rec.register(b, f"buffer:{name}", Role.INPUT)


def state_values(root: torch.nn.Module) -> list[Value]:
    """The values `profile` registers for `root`'s parameters and buffers, in its order."""
    rec = Recorder()
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
