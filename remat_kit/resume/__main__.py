"""`python -m remat_kit.resume ls DIR [--verify] [--json]`.

Exit codes: 0 every step is complete; 1 some step is incomplete, corrupt or foreign (written by
plain Orbax; the listing says which and why); 2 bad usage, or DIR is missing or not a directory.
"""

from __future__ import annotations

import argparse
import sys

from remat_kit.resume._listing import format_table, list_steps, to_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m remat_kit.resume", description="Inspect remat_kit.resume checkpoint directories."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list steps: status, size, files, creation time, metrics, best")
    ls.add_argument("directory")
    ls.add_argument("--verify", action="store_true", help="read every array back and compare CRC32s (slow)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        infos = list_steps(args.directory, verify=args.verify)
    except (FileNotFoundError, NotADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(infos))
    elif not infos:
        print(f"{args.directory}: no checkpoints")
    else:
        print(format_table(infos))
    return 0 if all(info.status == "complete" for info in infos) else 1


if __name__ == "__main__":
    sys.exit(main())
