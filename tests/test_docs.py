"""Every ```python block of README.md and docs/ runs: the blocks of one page in order, in
one namespace (as a reader pastes them), in a temporary working directory.

A block that cannot run here says so on the line before it, with the reason:
``<!-- not run: needs the Omniglot zips -->``. Blocks that need the Omniglot data run when
the zips are found (``FUNCTIONAL_META_DATA`` or ../shared/data/omniglot) and are skipped
otherwise when marked ``<!-- needs: omniglot -->``; a block marked with a package,
``<!-- needs: torchopt -->``, runs where that package is installed. A block marked
``<!-- save as: name.py -->`` is a file the reader saves: it is written to the working
directory (importable from there), not run. The algorithm registry is restored afterwards.
"""

from __future__ import annotations

import os
import re
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

import functional_meta as fm

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(
    r"(?:<!--\s*(not run|needs|save as):\s*(.*?)\s*-->\s*\n)?```python\n(.*?)```", re.S
)


def omniglot_available() -> bool:
    candidates = [os.environ.get("FUNCTIONAL_META_DATA"), ROOT.parent / "shared/data/omniglot"]
    return any(c and (Path(c) / "images_background.zip").is_file() for c in candidates)


def available(need: str) -> bool:
    """Whether what a ``needs:`` marker names is here: the Omniglot zips, or a package."""
    return omniglot_available() if need == "omniglot" else find_spec(need) is not None


def pages_with_code() -> list[Path]:
    return [page for page in PAGES if "```python" in page.read_text()]


@pytest.mark.parametrize("page", pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_of_a_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = dict(fm.algorithms.REGISTRY)
    if omniglot_available() and not os.environ.get("FUNCTIONAL_META_DATA"):
        monkeypatch.setenv("FUNCTIONAL_META_DATA", str(ROOT.parent / "shared/data/omniglot"))
    namespace: dict = {"__name__": "__docs__"}
    found = BLOCK.findall(page.read_text())
    skipped = []
    try:
        for number, (kind, reason, code) in enumerate(found, start=1):
            if kind == "save as":
                (tmp_path / reason).write_text(code)
                sys.modules.pop(Path(reason).stem, None)
                continue
            if kind == "not run" or (kind == "needs" and not available(reason)):
                skipped.append(f"block {number}: {reason}")
                continue
            try:
                exec(compile(code, f"{page.name} block {number}", "exec"), namespace)
            except Exception as error:
                where = f"{page.relative_to(ROOT)}, python block {number}"
                raise AssertionError(f"{where}: {error!r}") from error
    finally:
        fm.algorithms.REGISTRY.clear()
        fm.algorithms.REGISTRY.update(registry)
    if skipped and len(skipped) == len(found):
        pytest.skip("; ".join(skipped))
