"""A fork server: imports jax, orbax, torch and remat_kit.resume once, then forks a fresh
process per request, so the kill tests can start dozens of real processes in a second each.

Protocol (one line per message on stdin/stdout):
    -> run LOG SCRIPT ARG...     fork; the child sends stdout+stderr to LOG and runs SCRIPT
    <- pid PID
    <- exit PID RETURNCODE       when it ends (negative: killed by that signal, as subprocess)
    -> quit

The server itself never initializes a JAX backend nor runs a torch op (both start threads,
and fork copies only the calling thread); each child initializes its own.
"""

from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import numpy  # noqa: E402,F401
import orbax.checkpoint  # noqa: E402,F401

try:
    import torch  # noqa: F401
except ImportError:
    pass
import remat_kit.resume  # noqa: E402,F401


def child(log: str, script: str, args: list[str]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    print("server ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        _, log, script, *args = words
        pid = os.fork()
        if pid == 0:
            child(log, script, args)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {pid} {code}", flush=True)


if __name__ == "__main__":
    main()
