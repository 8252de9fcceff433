"""docs/WYCHEPROOF.md holds exactly the table ``tests/vectors/report.py`` generates."""

from __future__ import annotations

from pathlib import Path

from tests.vectors import report


def test_wycheproof_table_in_the_docs_is_current(wycheproof_dir: Path) -> None:
    """Regenerate with ``.venv/bin/python -m tests.vectors.report --write`` when this fails."""
    assert report.generated_block(wycheproof_dir) in report.DOC.read_text()


def test_every_applicable_vector_passes(wycheproof_dir: Path) -> None:
    rows = report.rows(wycheproof_dir)
    assert [row.name for row in rows if row.applied != row.passed] == []
    assert sum(row.vectors for row in rows) == 1699
