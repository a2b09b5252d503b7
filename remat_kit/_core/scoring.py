"""Layer scoring: bytes each layer and op kind holds against the cost of recomputing it.

This is the table `explain` prints: where the memory is, and what it costs to give it back.
"""

from __future__ import annotations

import dataclasses

from remat_kit._core.budget import format_bytes
from remat_kit._core.graph import CostGraph, DeviceSpec
from remat_kit._core.plan import Decision, Plan


@dataclasses.dataclass(frozen=True)
class LayerScore:
    module: str  # layer / module path ("" for values outside any module)
    kind: str  # op kind, or "*" for the whole module
    num_values: int
    saved_bytes: int  # bytes held from forward to backward under no remat (residuals)
    recompute_flops: int  # FLOPs to recompute those residuals
    recompute_seconds: float  # time for the same (roofline + per-op overhead)
    kept_bytes: int | None = None  # under `plan`, if one was given
    recomputed_bytes: int | None = None
    offloaded_bytes: int | None = None

    @property
    def bytes_per_flop(self) -> float:
        """Memory given back per FLOP of recompute: the higher, the better a candidate."""
        return self.saved_bytes / self.recompute_flops if self.recompute_flops else float("inf")


def score_layers(
    graph: CostGraph,
    plan: Plan | None = None,
    *,
    by: str = "module",
    device: DeviceSpec | None = None,
) -> list[LayerScore]:
    """Rows of (module, kind) with the bytes they hold and their recompute cost.

    Args:
      graph: the cost graph.
      plan: if given, each row also says how many of its bytes the plan keeps, recomputes, offloads.
      by: "module" (one row per module and kind, plus a "*" total per module), "kind" (one row
        per op kind over the whole graph) or "block" (one row per block).
    """
    if by not in ("module", "kind", "block"):
        raise ValueError(f"score_layers(by={by!r}): pass 'module', 'kind' or 'block'.")
    device = device or DeviceSpec()
    decisions = plan.as_dict() if plan is not None else None
    groups: dict[tuple[str, str], list[int]] = {}
    for i in graph.residuals():
        v = graph.values[i]
        if by == "kind":
            keys = [("*", v.kind.value)]
        elif by == "block":
            keys = [(graph.block_names[v.block], "*")]
        else:
            keys = [(v.module, v.kind.value), (v.module, "*")]
        for key in keys:
            groups.setdefault(key, []).append(i)
    rows = []
    for (module, kind), members in groups.items():
        vals = [graph.values[i] for i in members]
        extra = {}
        if decisions is not None:
            for field, d in (
                ("kept_bytes", Decision.SAVE),
                ("recomputed_bytes", Decision.RECOMPUTE),
                ("offloaded_bytes", Decision.OFFLOAD),
            ):
                extra[field] = sum(v.num_bytes for v in vals if decisions.get(v.name, Decision.SAVE) is d)
        rows.append(
            LayerScore(
                module=module,
                kind=kind,
                num_values=len(vals),
                saved_bytes=sum(v.num_bytes for v in vals),
                recompute_flops=sum(v.flops for v in vals),
                recompute_seconds=sum(device.value_seconds(v) for v in vals),
                **extra,
            )
        )
    first: dict[str, int] = {}
    for n, i in enumerate(graph.residuals()):
        first.setdefault(graph.values[i].module, n)
    rows.sort(key=lambda r: (first.get(r.module, -1), r.kind != "*", -r.saved_bytes))
    return rows


def format_scores(rows: list[LayerScore]) -> str:
    """A plain-text table of score rows (adapters render the same rows with rich)."""
    header = (
        f"{'module':<28} {'kind':<12} {'saved':>10} {'GFLOP':>9} {'bytes/FLOP':>10} {'kept':>10} {'recomputed':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        kept = "" if r.kept_bytes is None else format_bytes(r.kept_bytes)
        rec = "" if r.recomputed_bytes is None else format_bytes(r.recomputed_bytes)
        lines.append(
            f"{r.module[:28]:<28} {r.kind:<12} {format_bytes(r.saved_bytes):>10} {r.recompute_flops / 1e9:>9.3f} "
            f"{r.bytes_per_flop:>10.3g} {kept:>10} {rec:>10}"
        )
    return "\n".join(lines)
