"""Expired single-use records are purged in short transactions, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cardseal.storage.migrate import upgrade
from cardseal.storage.schema import sync_url
from cardseal.storage.sql import SqlStore
from tests.conftest import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NOW = 2_000_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gateway.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url = postgres.create_database("purge")
    upgrade(url)
    return url


def test_a_backlog_of_expired_records_is_purged_in_chunks(url: str) -> None:
    """A long pause leaves many expired records: they go in transactions of at most
    ``chunk`` rows (each short next to the statement timeout, and to the payments waiting
    for SQLite's writer), all of them in one purge; a record not yet expired stays."""
    engine = create_engine(sync_url(url))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO used_tokens (replay_id, payment_id, state, expires_at)"
                          " VALUES (:rid, 'pay_x', 'done', :exp)"),
                     [{"rid": f"{i:064x}", "exp": NOW - 1 - i} for i in range(12)]
                     + [{"rid": f"{i:064x}", "exp": NOW + i - 100} for i in range(100, 103)])

    async def main() -> tuple[int, list[int]]:
        store = SqlStore(url=url)
        sizes: list[int] = []
        run = store._run

        async def counted(work: Callable[[Any], Any]) -> Any:
            result = await run(work)
            sizes.append(result)
            return result

        store._run = counted  # type: ignore[method-assign]
        try:
            return await store.purge_expired_tokens(NOW, chunk=5), sizes
        finally:
            await store.close()

    try:
        purged, sizes = asyncio.run(main())
        assert purged == 12 and sizes == [5, 5, 2]
        with engine.connect() as conn:
            left = conn.execute(text("SELECT expires_at FROM used_tokens")).scalars().all()
        assert sorted(left) == [NOW, NOW + 1, NOW + 2]
    finally:
        engine.dispose()
