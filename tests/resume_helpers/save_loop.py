"""Saves forever, each state internally consistent, so a test can kill -9 it at random moments.

    python tests/resume_helpers/save_loop.py DIR {async,sync}

Every leaf of the state saved as step s is derived from s (see `expected_state`), so a
restore that mixes two steps, or returns a partly written array, is caught by comparing with
`expected_state(step)`. Resumes from DIR's latest step, prints "ready" after its first commit.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def expected_state(step: int) -> dict:
    # ~1.5 MiB over several files, so a kill lands inside a write often.
    return {
        "big": np.full((256, 512), step, np.float32) + np.arange(512, dtype=np.float32),
        "ints": np.arange(step, step + 1000, dtype=np.int64),
        "nested": {"step": step, "half": np.full((64, 64), step, np.float16), "tag": f"s{step}"},
        "items": [step, float(step) / 3],
    }


def main() -> None:
    from remat_kit import resume

    directory, mode = sys.argv[1], sys.argv[2]
    with resume.Resumable(directory, keep=2, async_save=(mode == "async")) as ckpt:
        restored = ckpt.restore_latest()
        step = 0 if restored is None else restored[0] + 1
        ckpt.save(step, expected_state(step))
        ckpt.wait()
        print("ready", step, flush=True)
        while True:
            step += 1
            ckpt.save(step, expected_state(step))


if __name__ == "__main__":
    main()
