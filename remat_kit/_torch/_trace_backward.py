"""What the backward of a profiled forward reads and allocates, read back after the forward ran.

What each op's backward reads (`bwd_reads`) comes from the autograd nodes' saved tensors, so the
graph holds what torch really keeps for backward; what it allocates besides the gradients it
returns (`bwd_workspace_bytes`) is measured by running that backward once. `finish` attaches both
and freezes the recorder's values into the core's `Value`s.
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

from remat_kit._core.graph import Role, Value, value
from remat_kit._torch._trace_ops import storage_key
from remat_kit._torch._trace_recorder import Recorder, reachable_tensors


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

    def leave_node(self, node_id: int, copied: int = 0) -> None:
        """`copied`: bytes of parameter gradients the step will copy into `.grad` after the node
        (`copied_parameter_grads`): held for that moment on top of what the node leaves."""
        if self.node == node_id:
            # Above both ends: the gradients it made are counted by the simulator as buffers.
            extra = max(self.peak - max(self.start, self.live), copied)
            if extra > 0:
                self.workspace[node_id] = max(self.workspace.get(node_id, 0), extra)
        self.node = None


def _obeys_layout_contract(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """torch's own test (torch/csrc/autograd/utils/grad_layout_contract.h) of whether
    AccumulateGrad may keep `grad` as `param.grad` or must copy it into `param`'s layout."""
    if grad.is_sparse or param.is_sparse or grad.is_mkldnn:
        return True
    try:
        from torch._prims_common import is_non_overlapping_and_dense
    except ImportError:  # pragma: no cover - torch without _prims_common: contiguous as the test
        return grad.is_contiguous() or not param.is_contiguous()
    if is_non_overlapping_and_dense(param):
        return all(n == 1 or gs == ps for n, gs, ps in zip(grad.shape, grad.stride(), param.stride()))
    return grad.is_contiguous()


def copied_parameter_grads(node: Any, grads: tuple) -> int:
    """Bytes of the gradients `node` returns for parameters in a layout other than theirs: the
    step's AccumulateGrad copies each into the parameter's layout (`clone_obey_contract`), so the
    one the node made is held until that copy is done. HF ConvNeXt's convolutions read a
    channels-last permute, and their weight gradients come back channels-last."""
    total = 0
    for (fn, _nr), grad in zip(node.next_functions, grads):
        param = getattr(fn, "variable", None)
        if param is not None and isinstance(grad, torch.Tensor) and not _obeys_layout_contract(grad, param):
            total += grad.untyped_storage().nbytes()
    return total


def backward_workspace(rec: Recorder, out: Any, root: torch.nn.Module) -> dict[int, int]:
    """Op index -> bytes its backward allocates and frees again besides the gradients it returns.

    The memory model gives each backward op its input gradients as buffers; some formulas hold
    more at once: mambapy's pscan backward (a custom Function) pads a copy of its input and
    multiplies into a temporary, and `aten.index`'s backward fills a zeros buffer of its input's
    size (Qwen2-MoE's expert gather). Measured by running the backward of the profiled forward
    once (on fake tensors in a fake profile), gradients returned to this function, none stored in
    `.grad`. Empty where that backward cannot run.
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
        handles.append(
            node.register_hook(
                lambda gi, _go, node=node, node_id=node_id: meter.leave_node(node_id, copied_parameter_grads(node, gi))
            )
        )
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


def _function_inputs(rec: Recorder, node: Any, node_op: dict[int, int]) -> list[str]:
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


@dataclasses.dataclass
class _BackwardFacts:
    """Per value name, what the autograd nodes of the forward say about its op's backward."""

    reads: dict[str, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    extra_deps: dict[str, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    differentiable: set[str] = dataclasses.field(default_factory=set)
    spent: dict[str, int] = dataclasses.field(default_factory=dict)  # transient bytes besides gradients


def finish(rec: Recorder, workspace: dict[int, int], returned: set[str]) -> list[Value]:
    """Attach bwd_reads from the autograd nodes' saved tensors and the backward workspace of each
    op (`workspace`: op index -> bytes), then freeze the values (`returned`: what the forward
    returns)."""
    facts = _backward_facts(rec, workspace)
    rec.values = _gradient_outputs_last(rec)
    out = _frozen(rec.values, facts)
    rewrites = {n for op in rec.ops if op.inplace for n in op.outputs if n is not None}
    return _dangling_dropped(out, rewrites - returned - {n for names in rec.returned.values() for n in names})


def _backward_facts(rec: Recorder, workspace: dict[int, int]) -> _BackwardFacts:
    facts = _BackwardFacts()
    names = {v["name"] for v in rec.values}
    node_op = {node_id: index for index, node_id in rec.op_nodes.items()}
    for index, node_id in rec.op_nodes.items():
        op, node = rec.ops[index], rec.nodes[node_id]
        own = [o for o in op.outputs if o is not None]
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            # A custom autograd.Function runs its forward's ops under no_grad: none of them has a
            # node, and its outputs do not require grad, so the graph would cut the gradient at
            # the Function's inputs. Its one node reads what ctx saved; when the Function returns
            # a view of a tensor it made (mambapy's pscan returns X.transpose(2, 1)[:, :L]), the
            # node hangs on that view: the value it aliases is the Function's output.
            if not own and rec.view_of.get(index) in names:
                own = [rec.view_of[index]]
            for o in own:
                facts.differentiable.add(o)
                facts.extra_deps[o].extend(n for n in _function_inputs(rec, node, node_op) if n in names and n != o)
        if not own:
            continue  # views: their backward reads sizes, not tensors
        if workspace.get(index):
            # The op's backward runs at the first of its outputs the backward reaches: the last.
            facts.spent[own[-1]] = workspace[index]
        io = rec.op_io[index]
        for t in _saved_tensors(node):
            key = storage_key(t)
            name = io.get(key) or rec.owner.get(key)
            if name is None or name not in names:
                continue
            for o in own:
                if name not in facts.reads[o]:
                    facts.reads[o].append(name)
    return facts


def _gradient_outputs_last(rec: Recorder) -> list[dict[str, Any]]:
    """The recorder's values with each op's outputs ordered so the differentiable ones come last.

    An op's backward runs when one of its differentiable outputs gets a gradient, and it may read
    every output (layer norm reads its mean and rstd): last, they can list their siblings as reads.
    """
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
    return ordered


def _frozen(values: list[dict[str, Any]], facts: _BackwardFacts) -> list[Value]:
    """The core's values, in this order; reads and extra deps only of values before each one."""
    position = {v["name"]: i for i, v in enumerate(values)}
    out = []
    for v in values:
        own_pos = position[v["name"]]
        bwd = tuple(r for r in facts.reads.get(v["name"], ()) if position[r] <= own_pos)
        extra = (d for d in facts.extra_deps.get(v["name"], ()) if position[d] < own_pos)
        holds = tuple(h for h in v.get("holds", ()) if position.get(h, own_pos) < own_pos)
        out.append(
            value(
                v["name"],
                v["num_bytes"],
                kind=v["kind"],
                flops=v["flops"],
                deps=tuple(dict.fromkeys((*v["deps"], *extra))),
                bwd_reads=bwd,
                bytes_moved=v["bytes_moved"],
                module=v["module"],
                role=v["role"],
                **({"op": v["op"]} if "op" in v else {}),
                # Autograd marks outputs after dispatch returns: read the flag now, after the forward.
                requires_grad=bool(v["tensor"].requires_grad or v["name"] in facts.differentiable)
                if v["role"] is Role.ACTIVATION
                else None,
            )
        )
        if v["name"] in facts.spent:
            out[-1] = dataclasses.replace(out[-1], bwd_workspace_bytes=facts.spent[v["name"]])
        if holds:
            out[-1] = dataclasses.replace(out[-1], holds=holds)
    return out


def _dangling_dropped(values: list[Value], candidates: set[str]) -> list[Value]:
    """The last in-place rewrites of a storage that no op, no backward and no module reads, as
    no bytes and no gradient.

    The memory model takes an activation nobody reads for an output of the step, alive until its
    backward; in torch it is garbage once the Python code drops it. mambapy's pscan multiplies its
    clone of A in place last and never reads it again: two (B, L, ED, N) outputs counted to the
    end of the forward. (Its earlier versions, read by the in-place ops after them, still count
    until then.) Only in-place results: a value an op makes anew is left an output, an upper bound."""
    read = {n for v in values for n in (*v.deps, *v.bwd_reads)}
    return [
        dataclasses.replace(v, num_bytes=0, requires_grad=False, bwd_workspace_bytes=0)
        if v.is_activation and v.name in candidates and v.name not in read
        else v
        for v in values
    ]
