"""``SqliteWriter``: one thread, one connection, group commit; failures stay contained."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, event, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cardseal.errors import StorageError, TokenError
from cardseal.storage.sql import _sqlite_begin, _sqlite_pragmas
from cardseal.storage.sqlite_writer import OperationGroup, SqliteWriter

metadata = MetaData()
rows = Table("rows", metadata, Column("n", Integer, primary_key=True))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path}/w.db")
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def stored(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(rows.c.n)).scalars())


def insert(n: int) -> Callable[[Connection], int]:
    def work(conn: Connection) -> int:
        conn.execute(rows.insert().values(n=n))
        return n
    return work


def run_alone(writer: SqliteWriter, work: Callable[[Connection], object]) -> object:
    """``work``'s result, or the exception it ended with; the writer closed after."""
    async def scenario() -> object:
        try:
            return await writer.run(work)
        except Exception as err:  # the outcome under test
            return err
        finally:
            await writer.close()

    return asyncio.run(scenario())


async def queued(writer: SqliteWriter, count: int) -> None:
    """Wait until ``count`` operations wait in the writer's queue."""
    for _ in range(1000):
        if writer._jobs.qsize() >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the operations never queued")


def test_what_queues_meanwhile_commits_in_one_transaction(engine: Engine) -> None:
    writer = SqliteWriter(engine)
    gate = asyncio.Event()

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        opened = loop.create_future()

        def first(conn: Connection) -> str:  # holds the writer until 49 more have queued
            loop.call_soon_threadsafe(opened.set_result, None)
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
            return "first"

        head = asyncio.ensure_future(writer.run(first))
        await opened
        rest = [asyncio.ensure_future(writer.run(insert(n))) for n in range(49)]
        await queued(writer, 49)
        gate.set()
        results = await asyncio.gather(head, *rest)
        await writer.close()
        return results

    assert asyncio.run(scenario()) == ["first", *range(49)]
    assert (writer.batches, writer.operations) == (2, 50)  # 49 rows, one commit
    assert stored(engine) == list(range(49))


def test_batches_are_bounded(engine: Engine) -> None:
    writer = SqliteWriter(engine, max_batch=4)

    async def scenario() -> None:
        await asyncio.gather(*(writer.run(insert(n)) for n in range(10)))
        await writer.close()

    asyncio.run(scenario())
    assert stored(engine) == list(range(10))
    assert writer.batches >= 3  # at most 4 per transaction


def test_a_contract_error_fails_its_operation_alone(engine: Engine) -> None:
    writer = SqliteWriter(engine)

    def refused(conn: Connection) -> None:
        raise TokenError(code="token_replayed")

    async def scenario() -> list[object]:
        results = await asyncio.gather(writer.run(insert(1)), writer.run(refused),
                                       writer.run(insert(2)), return_exceptions=True)
        await writer.close()
        return list(results)

    first, error, second = asyncio.run(scenario())
    assert (first, second) == (1, 2)
    assert isinstance(error, TokenError) and error.code == "token_replayed"
    assert stored(engine) == [1, 2]


def test_a_database_error_fails_the_whole_batch_and_the_next_one_works(engine: Engine) -> None:
    writer = SqliteWriter(engine)

    async def scenario() -> tuple[list[object], int]:
        # insert(1) twice in one batch: the primary key refuses the second, which rolls
        # back the first as well.
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()
        opened = loop.create_future()

        def hold(conn: Connection) -> None:
            loop.call_soon_threadsafe(opened.set_result, None)
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)

        head = asyncio.ensure_future(writer.run(hold))
        await opened
        batch = [asyncio.ensure_future(writer.run(work))
                 for work in (insert(1), insert(1), insert(2))]
        await queued(writer, 3)
        gate.set()
        await head
        results: list[object] = list(await asyncio.gather(*batch, return_exceptions=True))
        after = await writer.run(insert(3))
        await writer.close()
        return results, after

    results, after = asyncio.run(scenario())
    for result in results:
        assert isinstance(result, StorageError) and result.code == "storage_unavailable"
        assert isinstance(result.__cause__, IntegrityError)
    assert after == 3
    assert stored(engine) == [3]  # nothing of the failed batch landed


def test_a_bug_in_an_operation_is_its_own_error_and_fails_the_batch(engine: Engine) -> None:
    writer = SqliteWriter(engine, max_batch=1)

    def broken(conn: Connection) -> None:
        conn.execute(rows.insert().values(n=7))
        raise ValueError("bug")

    assert isinstance(run_alone(writer, broken), ValueError)
    assert stored(engine) == []  # its write was rolled back


def test_a_closed_writer_starts_again(engine: Engine) -> None:
    writer = SqliteWriter(engine)

    async def scenario() -> None:
        await writer.run(insert(1))
        await writer.close()
        await writer.run(insert(2))
        await writer.close()

    asyncio.run(scenario())
    assert stored(engine) == [1, 2]


def test_max_batch_is_bounded(engine: Engine) -> None:
    with pytest.raises(ValueError):
        SqliteWriter(engine, max_batch=0)


def test_an_error_of_the_driver_itself_is_storage_unavailable(engine: Engine) -> None:
    writer = SqliteWriter(engine)

    def raw(conn: Connection) -> None:  # as the store's lean statements run
        driver: Any = conn.connection.driver_connection
        driver.execute("INSERT INTO rows (n) VALUES (1)")
        driver.execute("INSERT INTO rows (n) VALUES (1)")

    error = run_alone(writer, raw)
    assert isinstance(error, StorageError) and isinstance(error.__cause__, sqlite3.IntegrityError)
    assert stored(engine) == []


def test_writers_sharing_a_file_take_turns_on_the_file_lock(
    engine: Engine, tmp_path: Path
) -> None:
    lock = str(tmp_path / "w.db-writer.lock")
    first, second = SqliteWriter(engine, lock_path=lock), SqliteWriter(engine, lock_path=lock)

    async def scenario() -> None:
        await asyncio.gather(*(writer.run(insert(n)) for n in range(300)
                               for writer in ((first,) if n % 2 else (second,))))
        await first.close()
        await second.close()

    asyncio.run(scenario())
    assert stored(engine) == list(range(300))  # every write landed, none waited out a timeout
    assert Path(lock).exists()


def test_a_writer_waits_for_its_turn(engine: Engine, tmp_path: Path) -> None:
    lock = str(tmp_path / "w.db-writer.lock")
    writer = SqliteWriter(engine, lock_path=lock)
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process's writer, mid-transaction

    async def scenario() -> tuple[bool, int]:
        pending = asyncio.ensure_future(writer.run(insert(1)))
        await asyncio.sleep(0.2)
        waited = not pending.done() and stored(engine) == []
        fcntl.flock(holder, fcntl.LOCK_UN)
        result = await pending
        await writer.close()
        return waited, result

    try:
        assert asyncio.run(scenario()) == (True, 1)
    finally:
        os.close(holder)
    assert stored(engine) == [1]


def test_what_queues_while_a_writer_waits_for_its_turn_joins_its_batch(
    engine: Engine, tmp_path: Path
) -> None:
    lock = str(tmp_path / "w.db-writer.lock")
    writer = SqliteWriter(engine, lock_path=lock)
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process's writer, mid-transaction

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(writer.run(insert(0)))
        for _ in range(1000):  # the writer took it, and now waits for the lock
            if writer._jobs.qsize() == 0 and writer._thread is not None:
                break
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(writer.run(insert(n))) for n in range(1, 10)]
        await queued(writer, 9)
        fcntl.flock(holder, fcntl.LOCK_UN)
        results = await asyncio.gather(first, *rest)
        await writer.close()
        return results

    try:
        assert asyncio.run(scenario()) == list(range(10))
    finally:
        os.close(holder)
    assert (writer.batches, writer.operations) == (1, 10)  # one turn, one commit
    assert stored(engine) == list(range(10))


# -- operation groups --------------------------------------------------------------------------


class Rows(OperationGroup[int, int]):
    """Writes its items as rows in one statement and answers twice each; a negative item
    needs handling of its own (as a replayed token): alone, it is refused."""

    def __init__(self) -> None:
        self.together: list[list[int]] = []
        self.alone: list[int] = []

    def run_all(self, conn: Connection, items: Sequence[int]) -> list[int] | None:
        self.together.append(list(items))
        conn.execute(rows.insert(), [{"n": abs(n)} for n in items])  # before it knows
        if any(n < 0 for n in items):
            return None
        return [2 * n for n in items]

    def run_one(self, conn: Connection, item: int) -> int:
        self.alone.append(item)
        if item < 0:
            raise TokenError(code="token_replayed")
        conn.execute(rows.insert().values(n=item))
        return 2 * item


def in_one_batch(writer: SqliteWriter,
                 operations: Callable[[], list[Awaitable[object]]]) -> list[object]:
    """The outcomes of ``operations``, all queued while the writer is held, so that one batch
    takes them all; the writer closed after."""
    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        gate, opened = asyncio.Event(), loop.create_future()

        def hold(conn: Connection) -> None:
            loop.call_soon_threadsafe(opened.set_result, None)
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)

        head = asyncio.ensure_future(writer.run(hold))
        await opened
        pending = [asyncio.ensure_future(op) for op in operations()]
        await queued(writer, len(pending))
        gate.set()
        await head
        results = list(await asyncio.gather(*pending, return_exceptions=True))
        await writer.close()
        return results

    return asyncio.run(scenario())


def test_a_group_runs_its_operations_of_a_batch_together(engine: Engine) -> None:
    writer, group = SqliteWriter(engine), Rows()
    results = in_one_batch(writer, lambda: [
        writer.run_grouped(group, 1), writer.run(insert(100)), writer.run_grouped(group, 2),
        writer.run_grouped(group, 3)])
    assert results == [2, 100, 4, 6]
    assert group.together == [[1, 2, 3]] and group.alone == []
    assert (writer.batches, writer.operations) == (2, 5)
    assert stored(engine) == [1, 2, 3, 100]


def test_a_group_that_asks_for_it_runs_one_by_one_after_a_rollback(engine: Engine) -> None:
    writer, group = SqliteWriter(engine), Rows()
    results = in_one_batch(writer, lambda: [
        writer.run_grouped(group, 1), writer.run(insert(100)), writer.run_grouped(group, -3),
        writer.run_grouped(group, 4)])
    assert results[0:2] == [2, 100] and results[3] == 8
    assert isinstance(results[2], TokenError) and results[2].code == "token_replayed"
    assert group.together == [[1, -3, 4]] and group.alone == [1, -3, 4]
    # What the batch wrote before the group asked is gone: row 3 never landed, and the other
    # operation of the batch (run again) landed once.
    assert stored(engine) == [1, 4, 100]
    assert writer.batches == 2


def test_a_bug_in_a_group_is_its_operations_own_error(engine: Engine) -> None:
    class Broken(Rows):
        def run_all(self, conn: Connection, items: Sequence[int]) -> list[int] | None:
            raise ValueError("bug")

    writer = SqliteWriter(engine)
    group = Broken()
    results = in_one_batch(writer, lambda: [
        writer.run_grouped(group, 1), writer.run(insert(100)), writer.run_grouped(group, 2)])
    assert isinstance(results[0], ValueError) and isinstance(results[2], ValueError)
    assert isinstance(results[1], StorageError)
    assert stored(engine) == []
