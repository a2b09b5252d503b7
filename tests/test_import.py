"""`import remat_kit` works with jax only, torch only, or neither; the core never imports them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
    sys.meta_path.insert(0, Block())
    """
)


def run(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    script = BLOCK.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "blocked",
    [("jax", "jaxlib", "flax", "orbax", "torch"), ("torch",), ("jax", "jaxlib", "flax", "orbax")],
    ids=["neither", "jax-only", "torch-only"],
)
def test_core_works_without_frameworks(blocked):
    proc = run(
        """
        import remat_kit as rk
        g = rk.transformer_graph(num_layers=2, seq_len=64, batch=1, hidden=32, num_heads=2)
        plan = rk.solve(g, 0.6)
        assert plan.predicted_activation_bytes <= 0.6 * plan.baseline_activation_bytes
        import policies
        print("ok", sorted(m for m in ("jax", "torch") if m in sys.modules))
        """,
        blocked,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"


def test_auto_without_jax_says_what_to_install():
    proc = run(
        """
        import remat_kit as rk
        try:
            rk.auto(lambda p, x: x, budget=0.5)
        except ImportError as e:
            print(e)
        """,
        ("jax", "jaxlib", "flax", "orbax", "torch"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs JAX" in proc.stdout and "pip install 'remat_kit[jax]'" in proc.stdout
