"""`python -m benchmarks.sweep merge DIR... [--out DIR]`: one sweep from the shards' run directories."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from benchmarks import _cells, _outputs


def load(run_dir: pathlib.Path) -> dict:
    path = run_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"merge: {run_dir} has no results.json; run (or finish) the sweep there first.")
    return json.loads(path.read_text())


def merge(dirs: list[pathlib.Path]) -> tuple[list[dict], dict, list[str]]:
    """(rows, meta, ids of planned cells no shard has). Raises ValueError on mixed sweeps or duplicates."""
    runs = [(d, load(d)) for d in dirs]
    base = {k: v for k, v in runs[0][1]["meta"]["config"].items() if k != "shard"}
    rows, seen = [], {}
    for d, run in runs:
        config = {k: v for k, v in run["meta"]["config"].items() if k != "shard"}
        if config != base:
            raise ValueError(
                f"merge: {d} ran other settings than {runs[0][0]} ({config} vs {base}); merge only shards of one sweep."
            )
        for row in run["rows"]:
            if row["cell_id"] in seen:
                raise ValueError(
                    f"merge: cell {row['cell_id']!r} is in both {seen[row['cell_id']]} and {d}; "
                    "were the same shards run twice?"
                )
            seen[row["cell_id"]] = d
            rows.append(row)
    planned = _cells.plan_cells(base["frameworks"], base["models"], base["size"], base["strategies"], base["budgets"])
    order = {c.id: i for i, c in enumerate(planned)}
    rows.sort(key=lambda r: order.get(r["cell_id"], len(order)))
    missing = [c.id for c in planned if c.id not in seen]
    meta = {
        **runs[0][1]["meta"],
        "shard": "",
        "merged_from": [str(d) for d in dirs],
        "command": "python -m benchmarks.sweep merge " + " ".join(str(d) for d in dirs),
    }
    meta["config"] = {**base, "shard": None}
    return rows, meta, missing


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep merge", description=__doc__)
    p.add_argument("dirs", nargs="+", type=pathlib.Path, help="run directories of the shards")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/merged"))
    args = p.parse_args(argv)
    try:
        rows, meta, missing = merge(args.dirs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    paths = _outputs.write_all(args.out.absolute(), rows, meta)
    for cell_id in missing:
        print(f"missing: {cell_id} (no shard ran it)", file=sys.stderr)
    print(f"merged {len(rows)} cells from {len(args.dirs)} runs. Report: {paths['md']}")
    return 1 if missing else 0
