"""The examples in README.md and docs/*.md run as written.

Every ```python (or ```py) block runs in a fresh process in a temporary directory, unless the line
before its fence marks it `<!-- not-run: REASON -->` (a fragment that uses the reader's model, a
model too large for CI). The reason is required, and an unmarked block that is not run cannot
exist: every block is either run here or carries its marker, so none is skipped silently.
Blocks with the same text (the README's quick starts repeat the guides') run once.
See docs/contributing.md.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON_LANGS = {"python", "py", "python3"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    code: str
    not_run: str | None  # the marker's reason, or None: the block runs

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def blocks_of(text: str, path: str) -> list[Block]:
    """Fenced code blocks at the start of a line (indented ones in lists too), nested fences kept
    inside their outer block: a fence closes only on a line of the same character, at least as
    long, with nothing after it (CommonMark)."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, indent = m["ticks"], len(m["indent"])
        lang = (m["info"].split() or [""])[0].lower()
        close = re.compile(rf"^[ \t]*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1 : j])
        marker = _NOT_RUN.match(lines[i - 1]) if i > 0 else None
        found.append(
            Block(path, i + 1, j + 1, lang, textwrap.dedent(body) + "\n", marker["reason"] if marker else None)
        )
        i = j + 1
    return found


def documented_files() -> list[pathlib.Path]:
    docs = ROOT / "docs"
    # docs/reports links to reports/ (benchmark output, no examples): not searched.
    pages = sorted(p for p in docs.rglob("*.md") if "reports" not in p.relative_to(docs).parts) if docs.is_dir() else []
    return [ROOT / "README.md", *pages]


def all_blocks() -> list[Block]:
    return [b for p in documented_files() for b in blocks_of(p.read_text(), str(p.relative_to(ROOT)))]


def runnable_blocks() -> list[Block]:
    """The blocks to run: Python, not marked, each distinct text once (its first place)."""
    seen, out = set(), []
    for b in all_blocks():
        if b.lang in PYTHON_LANGS and b.not_run is None and b.code not in seen:
            seen.add(b.code)
            out.append(b)
    return out


RUNNABLE = runnable_blocks()


def test_readme_has_runnable_examples():
    assert any(b.path == "README.md" for b in RUNNABLE)


def test_every_not_run_marker_sits_on_a_python_block():
    # A marker before a bash block, or one whose block was later deleted, would mark nothing.
    for path in documented_files():
        lines = path.read_text().splitlines()
        blocks = blocks_of(path.read_text(), "")
        fences = {b.line - 1: b for b in blocks}
        inside = {n for b in blocks for n in range(b.line, b.end + 1)}  # an example of a marker is no marker
        for n, line in enumerate(lines, start=1):
            if n not in inside and _NOT_RUN.match(line):
                block = fences.get(n)
                assert block is not None and block.lang in PYTHON_LANGS, (
                    f"{path.relative_to(ROOT)}:{n}: a not-run marker must be the line right before a ```python fence"
                )


def test_parser_finds_marked_nested_and_indented_blocks():
    text = textwrap.dedent("""\
        <!-- not-run: a fragment -->
        ```python
        model = ...
        ```
        - item

          ```py
          print(1)
          ```
        ````markdown
        ```python
        inner()
        ```
        ````
        """)
    blocks = blocks_of(text, "x.md")
    assert [(b.lang, b.code, b.not_run) for b in blocks] == [
        ("python", "model = ...\n", "a fragment"),
        ("py", "print(1)\n", None),
        ("markdown", "```python\ninner()\n```\n", None),
    ]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_example_runs(block, tmp_path):
    proc = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"example at {block.where} failed (a fragment that cannot run as written gets "
        f"`<!-- not-run: REASON -->` on the line before its fence):\n{block.code}\n{proc.stderr[-3000:]}"
    )


def test_api_reference_lists_every_public_name():
    # A name added to remat_kit.__all__ gets its entry in docs/api.md (`::: remat_kit.NAME`), so the
    # reference written from the docstrings is the whole public API.
    import remat_kit

    listed = set(re.findall(r"^::: remat_kit\.(\w+)\s*$", (ROOT / "docs" / "api.md").read_text(), flags=re.M))
    assert not set(remat_kit.__all__) - listed, f"add to docs/api.md: {sorted(set(remat_kit.__all__) - listed)}"
    assert not listed - set(remat_kit.__all__), (
        f"not public, remove from docs/api.md: {sorted(listed - set(remat_kit.__all__))}"
    )
