"""The peer commands' rules: what join removes when it fails."""

from __future__ import annotations

from pathlib import Path

from difs_p2p.cli_peer import missing_ancestor


def test_missing_ancestor(tmp_path: Path) -> None:
    """join removes on failure only the outermost directory it would have created."""
    assert missing_ancestor(tmp_path) is None
    assert missing_ancestor(tmp_path / "a" / "b") == tmp_path / "a"
    (tmp_path / "a").mkdir()
    assert missing_ancestor(tmp_path / "a" / "b") == tmp_path / "a" / "b"
