"""``SqlStore`` on PostgreSQL sends concurrent payments' reservations, and their recorded
payments, as one multi-row statement each (``StatementBatcher``). The answers must be those of
the statements run one at a time, whatever else is in the batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import psycopg
import pytest

from cardseal.errors import StorageError, TokenError
from cardseal.storage.pg_batches import StatementBatcher
from cardseal.storage.sql import SqlStore, new_payment_id, replay_id
from tests.conftest import PostgresServer
from tests.scale.test_storage_postgres import LostCommitAnswers, payment_row, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXPIRES = int(time.time()) + 600


def rid(name: str) -> str:
    return replay_id("payment-service", name)


async def in_one_statement(batcher: StatementBatcher | None,
                           calls: list[Awaitable[Any]]) -> list[Any]:
    """The first of ``calls`` alone, then all the others in one statement; their outcomes."""
    assert batcher is not None
    batcher._max_in_flight = 1  # while the first is on its way, the others queue
    before = batcher.statements
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert batcher.statements - before == 2
    return list(results)


async def assert_reserved_under(store: SqlStore, names: list[str], ids: list[Any]) -> None:
    """The tokens ``names``, and only they, are reserved, each under its id in ``ids``."""
    stored = dict(await rows(store, "SELECT replay_id, payment_id FROM used_tokens"))
    assert stored == {rid(name): i for name, i in zip(names, ids, strict=True)}


async def rows(store: SqlStore, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    assert store.engine is not None
    async with store.engine.connect() as conn:
        driver: psycopg.AsyncConnection[Any] = (
            await conn.get_raw_connection()).driver_connection  # type: ignore[assignment]
        cursor = await driver.execute(sql, params)
        return sorted(await cursor.fetchall())


def test_concurrent_reservations_go_as_one_statement_and_each_gets_its_own_id(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        names = [f"many-{i}" for i in range(21)]
        ids = await in_one_statement(store._reservations, [
            store.reserve_token(rid(name), EXPIRES) for name in names])
        assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 21
        await assert_reserved_under(store, names, ids)

    run(postgres, scenario)


def test_one_token_three_times_in_one_statement_is_reserved_once(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        results = await in_one_statement(store._reservations, [
            store.reserve_token(rid("b"), EXPIRES), store.reserve_token(rid("a"), EXPIRES),
            store.reserve_token(rid("a"), EXPIRES), store.reserve_token(rid("a"), EXPIRES)])
        ids = [r for r in results[1:] if isinstance(r, str)]
        refused = [r for r in results[1:] if isinstance(r, TokenError)]
        assert len(ids) == 1 and [r.code for r in refused] == ["token_replayed"] * 2
        assert await rows(store, "SELECT replay_id, payment_id, state FROM used_tokens") == sorted(
            [(rid("a"), ids[0], "pending"), (rid("b"), results[0], "pending")])

    run(postgres, scenario)


def test_a_token_given_back_is_reserved_again_under_its_payment_id(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        first = await store.reserve_token(rid("back"), EXPIRES)
        await store.release_token(rid("back"))
        results = await in_one_statement(store._reservations, [
            store.reserve_token(rid("other"), EXPIRES),
            store.reserve_token(rid("back"), EXPIRES),
            store.reserve_token(rid("new"), EXPIRES)])
        assert results[1] == first  # the processor sees the same idempotency key
        assert isinstance(results[2], str) and results[2] != first
        with pytest.raises(TokenError):  # pending again: not a third time
            await store.reserve_token(rid("back"), EXPIRES)

    run(postgres, scenario)


def test_payments_of_one_statement_are_recorded_and_their_tokens_done(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        names = [f"pay-{i}" for i in range(6)]
        ids = [await store.reserve_token(rid(name), EXPIRES) for name in names]
        results = await in_one_statement(store._recordings, [
            store.record_payment(payment_row(i, rid(name)))
            for i, name in zip(ids, names, strict=True)])
        assert results == [None] * 6
        assert await rows(store, "SELECT id FROM payments") == sorted((i,) for i in ids)
        assert {s for (s,) in await rows(store, "SELECT state FROM used_tokens")} == {"done"}

    run(postgres, scenario)


def test_a_second_payment_for_one_token_in_the_same_statement_is_refused_alone(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        token = await store.reserve_token(rid("twice"), EXPIRES)
        results = await in_one_statement(store._recordings, [
            store.record_payment(payment_row(new_payment_id(), rid("first"))),
            store.record_payment(payment_row(token, rid("twice"))),
            store.record_payment(payment_row(new_payment_id(), rid("twice")))])
        assert results[:2] == [None, None]
        assert isinstance(results[2], TokenError) and results[2].code == "token_replayed"
        assert await rows(store, "SELECT id FROM payments WHERE replay_id = %s",
                          rid("twice")) == [(token,)]

    run(postgres, scenario)


def test_a_row_the_server_refuses_fails_alone(postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        good = [payment_row(new_payment_id(), rid(f"good-{i}")) for i in range(3)]
        bad = payment_row(new_payment_id(), rid("bad")) | {"currency": "TOO-LONG"}
        results = await in_one_statement(store._recordings, [
            store.record_payment(good[0]), store.record_payment(good[1]),
            store.record_payment(bad), store.record_payment(good[2])])
        assert results[:2] == [None, None] and results[3] is None
        assert isinstance(results[2], StorageError)
        assert await rows(store, "SELECT id FROM payments") == sorted((p["id"],) for p in good)

    run(postgres, scenario)


def test_a_lost_answer_to_a_statement_is_found_by_each_of_its_callers(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, faults: LostCommitAnswers) -> None:
        names = [f"lost-{i}" for i in range(5)]
        faults.lose = 2  # the first statement's answer and the batch's: both committed
        # ...and not the check's, which may commit before the batch goes out
        faults.spare_transactions = True
        ids = await in_one_statement(store._reservations, [
            store.reserve_token(rid(name), EXPIRES) for name in names])
        assert faults.lose == 0
        assert all(isinstance(i, str) for i in ids)
        await assert_reserved_under(store, names, ids)

    run(postgres, scenario)


def test_a_payment_cancelled_while_its_row_waited_sends_nothing(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        assert store._reservations is not None
        store._reservations._max_in_flight = 1
        first, kept, cancelled = (asyncio.create_task(store.reserve_token(rid(name), EXPIRES))
                                  for name in ("first", "kept", "cancelled"))
        await asyncio.sleep(0)  # the first on its way, the two others waiting for it
        cancelled.cancel()
        ids = [await first, await kept]
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await assert_reserved_under(store, ["first", "kept"], ids)
        assert store._reservations.statements == 2

    run(postgres, scenario)


def test_the_batcher_refuses_impossible_bounds() -> None:
    for kwargs in ({"max_in_flight": 0}, {"max_rows": 0}, {"max_rows": 65}):
        with pytest.raises(ValueError):
            StatementBatcher(None, lambda n: "", **kwargs)  # type: ignore[arg-type]
