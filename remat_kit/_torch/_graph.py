"""From a profile to a chain of blocks: find the repeated layers and build the CostGraph.

A *segment* is a contiguous run of ops. Segments that are one call of a layer (an entry of a
`ModuleList` / `Sequential`, of any class, see `_candidates`) become checkpoint regions;
the ops around them (embeddings, head, loss, the root's own code) are *pinned*: they run outside
any checkpoint, so torch keeps what autograd saves there and the plan must SAVE them. A model
without layer stacks is cut at module boundaries; one decorated layer class is one region,
planned op by op.
"""

from __future__ import annotations

import dataclasses

import torch

from remat_kit._core.graph import CostGraph, OpKind, Role, Value
from remat_kit._core.simulate import simulate
from remat_kit._torch._trace import Profile


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str  # block name in the graph: the layer's module path, or "pre" / "post" / "between.k"
    module: str | None  # module path whose forward is the checkpoint region; None = pinned
    start: int  # first op index
    stop: int  # one past the last op index


def candidate_layers(root: torch.nn.Module) -> list[str]:
    """Module paths of every unit of every layer stack (profiled as regions)."""
    return list(dict.fromkeys(c for _, children in _candidates(root) for c in children))


def _entries(path: str, mod: torch.nn.Module) -> list[str]:
    """Paths of the modules a caller can call among `mod`'s entries, in order: `None` entries
    skipped, nested ModuleLists / ModuleDicts (which have no forward) flattened. x-transformers
    keeps each sublayer as ModuleList([ModuleList([norm, None, None]), block, residual])."""
    out = []
    for name, child in mod.named_children():
        p = f"{path}.{name}" if path else name
        out.extend(_entries(p, child) if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [p])
    return out


def _candidates(root: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(container path, its callable entries) for every ModuleList / Sequential with two or more.

    The entries need not share a class: attention and feed-forward sublayers alternating in one
    list, a mixture-of-experts layer every other layer, Gemma's local / global layers, or no
    repetition at all are all chains of regions to the planner. Which entries really run once
    each, in order, is read from the profile (`segment`).
    """
    found = []
    for path, mod in root.named_modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            entries = _entries(path, mod)
            if len(entries) >= 2:
                found.append((path, entries))
    return found


def _owner_segments(profile: Profile, children: list[str], by_stack: bool = False) -> list[Segment] | None:
    """Segments if every child runs once, in order, as one contiguous run of ops; else None.

    A child's ops are those its `forward` runs (`op.regions`, recorded for candidate layers), or
    with `by_stack` those inside its module call (`op.stack`, recorded for every module; the
    same ops for a module without hooks of its own)."""
    if any(profile.module_calls.get(c, 0) != 1 for c in children):
        return None
    child_set = set(children)
    owners = []
    for op in profile.ops:
        owners.append(next((p for p in (op.stack if by_stack else op.regions) if p in child_set), None))
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            segments.append(Segment(owners[start] or "", owners[start], start, i))
            start = i
    seen = [s.module for s in segments if s.module is not None]
    if seen != [c for c in children if c in seen] or len(seen) != len(set(seen)):
        return None  # a layer's ops interleave with another's: not a chain
    # Name the pinned runs by where they sit.
    named, num_between = [], 0
    first = next((k for k, s in enumerate(segments) if s.module is not None), len(segments))
    last = max((k for k, s in enumerate(segments) if s.module is not None), default=-1)
    for k, s in enumerate(segments):
        if s.module is None:
            label = "pre" if k < first else "post" if k > last else f"between.{num_between}"
            num_between += label.startswith("between")
            s = dataclasses.replace(s, name=label)
        named.append(s)
    return named


# Layer stacks are taken when they run at least this share of the forward's ops; below it (a
# feed-forward Sequential inside one block, say) the module chain covers more of the model.
MIN_STACK_SHARE = 0.5


def segment(root: torch.nn.Module, profile: Profile, *, whole_model: bool = True) -> list[Segment]:
    """Split the profiled ops into checkpoint regions and pinned runs.

    Every layer stack (a ModuleList / Sequential, see `_candidates`) whose entries run once each,
    in order, contributes its entries, largest first, skipping stacks nested in (or around) one
    already taken: T5's encoder and decoder stacks are both regions (with the decoder's alone, the
    encoder's activations were pinned and its floor was 0.60 of no remat instead of 0.38). A stack
    is passed over for a stack inside one of its entries that runs half its ops or more (a
    Sequential of embedding, encoder and head, around the encoder's layers).

    With no stack running MIN_STACK_SHARE of the ops, a `whole_model` is cut at module
    boundaries (`_module_chain`); otherwise (one decorated layer class) it is one region.
    """
    n = len(profile.ops)
    cands = _candidates(root)
    first_op: dict[str, int] = {}
    for op in profile.ops:
        for p in op.regions:
            first_op.setdefault(p, op.index)
    covered = {}
    for path, children in cands:
        cs = set(children)
        covered[path] = sum(1 for op in profile.ops if any(p in cs for p in op.regions))
    valid = {path for path, children in cands if covered[path] and _owner_segments(profile, children) is not None}
    taken: list[str] = []
    layers: list[str] = []
    best: list[Segment] | None = None
    # Largest first (GPT-2's `h`, Llama's `layers`), then any other stack beside it.
    for path, children in sorted(cands, key=lambda c: -covered[c[0]]):
        if path not in valid or any(_nested(path, t) for t in taken):
            continue
        if any(_inside(inner, path) and 2 * covered[inner] >= covered[path] for inner in valid):
            continue
        trial = sorted(layers + children, key=lambda c: first_op.get(c, n))
        segs = _owner_segments(profile, trial)
        if segs is not None:
            taken.append(path)
            layers, best = trial, segs
    if best is not None and sum(s.stop - s.start for s in best if s.module is not None) >= MIN_STACK_SHARE * n:
        return best
    if whole_model:
        chain = _module_chain(root, profile)
        if chain is not None:
            return chain
    if best is not None:
        return best
    # No layers: the whole forward is one region, planned op by op.
    return [Segment("model", "", 0, n)] if n else []


def _module_chain(root: torch.nn.Module, profile: Profile) -> list[Segment] | None:
    """The forward cut at module boundaries: the root's entries (None skipped, lists flattened)
    that run once each, in order, as regions, the code between them pinned; an entry running
    most of the forward is replaced by its own entries while they still make a chain."""

    def usable(path: str) -> bool:
        mod = root.get_submodule(path)
        # Ops in a module's own hooks sit inside its call but outside the forward a region runs.
        return profile.module_calls.get(path, 0) == 1 and not (
            mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
        )

    units = [u for u in _entries("", root) if usable(u)]
    best = _owner_segments(profile, units, by_stack=True) if units else None
    while best is not None:
        big = max((s for s in best if s.module is not None), key=lambda s: s.stop - s.start, default=None)
        if big is None or 2 * (big.stop - big.start) < len(profile.ops):
            break
        inner = [u for u in _entries(big.module, root.get_submodule(big.module)) if usable(u)]
        k = units.index(big.module)
        trial = units[:k] + inner + units[k + 1 :]
        segs = _owner_segments(profile, trial, by_stack=True) if inner else None
        if segs is None:
            break
        units, best = trial, segs
    if best is None or sum(s.module is not None for s in best) < 2:
        return None
    return best


def _inside(a: str, b: str) -> bool:
    """Module path a is strictly inside b ("" is the root)."""
    return a != b and (not b or a.startswith(b + "."))


def _nested(a: str, b: str) -> bool:
    """Module path a is b, inside b, or around b ("" is the root, around everything)."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


HELD = "held-by-caller"  # the value standing for the code that holds what regions return
EMPTY = "no-activation-in:"  # the value standing for a layer that makes none (see _mark_empty_segments)


def _held_by_callers(profile: Profile, segments: list[Segment], values: list[Value]) -> list[Value]:
    """A last value reading what each region's forward returned besides its output's consumers.

    A region's own ops free what its plan does not keep, but what its forward *returns* is held
    by the caller: x-transformers' attention returns an Intermediates dataclass (k, v, the
    attention maps before and after softmax), and its Decoder holds them while later layers run.
    Read by this value, at the end of the forward, such values are boundaries to the planner:
    kept from their forward (as the caller keeps them) until the backward begins, or until their
    own backward if it reads them. That is an upper bound where the caller drops them sooner.
    (Without it x-transformers' decoder measured 0.42 of no remat at a plan predicted at 0.28.)
    """
    block_of = {v.name: v.block for v in values if v.is_activation}
    # Read by its own block only: a value a later block reads is a boundary already, and one no
    # op reads is a graph output (kept until its block's backward).
    readers: dict[str, set[int]] = {}
    for v in values:
        if v.is_activation:
            for d in v.deps:
                readers.setdefault(d, set()).add(v.block)
    held: list[str] = []
    for k, seg in enumerate(segments):
        if not seg.module:
            continue
        held.extend(n for n in profile.returned.get(seg.module, ()) if block_of.get(n) == k and readers.get(n) == {k})
    if not held:
        return []
    last = max(block_of.values())
    return [
        Value(
            name=HELD,
            num_bytes=0,
            role=Role.ACTIVATION,
            kind=OpKind.OTHER,
            flops=0,
            deps=tuple(dict.fromkeys(held)),
            bwd_reads=(),
            bytes_moved=0,
            module="",
            block=last,
            requires_grad=False,
        )
    ]


def _no_remat_peak(values: list[Value]) -> int:
    """No remat's activation peak: every value in one block, so none is a layer boundary.

    The planner keeps a boundary (a value a later layer reads) from its forward to the backward,
    as a recompute of that layer needs it; without remat nothing is recomputed, and autograd
    frees a value no backward reads after its last forward read. HF T5 computes its relative
    position bias in the first layer and every layer reads it: kept as a boundary, no remat was
    predicted 3.4% above its measurement, so the budget's byte limit was as much too loose (a
    plan at 0.7 measured 0.7028)."""
    one = [dataclasses.replace(v, block=0) if v.block else v for v in values]
    return simulate(CostGraph(one, block_names=["model"])).activation_bytes


def _holds_within_blocks(values: list[Value]) -> list[Value]:
    """`values` with each one's holds (the inputs of a module call it ends) kept only where the
    input is an activation of its own block: a layer's input from the block before is kept for
    the layer's recompute and backward anyway, and the planner measures a block apart from the
    values of other blocks."""
    block_of = {v.name: v.block for v in values if v.is_activation}
    out = []
    for v in values:
        if v.holds:
            v = dataclasses.replace(v, holds=tuple(h for h in v.holds if block_of.get(h) == v.block))
        out.append(v)
    return out


def _mark_empty_segments(values: list[Value], segments: list[Segment]) -> list[Value]:
    """`values` with a zero-byte activation in each segment that made none, placed in forward order.

    A layer whose ops make only views or nothing at all (HF ResNet's classifier `Flatten`) is a
    segment without values; the planner's blocks each need one. The placeholder has no readers,
    so it is an output: always kept, never recomputed, nothing to plan, and the layer stays as is.
    """
    made = {v.block for v in values if v.is_activation}
    missing = [k for k in range(len(segments)) if k not in made]
    if not missing:
        return values
    out: list[Value] = []
    pending = iter(missing)
    k = next(pending, None)
    for v in [*values, None]:
        while k is not None and (v is None or (v.is_activation and v.block > k)):
            out.append(
                Value(
                    name=f"{EMPTY}{segments[k].name}",
                    num_bytes=0,
                    role=Role.ACTIVATION,
                    kind=OpKind.OTHER,
                    flops=0,
                    block=k,
                    requires_grad=False,
                )
            )
            k = next(pending, None)
        if v is not None:
            out.append(v)
    return out


@dataclasses.dataclass(frozen=True)
class TorchGraph:
    graph: CostGraph  # the truth: real FLOPs
    solver_graph: CostGraph  # pinned values priced so high that a solver never recomputes them
    segments: tuple[Segment, ...]
    pinned: frozenset[str]  # activations of pinned segments
    baseline_bytes: int = 0  # no remat's activation peak, without what callers hold (see build_graph)


def build_graph(profile: Profile, segments: list[Segment]) -> TorchGraph:
    seg_of_op = [0] * len(profile.ops)
    for k, s in enumerate(segments):
        for i in range(s.start, s.stop):
            seg_of_op[i] = k
    values: list[Value] = []
    pinned: set[str] = set()
    for v in profile.values:
        if v.is_activation:
            k = seg_of_op[profile.value_op[v.name]]
            v = dataclasses.replace(v, block=k)
            if segments[k].module is None:
                pinned.add(v.name)
        values.append(v)
    values = _holds_within_blocks(values)
    last = max((v.block for v in values if v.is_activation), default=-1)
    values = _mark_empty_segments(values, segments[: last + 1])
    names = [s.name for s in segments[: last + 1]]
    # No remat's peak as the budget's measure: what callers hold counts only until its last op,
    # a lower bound of the step's (so a plan's upper bound under budget x it holds as measured).
    baseline = _no_remat_peak(values)
    values += _held_by_callers(profile, segments, values)
    graph = CostGraph(values, block_names=names)
    # Recomputing one pinned value must cost more than recomputing everything else together. An
    # op's roofline cost max(f/P, b/B) is at most f/P + b/B, so all of them together cost at most
    # 2 max(sum f / P, sum b / B): twice the sums is enough, and keeps the DP's int64 sums of costs
    # far from overflowing on large models (a 7B-parameter stack at seq 4096 overflowed at 1000x).
    big_flops = 2 * sum(v.flops for v in values) + 1
    big_bytes = 2 * sum(v.bytes_moved for v in values) + 1
    priced = [dataclasses.replace(v, flops=big_flops, bytes_moved=big_bytes) if v.name in pinned else v for v in values]
    return TorchGraph(graph, CostGraph(priced, block_names=names), tuple(segments), frozenset(pinned), baseline)
