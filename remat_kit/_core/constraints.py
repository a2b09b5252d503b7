"""What a plan must respect besides the budget, as an input of every solver.

A framework can run some plans and not others: PyTorch keeps what autograd saves outside any
checkpoint region (those values must be saved), cannot keep a value an in-place op rewrites later
(it must be recomputed), and reruns an op whole, so the outputs of one op share one fate. The
solvers take these as constraints and return a plan that runs as is, instead of a plan patched
afterwards and solved again (STYLE.md habit 12, issue 14).

The constraints speak of what a plan *does* with a value, as the simulator runs it:

* ``must_save``: never recomputed nor offloaded (kept wherever the backward needs it);
* ``must_recompute``: never kept nor offloaded (recomputed wherever the backward needs it);
* ``same_fate``: groups of values of one block; if one member is recomputed, every member the
  backward needs is recomputed too (the op runs, so none is kept beside it).

A value a plan does not need (no backward reads it, no recompute reads it) has no fate, so its
decision is free. Only a graph's free values are constrained: boundaries and outputs are always
kept. Constraints name values, so one object serves a graph, its regrouped segments and the
windows the block menus solve on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence

from remat_kit._core.graph import CostGraph
from remat_kit._core.plan import DecisionCode

SAVE, RECOMPUTE = int(DecisionCode.SAVE), int(DecisionCode.RECOMPUTE)


@dataclasses.dataclass(frozen=True)
class PlanConstraints:
    """Values a plan must save, values it must recompute, and groups of values sharing one fate.

    Attributes:
      must_save: names of values never recomputed nor offloaded.
      must_recompute: names of values never kept nor offloaded.
      same_fate: groups of names (each in one block): if one is recomputed, every member the
        backward needs is recomputed too.
    """

    must_save: frozenset[str] = frozenset()
    must_recompute: frozenset[str] = frozenset()
    same_fate: tuple[frozenset[str], ...] = ()

    def __post_init__(self) -> None:
        for field in ("must_save", "must_recompute"):
            names = getattr(self, field)
            if isinstance(names, str) or not isinstance(names, Iterable):
                raise ValueError(f"PlanConstraints({field}={names!r}): pass a collection of value names.")
            object.__setattr__(self, field, frozenset(names))
        groups = self.same_fate
        if isinstance(groups, str) or not isinstance(groups, Iterable):
            raise ValueError(f"PlanConstraints(same_fate={groups!r}): pass a sequence of groups of value names.")
        cleaned = tuple(frozenset(g) for g in groups if len(frozenset(g)) > 1)
        object.__setattr__(self, "same_fate", tuple(sorted(set(cleaned), key=sorted)))
        both = self.must_save & self.must_recompute
        if both:
            raise ValueError(
                f"PlanConstraints: {sorted(both)[:5]!r} are in both must_save and must_recompute; "
                "a value can be held to one of them only."
            )
        seen: dict[str, frozenset[str]] = {}
        for g in self.same_fate:
            if g & self.must_save and g & self.must_recompute:
                raise ValueError(
                    f"PlanConstraints(same_fate=...): the group {sorted(g)!r} has a value that must be saved "
                    f"({sorted(g & self.must_save)!r}) and one that must be recomputed "
                    f"({sorted(g & self.must_recompute)!r}); no plan can run it."
                )
            for name in g:
                if name in seen:
                    raise ValueError(
                        f"PlanConstraints(same_fate=...): {name!r} is in two groups, {sorted(seen[name])!r} "
                        f"and {sorted(g)!r}; merge them into one."
                    )
                seen[name] = g

    def __bool__(self) -> bool:
        return bool(self.must_save or self.must_recompute or self.same_fate)

    def check(self, graph: CostGraph) -> None:
        """Raise ValueError if a name is not a value of `graph` or a group spans blocks."""
        for field, names in (("must_save", self.must_save), ("must_recompute", self.must_recompute)):
            unknown = sorted(n for n in names if n not in graph._index)
            if unknown:
                raise ValueError(f"constraints: {field} names values the graph does not have: {unknown[:5]!r}.")
        for g in self.same_fate:
            unknown = sorted(n for n in g if n not in graph._index)
            if unknown:
                raise ValueError(f"constraints: same_fate names values the graph does not have: {unknown[:5]!r}.")
            blocks = {graph[n].block for n in g if graph[n].is_activation}
            if len(blocks) > 1 or any(not graph[n].is_activation for n in g):
                raise ValueError(
                    f"constraints: the same_fate group {sorted(g)!r} must hold activations of one block "
                    f"(blocks {sorted(blocks)!r}); a block's recompute cannot run an op of another."
                )

    def on(self, graph: CostGraph) -> BoundConstraints:
        """These constraints as value indices of `graph` (names it lacks are left out: a window
        holds a few blocks of a graph). Cached on the graph."""
        key = ("constraints", self)
        if key not in graph._cache:
            graph._cache[key] = _bind(self, graph)
        return graph._cache[key]


NO_CONSTRAINTS = PlanConstraints()


def _bind(c: PlanConstraints, graph: CostGraph) -> BoundConstraints:
    free = set(graph.free_values)

    def indices(names: Collection[str]) -> frozenset[int]:
        return frozenset(i for n in names if (i := graph._index.get(n)) is not None and i in free)

    groups: list[tuple[int, ...]] = []
    for names in c.same_fate:
        members = tuple(sorted(indices(names)))
        if len(members) > 1:
            groups.append(members)
    by_block: dict[int, list[int]] = {}
    for k, members in enumerate(groups):
        by_block.setdefault(graph.values[members[0]].block, []).append(k)
    return BoundConstraints(
        save=indices(c.must_save),
        recompute=indices(c.must_recompute),
        groups=tuple(groups),
        groups_by_block={b: tuple(ks) for b, ks in by_block.items()},
    )


@dataclasses.dataclass(frozen=True)
class BoundConstraints:
    """`PlanConstraints` as free-value indices of one graph (see `PlanConstraints.on`)."""

    save: frozenset[int]
    recompute: frozenset[int]
    groups: tuple[tuple[int, ...], ...]  # free members of one block, two or more each
    groups_by_block: Mapping[int, tuple[int, ...]] = dataclasses.field(compare=False, hash=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.save or self.recompute or self.groups)

    @property
    def saved_groups(self) -> frozenset[int]:
        """Members of groups that hold a must-save value: no member of such a group is recomputed
        where that member is needed, so plans that recompute by default leave the group kept."""
        return frozenset(i for g in self.groups if any(u in self.save for u in g) for i in g)

    def tags(self, graph: CostGraph, blk: int) -> tuple:
        """What the constraints say about block `blk`, relative to its first value: blocks with the
        same structure and the same tags can share one option menu."""
        members = graph.block_members[blk]
        if not self or not members:
            return ()
        base = members[0]
        marks = tuple((i - base, 1 if i in self.save else 2) for i in members if i in self.save or i in self.recompute)
        groups = tuple(tuple(i - base for i in self.groups[k]) for k in self.groups_by_block.get(blk, ()))
        return (marks, groups)

    def violation(self, graph: CostGraph, codes: Mapping[int, int], members: Sequence[int]) -> str | None:
        """Why decision codes (value index -> code, SAVE where absent) break these constraints on
        the values `members` (a block's, in forward order), or None where they are honoured."""
        needed, recomputed = _needed(graph, members, codes)
        for i in members:
            code = codes.get(i, SAVE)
            if i in self.save and code != SAVE:
                return f"{graph.values[i].name!r} must be saved, the plan has {DecisionCode(code).decision.value}"
            if i in self.recompute and needed.get(i) and code != RECOMPUTE:
                return f"{graph.values[i].name!r} must be recomputed, the plan has {DecisionCode(code).decision.value}"
        for k in self._groups_of(graph, members):
            g = self.groups[k]
            if any(recomputed.get(u) for u in g):
                held = [u for u in g if needed.get(u) and codes.get(u, SAVE) != RECOMPUTE]
                if held:
                    names = [graph.values[u].name for u in g]
                    return f"the group {names!r} shares one fate, but {graph.values[held[0]].name!r} is not recomputed"
        return None

    def settle(self, graph: CostGraph, codes: Mapping[int, int], members: Sequence[int]) -> dict[int, int] | None:
        """The least change of a heuristic plan's codes on `members` that honours the constraints:
        must-save values saved, must-recompute values recomputed, then every needed member of a
        group with a recomputed member recomputed; None where a must-save value would have to be
        recomputed. For plans built by rule (keep all, full recompute, whole layers), not for a
        solver's answer, which honours the constraints as it comes. Monotone (codes only turn to
        RECOMPUTE), so it settles in at most one round per member."""
        out = {i: c for i, c in codes.items() if c != SAVE}
        member_set = set(members)
        for i in self.save & member_set:
            out.pop(i, None)
        for i in self.recompute & member_set:
            out[i] = RECOMPUTE
        groups = self._groups_of(graph, members)
        if not groups:
            return out
        for _ in range(len(members) + 1):
            needed, recomputed = _needed(graph, members, out)
            changed = False
            for k in groups:
                g = self.groups[k]
                if not any(recomputed.get(u) for u in g):
                    continue
                for u in g:
                    if needed.get(u) and out.get(u, SAVE) != RECOMPUTE:
                        if u in self.save:
                            return None
                        out[u], changed = RECOMPUTE, True
            if not changed:
                return out
        raise RuntimeError("PlanConstraints.settle did not settle; this is a remat_kit bug")

    def _groups_of(self, graph: CostGraph, members: Sequence[int]) -> list[int]:
        if not self.groups:
            return []
        blocks = {graph.values[i].block for i in members}
        return [k for b in sorted(blocks) for k in self.groups_by_block.get(b, ())]


def _needed(graph: CostGraph, members: Sequence[int], codes: Mapping[int, int]) -> tuple[dict, dict]:
    """The simulator's `needed` and `recomputed` on `members` (one block's values or several
    whole blocks'): a block recomputes only from its own values and kept boundaries, so what it
    needs is settled inside it."""
    needed: dict[int, bool] = {}
    recomputed: dict[int, bool] = {}
    wanted: set[int] = set()
    vals = graph.values
    for i in sorted(members, reverse=True):  # deps come earlier, so one reverse pass closes the set
        if not (graph.is_residual[i] or graph.is_forced[i] or i in wanted):
            continue
        needed[i] = True
        if codes.get(i, SAVE) == RECOMPUTE:
            recomputed[i] = True
            wanted.update(graph._index[d] for d in vals[i].deps)
    return needed, recomputed


def honours(graph: CostGraph, codes: Sequence[int], constraints: PlanConstraints | None) -> str | None:
    """Why a full vector of decision codes for `graph` breaks `constraints` (None: it honours them)."""
    if not constraints:
        return None
    bound = constraints.on(graph)
    sparse = {i: c for i, c in enumerate(codes) if c != SAVE}
    for blk in range(graph.num_blocks):
        why = bound.violation(graph, sparse, graph.block_members[blk])
        if why is not None:
            return why
    return None
