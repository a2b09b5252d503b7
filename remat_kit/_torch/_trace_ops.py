"""What a profile is: one record per dispatched op, the values, and how an op is classified.

The data `_trace.profile` returns (`Profile`, `OpRecord`) and the rules the recorder applies to
each op (its kind, whether a region may dispatch it a varying number of times) live here, so the
graph builder, the replication and the replay read them without pulling in the recorder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

try:
    from torch.utils.checkpoint import SAC_IGNORED_OPS
except ImportError:  # older torch: the two ops a checkpoint region may dispatch a varying number of times
    SAC_IGNORED_OPS = {torch.ops.aten.detach.default, torch.ops.prim.device.default}

from remat_kit._core.graph import OpKind, Value

# Ops whose tensor inputs are read for their metadata only: recomputing them needs no real input.
SHAPE_ONLY_PREFIXES = (
    "aten.empty_like",
    "aten.zeros_like",
    "aten.ones_like",
    "aten.full_like",
    "aten.rand_like",
    "aten.randn_like",
    "aten.randint_like",
    "aten.new_",
)
SCALAR_READS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.item")
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
    real_prologue: bool = False  # the code before the layers ran on real tensors (_trace.FakeFromFirstLayer)
    # module path -> activations its forward returned, found through pytrees and object attributes
    # (x-transformers' attention returns an Intermediates dataclass holding k, v and the attention
    # maps); the caller may hold them past their last op (see _graph.build_graph)
    returned: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
