"""The package's structure: the layer contract holds and catches an upward import, and no
module grows past about 600 lines without saying why."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# "About 600 lines": a module a little over it passes; past this one its docstring must
# say why it is longer than most.
LIMIT = 630


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_tree(dest: Path) -> Path:
    for name in ("difs_p2p", "sim"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_layer_contract_is_kept() -> None:
    """lint-imports (the contracts in pyproject.toml) passes on the package as it is."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        # an upward import hidden under TYPE_CHECKING
        ("errors", "if TYPE_CHECKING:\n    import difs_p2p.peer\n"),
        # two siblings of one layer, which must not import each other
        ("placement", "import difs_p2p.holdings\n"),
        # the package importing the simulator
        ("segments", "import sim.models\n"),
        # kademlia outside the DHT's modules
        ("recordstore", "import kademlia\n"),
    ],
)
def test_the_contract_catches(tmp_path: Path, module: str, line: str) -> None:
    """A copy of the package with one forbidden import fails lint-imports."""
    root = _copy_tree(tmp_path)
    path = root / "difs_p2p" / f"{module}.py"
    source = path.read_text(encoding="utf-8")
    if "TYPE_CHECKING" in line and "import TYPE_CHECKING" not in source:
        line = "from typing import TYPE_CHECKING\n" + line
    path.write_text(source + "\n" + line, encoding="utf-8")
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert f"difs_p2p.{module}" in result.stdout


def _modules() -> list[Path]:
    return sorted([*(ROOT / "difs_p2p").glob("*.py"), *(ROOT / "sim").glob("*.py")])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_long_module_says_why(path: Path) -> None:
    """A module over about 600 lines says in its docstring why it is longer than most."""
    source = path.read_text(encoding="utf-8")
    lines = source.count("\n")
    if lines <= LIMIT:
        return
    doc = ast.get_docstring(ast.parse(source)) or ""
    assert "longer than most" in doc, f"{path.name} has {lines} lines and no reason"
