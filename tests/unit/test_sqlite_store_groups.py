"""``SqlStore`` on SQLite runs a batch's reservations and recorded payments as one statement
each (``OperationGroup``); a replayed token among them makes the batch run one by one. The
answers must be those of the operations run one at a time."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cardseal.errors import TokenError
from cardseal.storage.migrate import upgrade
from cardseal.storage.sql import SqlStore, new_payment_id
from cardseal.storage.sqlite_writer import SqliteWriter
from tests.scale.test_storage_postgres import answer_lost_with_its_check, payment_row
from tests.unit.test_sqlite_writer import in_one_batch

EXPIRES = 4_000_000_000


@pytest.fixture
def database(tmp_path: Path) -> str:
    path = tmp_path / "gateway.db"
    upgrade(f"sqlite:///{path}")
    return str(path)


def batch(database: str, operations: Callable[[SqlStore], list[Awaitable[object]]],
          before: Callable[[SqlStore], Awaitable[None]] | None = None) -> list[object]:
    """``operations`` of one store, all in one batch of its writer (after ``before``)."""
    store = SqlStore(url=f"sqlite:///{database}")
    writer = store._writer
    assert isinstance(writer, SqliteWriter)
    try:
        if before is not None:
            asyncio.run(before(store))
        return in_one_batch(writer, lambda: operations(store))
    finally:
        asyncio.run(store.close())


def query(database: str, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as conn:
        return sorted(conn.execute(sql).fetchall())


def test_one_token_reserved_three_times_in_one_batch_is_reserved_once(database: str) -> None:
    results = batch(database, lambda store: [
        store.reserve_token("a" * 64, EXPIRES), store.reserve_token("b" * 64, EXPIRES),
        store.reserve_token("a" * 64, EXPIRES), store.reserve_token("a" * 64, EXPIRES)])
    ids = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, TokenError)]
    assert len(ids) == 2 and isinstance(results[1], str)
    assert [r.code for r in refused] == ["token_replayed", "token_replayed"]
    assert query(database, "SELECT replay_id, payment_id, state FROM used_tokens") == sorted([
        ("a" * 64, next(i for i in ids if i != results[1]), "pending"),
        ("b" * 64, results[1], "pending")])


def test_a_token_given_back_is_reserved_again_under_its_payment_id(database: str) -> None:
    first: list[str] = []

    async def give_back(store: SqlStore) -> None:
        first.append(await store.reserve_token("a" * 64, EXPIRES))
        await store.release_token("a" * 64)

    results = batch(database, lambda store: [
        store.reserve_token("b" * 64, EXPIRES), store.reserve_token("a" * 64, EXPIRES),
        store.reserve_token("c" * 64, EXPIRES)], before=give_back)
    assert results[1] == first[0]
    assert all(isinstance(r, str) and r.startswith("pay_") for r in results)
    assert [row[2] for row in query(database, "SELECT * FROM used_tokens")] == ["pending"] * 3


def test_a_payment_the_ledger_holds_already_is_refused_alone(database: str) -> None:
    rids = ["a" * 64, "b" * 64, "c" * 64]

    async def reserve_and_pay_b(store: SqlStore) -> None:
        for rid in rids:
            await store.reserve_token(rid, EXPIRES)
        await store.record_payment(payment_row(new_payment_id(), "b" * 64))

    rows = [payment_row(new_payment_id(), rid) for rid in rids]
    results = batch(database, lambda store: [store.record_payment(row) for row in rows],
                    before=reserve_and_pay_b)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], TokenError) and results[1].code == "token_replayed"
    assert query(database, "SELECT id FROM payments WHERE replay_id != '" + "b" * 64 + "'") == \
        sorted([(rows[0]["id"],), (rows[2]["id"],)])
    assert [row[0] for row in query(database, "SELECT state FROM used_tokens")] == ["done"] * 3


def test_payments_of_one_batch_are_recorded_and_their_tokens_done(database: str) -> None:
    rids = [f"{n:064x}" for n in range(20)]

    async def reserve(store: SqlStore) -> None:
        for rid in rids:
            await store.reserve_token(rid, EXPIRES)

    rows = [payment_row(new_payment_id(), rid) for rid in rids]
    assert batch(database, lambda store: [store.record_payment(row) for row in rows],
                 before=reserve) == [None] * 20
    assert len(query(database, "SELECT id FROM payments")) == 20
    assert {row[0] for row in query(database, "SELECT state FROM used_tokens")} == {"done"}


def test_a_retry_finds_the_payment_its_lost_run_recorded(database: str) -> None:
    async def scenario() -> None:
        store = SqlStore(url=f"sqlite:///{database}")
        try:
            await answer_lost_with_its_check(store)
        finally:
            await store.close()

    asyncio.run(scenario())
