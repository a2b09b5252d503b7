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


def test_framework_tests_are_not_collected_without_their_framework(tmp_path):
    """tests/conftest.py leaves out test files whose framework is missing (they import it at the top)
    and says so in pytest's header; the other files are still collected and run."""
    import pathlib
    import shutil

    shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_torch_probe.py").write_text("import torch\n\ndef test_torch():\n    assert torch\n")
    (tmp_path / "test_plain_probe.py").write_text("def test_plain():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's addopts
    proc = run(
        f"""
        import pytest
        sys.exit(pytest.main(["-p", "no:cacheprovider", "-c", {str(tmp_path / "pytest.ini")!r}, {str(tmp_path)!r}]))
        """,
        ("torch",),
    )
    assert "not collected: tests/test_torch_*.py (torch not installed)" in proc.stdout, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and proc.returncode == 0, proc.stdout + proc.stderr
