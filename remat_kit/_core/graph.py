"""The cost graph: what a forward pass produces and what each value costs to hold or recompute.

Framework-neutral: adapters (JAX jaxprs, PyTorch dispatch traces) and the analytic builders fill
it in; the simulator and the solvers read it. Nothing here imports jax or torch.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

# DeviceSpec lived here before device.py: importers of it from graph keep working.
from remat_kit._core.device import DeviceSpec as DeviceSpec


class OpKind(str, enum.Enum):
    """What kind of op produced a value; drives layer scoring and stock presets."""

    MATMUL = "matmul"
    ATTENTION = "attention"  # the attention core: scores, softmax, attention-weighted values
    NORM = "norm"
    ELEMENTWISE = "elementwise"  # activations, adds, scales
    EMBEDDING = "embedding"
    REDUCTION = "reduction"
    RNG = "rng"  # dropout masks, random bits: recomputed from the same key, never resampled
    VIEW = "view"  # reshape / transpose / slice: free to recompute, usually aliases
    OTHER = "other"


class Role(str, enum.Enum):
    ACTIVATION = "activation"  # produced by the forward pass; the only thing a plan decides about
    INPUT = "input"  # batch data: held for the whole step, no gradient buffer
    PARAM = "param"  # parameters: held for the whole step, gradient counted as a constant


@dataclasses.dataclass(frozen=True)
class Value:
    """One value the forward pass produces (one op output), or a graph input / parameter.

    Attributes:
      name: stable name, unique in the graph (plans refer to values by it).
      num_bytes: bytes per device.
      role: activation, input or param.
      kind: the op kind that produced it.
      flops: FLOPs to recompute it from its deps.
      bytes_moved: bytes the op reads and writes (the roofline's memory term).
      deps: names of the values the op reads, all earlier in the graph.
      bwd_reads: names of the values the op's backward reads (its residuals; may include itself).
      module: the module / layer path it belongs to (e.g. ``layers.3.attn``).
      block: index of the chain block it belongs to; recompute happens per block.
      requires_grad: whether a gradient buffer flows back through it.
      bwd_workspace_bytes: bytes its op's backward holds for a moment besides the gradients it
        returns (temporaries of the backward formula: a pad, a zeros buffer to scatter into).
      holds: names of earlier values kept alive until this one is made, though its op does not
        read them: a module call's inputs, which the caller holds until the call returns (torch).
        They live that long in the forward and in a recompute; no dependency, no gradient.
      meta: free-form adapter data (op index, primitive name, dtype...); not part of the identity.
    """

    name: str
    num_bytes: int
    role: Role = Role.ACTIVATION
    kind: OpKind = OpKind.OTHER
    flops: int = 0
    bytes_moved: int = 0
    deps: tuple[str, ...] = ()
    bwd_reads: tuple[str, ...] = ()
    module: str = ""
    block: int = 0
    requires_grad: bool = True
    meta: tuple[tuple[str, Any], ...] = ()
    bwd_workspace_bytes: int = 0
    holds: tuple[str, ...] = ()

    @property
    def is_activation(self) -> bool:
        return self.role is Role.ACTIVATION

    @property
    def op(self) -> str | None:
        """The op that produced it, by name, where the adapter recorded one (``meta["op"]``)."""
        for key, item in self.meta:
            if key == "op":
                return item
        return None


class CostGraph:
    """An ordered (topological) collection of values with costs, grouped into a chain of blocks.

    Blocks are contiguous in forward order (block ids never decrease). A value consumed by an op
    of a later block is a *boundary*: it is always kept (like a scanned layer's carry), so each
    block recomputes only from its own values and its boundary inputs.
    """

    def __init__(
        self,
        values: Iterable[Value],
        *,
        block_names: Sequence[str] | None = None,
        segments: Sequence[Sequence[str]] | None = None,
    ):
        self.values: tuple[Value, ...] = tuple(values)
        self._index = {v.name: i for i, v in enumerate(self.values)}
        self._validate()
        blocks = sorted({v.block for v in self.values if v.is_activation})
        self.num_blocks = (blocks[-1] + 1) if blocks else 0
        self.block_names = tuple(block_names) if block_names else tuple(f"block{i}" for i in range(self.num_blocks))
        if len(self.block_names) != self.num_blocks:
            raise ValueError(
                f"CostGraph(block_names=...) has {len(self.block_names)} names for "
                f"{self.num_blocks} blocks; give one name per block."
            )
        # Which of the model's blocks each of this graph's blocks spans (see `regroup`).
        self.segments = tuple(tuple(s) for s in segments) if segments else tuple((n,) for n in self.block_names)
        self._derive()

    def regroup(self, segments: Sequence[Sequence[str]]) -> CostGraph:
        """The same values with consecutive blocks merged into segments (e.g. Chen et al.'s √n).

        A merged segment is checkpointed as one unit: the boundaries inside it become ordinary
        values a plan may recompute.
        """
        names = [n for seg in segments for n in seg]
        if names != list(self.block_names) or any(not seg for seg in segments):
            raise ValueError(
                f"regroup(segments={[list(s) for s in segments]!r}): segments must be non-empty runs of "
                f"consecutive blocks covering {list(self.block_names)} in order."
            )
        new_block = {}
        for k, seg in enumerate(segments):
            for n in seg:
                new_block[self.block_names.index(n)] = k
        values = [dataclasses.replace(v, block=new_block[v.block]) if v.is_activation else v for v in self.values]
        return CostGraph(values, block_names=["+".join(seg) for seg in segments], segments=segments)

    # -- construction checks -------------------------------------------------------------
    def _validate(self) -> None:
        if len(self._index) != len(self.values):
            counts = collections.Counter(v.name for v in self.values)
            dup = next(name for name, n in counts.items() if n > 1)
            raise ValueError(f"CostGraph: value name {dup!r} appears more than once; names must be unique.")
        last_block = 0
        for i, v in enumerate(self.values):
            if v.num_bytes < 0 or v.flops < 0 or v.bytes_moved < 0:
                raise ValueError(f"CostGraph: value {v.name!r} has a negative size or cost: {v!r}.")
            for d in (*v.deps, *v.bwd_reads, *v.holds):
                j = self._index.get(d)
                if j is None:
                    raise ValueError(f"CostGraph: value {v.name!r} refers to unknown value {d!r}.")
                if j > i or (j == i and d in (*v.deps, *v.holds)):
                    raise ValueError(
                        f"CostGraph: value {v.name!r} depends on {d!r}, which comes later; "
                        "values must be in forward (topological) order."
                    )
            if v.is_activation:
                if v.block < last_block:
                    raise ValueError(
                        f"CostGraph: value {v.name!r} is in block {v.block} after block {last_block}; "
                        "blocks must be contiguous in forward order."
                    )
                last_block = v.block

    def _derive(self) -> None:
        n = len(self.values)
        vals = self.values
        consumers: list[list[int]] = [[] for _ in range(n)]
        bwd_readers: list[list[int]] = [[] for _ in range(n)]
        for i, v in enumerate(vals):
            for d in v.deps:
                consumers[self._index[d]].append(i)
            for d in v.bwd_reads:
                bwd_readers[self._index[d]].append(i)
        self.consumers = tuple(tuple(c) for c in consumers)
        self.activations = tuple(i for i, v in enumerate(vals) if v.is_activation)
        # Outputs: activations nobody consumes (the loss, auxiliary outputs). Only outputs that
        # require grad are seeded with a cotangent.
        is_output = [v.is_activation and not consumers[i] for i, v in enumerate(vals)]
        gets_grad = [False] * n
        for i in reversed(self.activations):
            v = vals[i]
            if not v.requires_grad:
                continue
            gets_grad[i] = is_output[i] or any(gets_grad[c] for c in consumers[i] if vals[c].is_activation)
        self.gets_grad = tuple(gets_grad)
        # A backward op runs only for values that receive a gradient; what it reads is a residual.
        self.bwd_readers = tuple(tuple(r for r in bwd_readers[i] if gets_grad[r]) for i in range(n))
        self.is_residual = tuple(vals[i].is_activation and bool(self.bwd_readers[i]) for i in range(n))
        self.is_output = tuple(is_output)
        self.is_boundary = tuple(
            v.is_activation
            and any(vals[c].is_activation and vals[c].block != v.block for c in (*consumers[i], *bwd_readers[i]))
            for i, v in enumerate(vals)
        )
        # Forced values are always kept: boundaries (a layer's carry) and outputs.
        self.is_forced = tuple(b or o for b, o in zip(self.is_boundary, self.is_output))
        holders: list[list[int]] = [[] for _ in range(n)]
        for i, v in enumerate(vals):
            for d in v.holds:
                holders[self._index[d]].append(i)
        self.holders = tuple(tuple(h) for h in holders)
        self.last_fwd_use = tuple(max((i, *consumers[i], *holders[i])) for i in range(n))
        members: list[list[int]] = [[] for _ in range(self.num_blocks)]
        for i in self.activations:
            members[vals[i].block].append(i)
        self.block_members = tuple(tuple(m) for m in members)
        self.free_values = tuple(i for i in self.activations if not self.is_forced[i])
        self.constant_bytes = sum(v.num_bytes for v in vals if v.role is Role.INPUT) + 2 * sum(
            v.num_bytes for v in vals if v.role is Role.PARAM
        )
        self._cache: dict[Any, Any] = {}

    # -- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no value named {name!r} in this graph") from None

    def __getitem__(self, name: str) -> Value:
        return self.values[self.index(name)]

    def is_chain(self) -> bool:
        """True when values cross at most one block boundary (block b is read only by b and b + 1)."""
        for i in self.activations:
            b = self.values[i].block
            for c in (*self.consumers[i], *self.bwd_readers[i]):
                if self.values[c].block not in (b, b + 1):
                    return False
        return True

    def residuals(self) -> tuple[int, ...]:
        """Indices of activations some backward op reads: what no remat keeps."""
        return tuple(i for i in self.activations if self.is_residual[i])

    def fingerprint(self) -> str:
        """Hash of names, sizes and structure (not the block grouping, which a plan carries)."""
        h = hashlib.sha256()
        for v in self.values:
            held = f"|{','.join(v.holds)}" if v.holds else ""  # graphs without holds keep their fingerprints
            h.update(f"{v.name}|{v.num_bytes}|{v.role.value}|{','.join(v.deps)}{held}\n".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"CostGraph({len(self.activations)} activations, {self.num_blocks} blocks, "
            f"{sum(self.values[i].num_bytes for i in self.residuals())} residual bytes)"
        )


def value(
    name: str,
    num_bytes: int,
    *,
    kind: OpKind | str = OpKind.OTHER,
    flops: int = 0,
    deps: Sequence[str] = (),
    bwd_reads: Sequence[str] | None = None,
    bytes_moved: int | None = None,
    module: str = "",
    block: int = 0,
    role: Role | str = Role.ACTIVATION,
    requires_grad: bool | None = None,
    **meta: Any,
) -> Value:
    """Convenience constructor with the usual defaults.

    `bwd_reads` defaults to the deps (most ops' backward reads their inputs); `bytes_moved` to the
    bytes of the deps' sizes are unknown here, so it defaults to twice the output (read + write);
    RNG outputs need no gradient.
    """
    kind = OpKind(kind)
    role = Role(role)
    if requires_grad is None:
        requires_grad = role is Role.ACTIVATION and kind is not OpKind.RNG
    return Value(
        name=name,
        num_bytes=int(num_bytes),
        role=role,
        kind=kind,
        flops=int(flops),
        bytes_moved=int(2 * num_bytes if bytes_moved is None else bytes_moved),
        deps=tuple(deps),
        bwd_reads=tuple(deps if bwd_reads is None else bwd_reads),
        module=module,
        block=int(block),
        requires_grad=bool(requires_grad),
        meta=tuple(sorted(meta.items())),
    )
