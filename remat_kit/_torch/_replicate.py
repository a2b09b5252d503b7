"""Profile a long chain of identical layers from four of them.

Profiling dispatches every op of the forward through FakeTensorMode and the recorder (about
1 ms per op on a CPU core: 3,000 ops for a 48-layer GPT take seconds), yet the layers of a
repeated stack produce the same op records up to their module paths. So when a container holds
N >= MIN_LAYERS children that are *identical* (same classes, parameter and buffer shapes, plain
attributes; an int attribute equal to the child's index, like Hugging Face's `layer_idx`, is
allowed to differ), the forward runs once with the container cut to four of them (first, two
middle, last) and the profile of all N is written out from that one:

    full layer 0      = layer 0 as profiled
    full layer j      = layer 1 with its paths renamed (1 -> j, 0 -> j-1), for 1 <= j <= N-2
    full layer N-1    = layer 3 renamed (3 -> N-1, 2 -> N-2, 1 -> N-3), and so is the epilogue.

Profiled layer 2 is the check: it must equal layer 1 renamed (1 -> 2, 0 -> 1) in every field
(ops, value names, bytes, FLOPs, saved-for-backward reads, RNG / in-place flags, output shapes).
A forward that cannot run on the cut container, any op between layers, or any difference in the
check gives None, and the caller profiles the whole forward. What the check cannot see (a layer
that behaves differently only at some index > 3) is still caught when the plan runs: the replay
refuses a different op sequence and `auto` re-plans from a full profile.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from remat_kit._core.graph import Value
from remat_kit._torch._graph import _candidates, _owner_segments, candidate_layers
from remat_kit._torch._trace import AUTOCAST_TAG, OpRecord, Profile, profile, state_values

MIN_LAYERS = 8  # below this the saving is small next to the solve
_PROFILED = 4


def profile_replicated(
    root: torch.nn.Module, args: tuple, kwargs: dict, *, call: Any = None, real_prologue: bool = False
) -> Profile | None:
    """A fake-tensor profile of `root` built from four of its repeated layers, or None."""
    found = _identical_container(root)
    if found is None:
        return None
    path, container = found
    n = len(container)
    children = list(container._modules.items())
    keep = [0, 1, 2, n - 1]
    saved = container._modules
    container._modules = OrderedDict((str(k), children[i][1]) for k, i in enumerate(keep))
    try:
        small = profile(
            root, args, kwargs, fake=True, call=call, layers=_layer_paths(root), real_prologue=real_prologue
        )
    except Exception:  # the forward needs all its layers (indexes them by a config count, say)
        return None
    finally:
        container._modules = saved
    prefix = f"{path}." if path else ""
    return _expand(small, root, prefix, [name for name, _ in children])


def _layer_paths(root: torch.nn.Module) -> list[str]:
    return candidate_layers(root)


def _identical_container(root: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The largest repeated-layer container whose children are all alike, if long enough."""
    best = None
    for path, _ in _candidates(root):
        container = root.get_submodule(path) if path else root
        if len(container) < MIN_LAYERS or (best is not None and len(container) <= len(best[1])):
            continue
        # The cut container holds four of its entries in place: every entry must be a layer
        # (x-transformers' lists hold None entries; a None would be cut in as a layer).
        if any(m is None for m in container._modules.values()):
            continue
        if _alike([_describe(m) for m in container]):
            best = (path, container)
    return best


def _alike(described: list[list[tuple[tuple, Any]]]) -> bool:
    """Same items in every layer, each equal in all layers or an int that counts the layers
    (a layer index: i + c in layer i)."""
    first = described[0]
    if any(len(d) != len(first) or [k for k, _ in d] != [k for k, _ in first] for d in described):
        return False
    for pos, (_, v0) in enumerate(first):
        column = [d[pos][1] for d in described]
        if all(v == v0 for v in column):
            continue
        if not all(type(v) is int for v in column) or len({v - i for i, v in enumerate(column)}) != 1:
            return False
    return True


def _describe(layer: torch.nn.Module) -> list[tuple[tuple, Any]]:
    """What two layers must share for one to stand for the other in a profile."""
    items: list[tuple[tuple, Any]] = []
    for sub_path, mod in layer.named_modules():
        items.append(((sub_path, "<class>"), type(mod).__qualname__))
        for key, v in sorted(mod.__dict__.items()):
            if key.startswith("_") or key == "forward":
                continue
            if v is None or isinstance(v, (bool, int, float, str)):
                items.append(((sub_path, key), v))
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
                items.append(((sub_path, key), tuple(v)))
            else:
                items.append(((sub_path, key), type(v).__qualname__))
        for k, p in mod.named_parameters(recurse=False):
            items.append(((sub_path, "param", k), (tuple(p.shape), p.dtype, p.requires_grad, p.device.type)))
        for k, b in mod.named_buffers(recurse=False):
            items.append(((sub_path, "buffer", k), (tuple(b.shape), b.dtype, b.device.type)))
        items.append(
            ((sub_path, "<hooks>"), (len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks)))
        )
    return items


# -- writing out the full profile -------------------------------------------------------------
def _split(path: str, prefix: str) -> tuple[int, str] | None:
    """(child index, rest of the path) for a module path inside the container at `prefix`."""
    if not path.startswith(prefix):
        return None
    head, _, rest = path[len(prefix) :].partition(".")
    return (int(head), rest) if head.isdigit() else None


def _module_part(name: str) -> tuple[str, str, str]:
    """A value name as (tag, module path, rest): "param:" + path, or path + "/aten.mm.0"."""
    for tag in (f"{AUTOCAST_TAG}param:", "param:", "buffer:"):
        if name.startswith(tag):
            return tag, name[len(tag) :], ""
    module, slash, rest = name.partition("/")
    return ("", module, slash + rest) if slash else ("", "", name)


def _layer_index(name: str, prefix: str) -> int | None:
    """The child of the container that a value name (or module path) belongs to."""
    _, path, _ = _module_part(name)
    hit = _split(path or name, prefix)
    return None if hit is None else hit[0]


def _renamer(prefix: str, names: list[str], mapping: dict[int, int]) -> Callable[[str], str]:
    """Renames module paths (and names built from them) of profiled layer k to full layer mapping[k]."""

    def path_(path: str) -> str:
        hit = _split(path, prefix)
        if hit is None or hit[0] not in mapping:
            return path
        k, rest = hit
        new = f"{prefix}{names[mapping[k]]}"
        return f"{new}.{rest}" if rest else new

    def name_(name: str) -> str:
        tag, path, rest = _module_part(name)
        return tag + path_(path) + rest if path else name

    name_.path = path_  # type: ignore[attr-defined]
    return name_


def _render(
    ops: list[OpRecord],
    intro: dict[int, list[Value]],
    ren: Callable[[str], str],
    index_of: Callable[[int], int | None],
    start: int,
) -> tuple[list[OpRecord], list[Value]]:
    """Ops (and the values each introduces) renamed, re-indexed from `start`."""
    path = ren.path  # type: ignore[attr-defined]
    out_ops, out_values = [], []
    for k, op in enumerate(ops):
        creator = None if op.creator is None else index_of(op.creator)
        out_ops.append(
            dataclasses.replace(
                op,
                index=start + k,
                module=path(op.module),
                stack=tuple(path(p) for p in op.stack),
                regions=tuple(path(p) for p in op.regions),
                outputs=tuple(None if o is None else ren(o) for o in op.outputs),
                inputs=tuple(ren(i) for i in op.inputs),
                creator=creator,
            )
        )
        for v in intro.get(op.index, ()):
            out_values.append(
                dataclasses.replace(
                    v,
                    name=ren(v.name),
                    deps=tuple(ren(d) for d in v.deps),
                    bwd_reads=tuple(ren(r) for r in v.bwd_reads),
                    holds=tuple(ren(h) for h in v.holds),
                    module=path(v.module),
                )
            )
    return out_ops, out_values


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the four profiled layers and the code around them sit among the small profile's ops."""

    span: dict[int, range]  # profiled layer k -> its op indexes
    pre: range | None  # the prologue's ops, if any
    post: range | None  # the epilogue's ops, if any

    def ops(self, small: Profile, k: int) -> list[OpRecord]:
        return small.ops[self.span[k].start : self.span[k].stop]

    def full_starts(self, n: int) -> tuple[list[int], int]:
        """Where full layer j starts in the full profile, and where its last layer ends."""
        n_pre = len(self.pre) if self.pre is not None else 0
        len0, len1, len3 = (len(self.span[k]) for k in (0, 1, 3))
        starts = [n_pre, n_pre + len0] + [n_pre + len0 + (j - 1) * len1 for j in range(2, n)]
        return starts, starts[n - 1] + len3

    def index_map(self, mapping: dict[int, int], starts: list[int], after: int) -> Callable[[int], int | None]:
        """Op index in the small profile -> in the rendered one: profiled layer k lands at
        starts[mapping[k]] (layer 0 at starts[0] unless mapped), the epilogue from `after`."""
        span = self.span

        def index_of(i: int) -> int | None:
            for k, r in span.items():
                if i in r:
                    j = mapping.get(k, 0 if k == 0 else None)
                    return None if j is None else starts[j] + (i - r.start)
            return i if i < span[0].start else after + (i - span[3].stop)

        return index_of


def _expand(small: Profile, root: torch.nn.Module, prefix: str, names: list[str]) -> Profile | None:
    lay = _layout(small, prefix)
    if lay is None:
        return None
    found = _introductions(small)
    if found is None:
        return None
    head, intro = found
    if not _check_passes(small, lay, intro, prefix):
        return None
    ops, values = _written_out(small, lay, intro, prefix, names)
    mutated, calls, returned = _spread(small, prefix, names)
    return Profile(
        ops=ops,
        values=state_values(root) + head + values,
        value_op={o: op.index for op in ops for o in op.outputs if o is not None},
        mutated_later=mutated,
        module_calls=calls,
        returned=returned,
        fake=small.fake,
        replicated_from=_PROFILED,
        real_prologue=small.real_prologue,
    )


def _layout(small: Profile, prefix: str) -> _Layout | None:
    profiled = [f"{prefix}{k}" for k in range(_PROFILED)]
    segs = _owner_segments(small, profiled)
    if segs is None or [s.module for s in segs if s.module is not None] != profiled:
        return None
    if any(s.name.startswith("between") for s in segs):
        return None  # the root runs ops between layers: its own op names would not repeat
    layer = {s.module: s for s in segs if s.module is not None}
    pre = next((range(s.start, s.stop) for s in segs if s.name == "pre"), None)
    post = next((range(s.start, s.stop) for s in segs if s.name == "post"), None)
    return _Layout({k: range(layer[p].start, layer[p].stop) for k, p in enumerate(profiled)}, pre, post)


def _introductions(small: Profile) -> tuple[list[Value], dict[int, list[Value]]] | None:
    """The values before the first activation (inputs, constants), and per op index the values
    it introduces: its outputs, and the constants it was the first to read."""
    state_names = {v.name for v in small.values if v.name.startswith(("param:", "buffer:"))}
    flow = [v for v in small.values if v.name not in state_names]
    first_act = next((i for i, v in enumerate(flow) if v.name in small.value_op), len(flow))
    intro: dict[int, list[Value]] = {}
    first_reader: dict[str, int] = {}
    for op in small.ops:
        for name in op.inputs:
            first_reader.setdefault(name, op.index)
    for v in flow[first_act:]:
        at = small.value_op.get(v.name, first_reader.get(v.name))
        if at is None:
            return None
        intro.setdefault(at, []).append(v)
    return flow[:first_act], intro


def _check_passes(small: Profile, lay: _Layout, intro: dict[int, list[Value]], prefix: str) -> bool:
    """Profiled layer 2 is profiled layer 1 renamed 1 -> 2, 0 -> 1: ops, values, in-place writes."""
    check = {1: 2, 0: 1}
    ren_check = _renamer(prefix, [str(i) for i in range(_PROFILED)], check)
    small_starts = [lay.span[k].start for k in range(_PROFILED)]
    check_ops, check_values = _render(
        lay.ops(small, 1), intro, ren_check, lay.index_map(check, small_starts, lay.span[3].stop), lay.span[2].start
    )
    want_ops = lay.ops(small, 2)
    want_values = [v for op in want_ops for v in intro.get(op.index, ())]
    if check_ops != want_ops or check_values != want_values:
        return False
    return {ren_check(m) for m in _mutated(small, prefix, 1)} == _mutated(small, prefix, 2)


def _stretch_maps(n: int) -> tuple[list[dict[int, int]], dict[int, int]]:
    """Profiled layer -> full layer for each middle layer (from profiled layer 1), and for the
    last layer and the epilogue (from profiled layer 3)."""
    return [{1: j, 0: j - 1} for j in range(1, n - 1)], {3: n - 1, 2: n - 2, 1: n - 3}


def _written_out(
    small: Profile, lay: _Layout, intro: dict[int, list[Value]], prefix: str, names: list[str]
) -> tuple[list[OpRecord], list[Value]]:
    """The full profile's ops and the values they introduce: the prologue and layer 0 as
    profiled, the middle layers from profiled layer 1, the last layer and the epilogue from
    profiled layer 3."""
    middle, last = _stretch_maps(len(names))
    stretches: list[tuple[list[OpRecord], dict[int, int]]] = []
    if lay.pre is not None:
        stretches.append((small.ops[lay.pre.start : lay.pre.stop], {}))
    stretches.append((lay.ops(small, 0), {0: 0}))
    stretches += [(lay.ops(small, 1), mapping) for mapping in middle]
    stretches.append((lay.ops(small, 3), last))
    if lay.post is not None:
        stretches.append((small.ops[lay.post.start : lay.post.stop], last))
    full_start, end_layers = lay.full_starts(len(names))
    ops: list[OpRecord] = []
    values: list[Value] = []
    for src, mapping in stretches:
        ren = _renamer(prefix, names, mapping)
        new_ops, new_values = _render(src, intro, ren, lay.index_map(mapping, full_start, end_layers), len(ops))
        ops.extend(new_ops)
        values.extend(new_values)
    return ops, values


def _spread(
    small: Profile, prefix: str, names: list[str]
) -> tuple[set[str], dict[str, int], dict[str, tuple[str, ...]]]:
    """`mutated_later`, `module_calls` and `returned` of the full profile: what profiled layer 1
    names stands for every middle layer, layer 3's for the last; layer 2 was the check."""
    middle_maps, last_map = _stretch_maps(len(names))
    middle = [_renamer(prefix, names, mapping) for mapping in middle_maps]
    last = _renamer(prefix, names, last_map)

    def renamers(name: str) -> list[Callable[[str], str]]:
        k = _layer_index(name, prefix)
        if k == 1:
            return middle
        return [] if k == 2 else [last]

    mutated = {ren(name) for name in small.mutated_later for ren in renamers(name)}
    calls = {
        ren.path(path): count  # type: ignore[attr-defined]
        for path, count in small.module_calls.items()
        for ren in renamers(path)
    }
    returned = {
        ren.path(path): tuple(ren(n) for n in outs)  # type: ignore[attr-defined]
        for path, outs in small.returned.items()
        for ren in renamers(path)
    }
    return mutated, calls, returned


def _mutated(small: Profile, prefix: str, k: int) -> set[str]:
    """Names in `mutated_later` that belong to profiled layer k."""
    return {name for name in small.mutated_later if _layer_index(name, prefix) == k}
