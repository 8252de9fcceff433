"""SQLite's one writer, as one thread with one connection, committing in groups.

SQLite lets one connection write at a time. A pool of connections in one process only queues
on the file lock: each waiter sleeps in ``busy_timeout`` and retries (seen here: p99 over a
second at 32 concurrent payments), and every payment pays its own fsync. ``SqliteWriter`` runs
the process's writes on one connection in one thread instead. It takes whatever is queued (up
to ``MAX_BATCH`` operations) into one transaction and commits once: with ``synchronous=FULL``
one fsync serves every payment of the batch, and no operation is answered before the commit
that holds it (a 201 still survives power loss).

Several gateway processes on one SQLite file (``--workers N``) each have a writer. SQLite's own
wait for the write lock polls with sleeps of 1 to 100 ms, so the writers would take turns
slowly (p99 of a third of a second at two workers). With ``lock_path`` they take turns on an
OS file lock (``flock``) around each transaction instead: the kernel wakes the next writer
the moment the lock is let go. Other programs on the file still get ``busy_timeout``. A writer
fills its batch once its turn has come, not before: what queued while it waited commits with
it. (Measured at two workers, 32 concurrent payments: the lock was held ~95% of the time and
each writer waited for it ~45%; filling after the wait took batches from ~6.5 to ~8.5
operations, one fsync each, and left each writer idle a fifth of the time.)

Each call into SQLite gives up the GIL and must win it back from the event loop, which holds
it under load: measured at 32 concurrent payments, a batch's statements took ~2 ms where
SQLite alone takes ~0.1 ms, and a payment waits for two batches. So operations of one kind
(an ``OperationGroup``: reservations, recorded payments) run as one statement per batch
instead of one each; should any of them need handling of its own (a replayed token), the
batch is rolled back and run again one operation at a time. Grouping reorders a batch, which
is sound: every operation in it was queued before any of them was answered, so they are
concurrent and any order is one they could have run in. (An operation may so run twice, its
first run rolled back: each is a function of the connection alone.)

Each operation is a function of the connection. One that raises a contract error
(``CardsealError``: token_replayed, idempotency_conflict) fails alone; the store's operations
raise those before they write anything. Any other failure (database locked past
``busy_timeout``, disk full, I/O error) rolls the whole batch back: every operation in it gets
``StorageError``, the connection is dropped and the next batch opens a fresh one.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from cardseal.errors import CardsealError, StorageError

MAX_BATCH: Final = 64
"""Most operations in one transaction: bounds the latency one commit adds to its first."""

SQLITE_BUSY_TIMEOUT_MS: Final = 5000
"""How long a write waits for another process's lock before ``storage_unavailable``."""

_T = TypeVar("_T")
_I = TypeVar("_I")
_log = structlog.get_logger("cardseal.storage")


class OperationGroup(Generic[_I, _T]):
    """Operations of one kind that a batch runs together (``SqliteWriter.run_grouped``)."""

    def run_all(self, conn: Connection, items: Sequence[_I]) -> list[_T] | None:
        """Every item's result, in order, when all of them simply go through; None when any
        needs handling of its own (a replayed token): the writer then rolls the batch back and
        runs it again one operation at a time. Any exception fails the batch."""
        raise NotImplementedError

    def run_one(self, conn: Connection, item: _I) -> _T:
        """One item alone: its result, or the contract error that refuses it."""
        raise NotImplementedError


@dataclass(slots=True, eq=False)
class _Job:
    work: Callable[[Connection], Any]  # a grouped job's: its group's ``run_one``
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    group: OperationGroup[Any, Any] | None = None
    item: Any = None
    ok: bool = False
    result: Any = None


def _deliver(jobs: list[_Job]) -> None:
    """Runs on the jobs' event loop: hand each waiting request its answer."""
    for job in jobs:
        if job.future.done():  # the request was cancelled meanwhile
            continue
        if job.ok:
            job.future.set_result(job.result)
        else:
            job.future.set_exception(job.result)


class SqliteWriter:
    """Runs write transactions on one SQLite connection in one thread, several per commit."""

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH,
                 lock_path: str | None = None) -> None:
        if not 1 <= max_batch <= 1024:
            raise ValueError("max_batch must be 1..1024")
        self._engine = engine
        self._lock_path = lock_path
        self._lock_fd: int | None = None
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # transactions committed or rolled back, for tests and benchmarks
        self.operations = 0

    async def run(self, work: Callable[[Connection], _T]) -> _T:
        """``work(connection)`` inside a write transaction; its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._ensure_thread()
        self._jobs.put(_Job(work, future, loop))
        return await future

    async def run_grouped(self, group: OperationGroup[_I, _T], item: _I) -> _T:
        """``item`` run by ``group`` with the other items of its kind in the same batch; its
        result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._ensure_thread()
        self._jobs.put(_Job(lambda conn: group.run_one(conn, item), future, loop, group, item))
        return await future

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="cardseal-sqlite-writer", daemon=True)
                self._thread.start()

    async def close(self) -> None:
        """Finish what is queued, then close the connection and stop the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)
        self._engine.dispose()

    def _serve(self) -> None:
        conn: Connection | None = None
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            conn, stop = self._commit(conn, batch)
            self._answer(batch)
        if conn is not None:
            self._drop(conn)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _fill(self, batch: list[_Job]) -> bool:
        """Move what is queued into ``batch``, up to ``max_batch``; True when that met the
        request to stop (``close``)."""
        while len(batch) < self._max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            batch.append(job)
        return False

    def _take_turn(self) -> None:
        """Wait for this process's turn to write (the file lock), if writers share a file."""
        if self._lock_path is None:
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # the GIL is released while it waits

    def _end_turn(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _commit(self, conn: Connection | None, batch: list[_Job]
                ) -> tuple[Connection | None, bool]:
        """Take this writer's turn, add what is queued by then to ``batch`` and run it in one
        transaction. Return the connection to keep (None after a failure) and whether to stop
        after this batch. Each job's outcome is left on the job."""
        culprits: list[_Job] = []
        stop = False
        try:
            self._take_turn()
            stop = self._fill(batch)
            if conn is None:
                conn = self._engine.connect()
            grouped = True
            while True:
                with conn.begin() as transaction:
                    if self._run_jobs(conn, batch, culprits, grouped=grouped):
                        break  # and commit
                    transaction.rollback()  # a group asked for one operation at a time
                    grouped = False
            return conn, stop
        except Exception as err:  # every failure fails the whole batch, closed
            # sqlite3's own errors too: the payment path runs on the driver connection.
            database = isinstance(err, SQLAlchemyError | sqlite3.Error | OSError | TimeoutError)
            # The type only: a database error's text may quote the statement's parameters.
            _log.warning("sqlite_batch_failed", error=type(err).__name__, operations=len(batch))
            for job in batch:
                if not database and any(job is culprit for culprit in culprits):
                    job.result = err  # a bug in the operation: its own error, unmasked
                else:
                    job.result = StorageError()
                    job.result.__cause__ = err
                job.ok = False
            if conn is not None:
                self._drop(conn)
            return None, stop
        finally:
            self._end_turn()
            self.batches += 1
            self.operations += len(batch)

    @staticmethod
    def _run_jobs(conn: Connection, batch: list[_Job], culprits: list[_Job], *,
                  grouped: bool) -> bool:
        """Run every job of ``batch``, leaving each outcome on its job; False when a group
        asks to be run one operation at a time (nothing of the batch may then be kept).
        ``culprits``: the jobs running at the moment, should an exception escape."""
        groups: dict[OperationGroup[Any, Any], list[_Job]] = {}
        for job in batch:
            if job.group is not None and grouped:
                groups.setdefault(job.group, []).append(job)
                continue
            culprits[:] = [job]
            try:
                job.result, job.ok = job.work(conn), True
            except CardsealError as err:  # the operation's own refusal: it alone
                job.result, job.ok = err, False
        for group, jobs in groups.items():
            culprits[:] = jobs
            results = group.run_all(conn, [job.item for job in jobs])
            if results is None:
                return False
            for job, result in zip(jobs, results, strict=True):
                job.result, job.ok = result, True
        culprits.clear()
        return True

    @staticmethod
    def _drop(conn: Connection) -> None:
        try:
            conn.close()
        except Exception:  # a broken connection may fail to close: forget it
            _log.warning("sqlite_close_failed")

    @staticmethod
    def _answer(batch: list[_Job]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, jobs)
            except RuntimeError:  # that loop is closed: nobody waits for these answers
                pass
