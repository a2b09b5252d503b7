"""From a profile to a chain of blocks: find the repeated layers and build the CostGraph.

A *segment* is a contiguous run of ops. Segments that are one call of a repeated layer (a child
of a `ModuleList` / `Sequential` whose children share one class) become checkpoint regions;
the ops around them (embeddings, head, loss, the root's own code) are *pinned*: they run outside
any checkpoint, so torch keeps what autograd saves there and the plan must SAVE them. A module
without repeated layers is one region, planned op by op.
"""

from __future__ import annotations

import dataclasses

import torch

from remat_kit._core.graph import CostGraph, Value
from remat_kit._torch._profile import Profile


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str  # block name in the graph: the layer's module path, or "pre" / "post" / "between.k"
    module: str | None  # module path whose forward is the checkpoint region; None = pinned
    start: int  # first op index
    stop: int  # one past the last op index


def candidate_layers(root: torch.nn.Module) -> list[str]:
    """Module paths of every layer of every repeated-layer container (profiled as regions)."""
    return [c for _, children in _candidates(root) for c in children]


def _candidates(root: torch.nn.Module) -> list[tuple[str, list[str]]]:
    found = []
    for path, mod in root.named_modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) and len(mod) >= 2:
            kinds = {type(child) for child in mod}
            if len(kinds) == 1:
                prefix = f"{path}." if path else ""
                found.append((path, [f"{prefix}{name}" for name, _ in mod.named_children()]))
    return found


def _owner_segments(profile: Profile, children: list[str]) -> list[Segment] | None:
    """Segments if every child runs once, in order, as one contiguous run of ops; else None."""
    if any(profile.module_calls.get(c, 0) != 1 for c in children):
        return None
    child_set = set(children)
    owners = []
    for op in profile.ops:
        owners.append(next((p for p in op.regions if p in child_set), None))
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


def segment(root: torch.nn.Module, profile: Profile) -> list[Segment]:
    """Split the profiled ops into checkpoint regions (repeated layers) and pinned runs.

    Every repeated-layer container whose layers run once each, in order, contributes its layers,
    largest first, skipping containers nested in (or around) one already taken: T5's encoder and
    decoder stacks are both regions (with the decoder's alone, the encoder's activations were
    pinned and its floor was 0.60 of no remat instead of 0.38)."""
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
    taken: list[str] = []
    layers: list[str] = []
    best: list[Segment] | None = None
    # Largest first (GPT-2's `h`, Llama's `layers`), then any other stack beside it.
    for path, children in sorted(cands, key=lambda c: -covered[c[0]]):
        if covered[path] == 0 or any(_nested(path, t) for t in taken):
            continue
        trial = sorted(layers + children, key=lambda c: first_op.get(c, n))
        segs = _owner_segments(profile, trial)
        if segs is not None:
            taken.append(path)
            layers, best = trial, segs
    if best is not None:
        return best
    # No repeated layers: the whole forward is one region, planned op by op.
    return [Segment("model", "", 0, n)] if n else []


def _nested(a: str, b: str) -> bool:
    """Module path a is b, inside b, or around b ("" is the root, around everything)."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


@dataclasses.dataclass(frozen=True)
class TorchGraph:
    graph: CostGraph  # the truth: real FLOPs
    solver_graph: CostGraph  # pinned values priced so high that a solver never recomputes them
    segments: tuple[Segment, ...]
    pinned: frozenset[str]  # activations of pinned segments


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
    last = max((v.block for v in values if v.is_activation), default=-1)
    names = [s.name for s in segments[: last + 1]]
    graph = CostGraph(values, block_names=names)
    # Recomputing one pinned value must cost more than recomputing everything else together. An
    # op's roofline cost max(f/P, b/B) is at most f/P + b/B, so all of them together cost at most
    # 2 max(sum f / P, sum b / B): twice the sums is enough, and keeps the DP's int64 sums of costs
    # far from overflowing on large models (a 7B-parameter stack at seq 4096 overflowed at 1000x).
    big_flops = 2 * sum(v.flops for v in values) + 1
    big_bytes = 2 * sum(v.bytes_moved for v in values) + 1
    priced = [dataclasses.replace(v, flops=big_flops, bytes_moved=big_bytes) if v.name in pinned else v
              for v in values]
    return TorchGraph(graph, CostGraph(priced, block_names=names), tuple(segments), frozenset(pinned))
