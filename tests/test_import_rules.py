"""Private means private: an AST walk over every module of remat_kit/ and benchmarks/ that fails
on an import across package lines that reaches for a private name.

The rule (STYLE.md habit 14, issue 14 deliverable 1), stated precisely:

Packages. The units are `remat_kit` (its top-level modules: `__init__`, `_auto`, `presets`,
`measure`), `remat_kit._core`, `remat_kit._jax`, `remat_kit._torch`, `remat_kit.resume`,
`benchmarks` and `tests`. A module belongs to the deepest unit that contains it.

1. Library modules (under remat_kit/) importing from another unit may name only public things:
   no imported name starts with `_`, and no part of the module path below the other unit's root
   starts with `_`. So `from remat_kit._core.solve import solve` is fine (the core's modules are
   public inside the package), `from remat_kit._core.solve import _check_solver` is not, and
   `from remat_kit._jax._api import Planner` is not: an adapter offers the rest of the library
   what its package `__init__` exports (`from remat_kit import _jax; _jax.plan_of(...)`).
   The library never imports `benchmarks` or `tests`.
2. The core is the bottom layer: `remat_kit._core` imports no other remat_kit unit, and neither
   jax, torch nor flax (tests/test_import.py checks the second at run time too).
3. Benchmarks are users: from remat_kit they import public modules only (`remat_kit`,
   `remat_kit.presets`, `remat_kit.measure`, `remat_kit.resume`: no path part starting with `_`)
   and no `_` names; what the harness needs to measure lives in `remat_kit.measure`. They never
   import `tests` (test oracles stay on the test side; tests may import benchmarks to test them).
4. Tests may reach into the internals they test: they are not walked.

Dynamic imports by constant string (`importlib.import_module("remat_kit._torch._api")`) count.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = (
    "remat_kit._core",
    "remat_kit._jax",
    "remat_kit._torch",
    "remat_kit.resume",
    "remat_kit",
    "benchmarks",
    "tests",
)
FRAMEWORKS = ("jax", "jaxlib", "torch", "flax")


def unit_of(module: str) -> str | None:
    return next((u for u in UNITS if module == u or module.startswith(u + ".")), None)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    rel = pathlib.Path(*dotted.split("."))
    return (ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()


def imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, "module" or "module:name") for every import in `source`, a module of `package`;
    `from m import sub` where `m.sub` is a module gives "m.sub"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for a in node.names:
                full = f"{base}.{a.name}"
                found.append((node.lineno, full if a.name == "*" or is_module(full) else f"{base}:{a.name}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violation(importer: str, target: str) -> str | None:
    """Why `importer` (a module name) may not import `target` ("module" or "module:name"), or None."""
    module, _, name = target.partition(":")
    mine, theirs = unit_of(importer), unit_of(module)
    if mine == "remat_kit._core":
        if module.split(".")[0] in FRAMEWORKS:
            return "the core imports neither jax nor torch"
        if theirs not in (None, "remat_kit._core"):
            return "the core imports no other remat_kit package"
    if theirs is None or theirs == mine:
        return None
    if theirs == "tests":
        return "only tests import tests"
    if mine != "benchmarks" and theirs == "benchmarks":
        return "the library does not import benchmarks"
    below = module[len("remat_kit") :] if mine == "benchmarks" else module[len(theirs) :]
    if any(part.startswith("_") for part in below.split(".") if part):
        return (
            "benchmarks import public remat_kit modules only (remat_kit, remat_kit.measure, ...)"
            if mine == "benchmarks"
            else f"a private module of {theirs}: import what its package exports"
        )
    if name.startswith("_"):
        return f"a private name of {theirs}"
    return None


def walk() -> dict[str, str]:
    """Every violation under remat_kit/ and benchmarks/: "path: module[.name]" -> why."""
    out = {}
    for top in ("remat_kit", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name.startswith("test_"):  # benchmarks/test_*.py are tests of the benchmarks
                continue
            importer = module_name(path)
            package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
            for line, target in imports(path.read_text(), package):
                why = violation(importer, target)
                if why:
                    out[f"{path.relative_to(ROOT).as_posix()}: {target.replace(':', '.')}"] = f"line {line}: {why}"
    return out


def test_no_private_imports_across_packages():
    new = walk()
    assert not new, (
        "imports across package lines that reach for private names (see this file's docstring):\n"
        + "\n".join(f"  {k} ({v})" for k, v in sorted(new.items()))
    )


def test_the_walk_catches_each_kind():
    """The rule on made-up imports, so the walk cannot pass by matching nothing."""
    assert violation("remat_kit._jax._api", "remat_kit._core.solve:_check_solver")
    assert violation("remat_kit._torch._explain", "remat_kit._jax._api:Planner")
    assert violation("remat_kit._auto", "remat_kit._torch._api")
    assert violation("remat_kit._core.solve", "jax.numpy")
    assert violation("remat_kit._core.solve", "remat_kit._jax")
    assert violation("remat_kit.measure", "benchmarks.models")
    assert violation("benchmarks.jax_bench", "remat_kit._jax._api:Planner")
    assert violation("benchmarks.solver_quality", "tests.test_solvers:_codes_of")
    assert violation("benchmarks.hf_zoo", "remat_kit._core.budget:format_bytes")
    assert violation("benchmarks.sweep", "remat_kit:_auto")
    for ok in [
        ("remat_kit._jax._api", "remat_kit._core.solve:solve"),
        ("remat_kit._auto", "remat_kit._torch"),
        ("remat_kit._jax._explain", "remat_kit._jax._api:_target_kind"),
        ("benchmarks.hf_zoo", "remat_kit.measure"),
        ("benchmarks.sweep", "remat_kit:auto"),
        ("benchmarks.sweep", "benchmarks._cells:_private_helper"),
        ("remat_kit.measure", "remat_kit._core.budget:format_bytes"),
    ]:
        assert violation(*ok) is None, ok


def test_relative_and_module_imports_are_resolved():
    src = (
        "from . import _cells\nfrom remat_kit import _torch\nimport remat_kit._jax._api\n"
        "from remat_kit._core.solve import solve\nimportlib.import_module('remat_kit._torch._api')\n"
    )
    got = [t for _, t in sorted(imports(src, "benchmarks"))]
    assert got == [
        "benchmarks._cells",
        "remat_kit._torch",
        "remat_kit._jax._api",
        "remat_kit._core.solve:solve",
        "remat_kit._torch._api",
    ]
