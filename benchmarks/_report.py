"""Shared helpers for benchmark programs: the machine, the command line, writing reports."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    import numpy
    import scipy

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def command() -> str:
    return (
        "python -m " + shlex.join([__import__("__main__").__spec__.name, *sys.argv[1:]])
        if getattr(__import__("__main__"), "__spec__", None)
        else shlex.join([sys.executable, *sys.argv])
    )


def write(name: str, data: dict[str, Any], markdown: str, out_dir: pathlib.Path | None = None) -> pathlib.Path:
    out = out_dir or ROOT / "reports"
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": command(), "machine": machine(), **data}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = (
        f"{markdown.rstrip()}\n\nProduced by `{data['command']}` on {data['machine']['date']} "
        f"({data['machine']['platform']}, {data['machine']['cpus']} CPUs).\n"
    )
    path = out / f"{name}.md"
    path.write_text(md)
    return path
