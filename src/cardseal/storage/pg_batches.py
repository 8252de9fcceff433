"""Concurrent payments' single-row statements, sent to PostgreSQL as one multi-row statement.

psycopg's cost is per statement, not per row: an ``INSERT ... RETURNING`` of one row took
~115 us of the gateway's CPU, of four rows ~26 us a row, of eight ~15 (measured here against
the local server). So the payment path's two writes, the token's reservation and the payment
with its token's ``done``, go through a ``StatementBatcher`` each: a statement goes out at
once while fewer than ``max_in_flight`` of its kind are on their way, and what arrives
meanwhile leaves together, as one multi-row statement, when one of them comes back (group
commit, as SQLite's writer does with its transactions). At low load a write goes alone and
waits for nothing; under load the batches grow by themselves.

Each caller gets every row its statement returned (``RETURNING``) and looks for its own: a row
that did not go in met another with the same key (a replayed token), and only that caller
handles it. A multi-row statement is one transaction, so it fails whole:

- for the connection's sake (``OperationalError``, the server's statement timeout): every
  caller gets ``StorageError`` and, as for a statement of its own, looks for its row before it
  reports the failure (the answer may have been lost after the commit); when no connection
  could be had (refused, the pool's timeout), ``NothingSentError``: nothing to look for;
- for one row's sake (the server refused a value): every caller gets None and runs its
  statement on its own, so that only the bad row fails.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import psycopg

from cardseal.errors import NothingSentError, StorageError
from cardseal.storage.pg_pool import DriverPool

MAX_ROWS: Final = 64
"""Most rows in one statement (PostgreSQL takes at most 65,535 parameters in one)."""

Rows = frozenset[tuple[Any, ...]]


class StatementBatcher:
    """One kind of single-row statement, sent for concurrent callers as one statement."""

    def __init__(self, pool: DriverPool, sql_for: Callable[[int], str], *,
                 max_in_flight: int = 2, max_rows: int = MAX_ROWS) -> None:
        """``sql_for(n)``: the statement for ``n`` rows, its parameters row after row."""
        if max_in_flight < 1 or not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"max_in_flight >= 1 and max_rows 1..{MAX_ROWS}")
        self._pool = pool
        self._sql_for = sql_for
        self._sql: dict[int, str] = {}
        self._max_in_flight = max_in_flight
        self._max_rows = max_rows
        self._queue: deque[tuple[Sequence[Any], asyncio.Future[Rows | None]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.statements = 0  # sent, and rows in them: for tests and benchmarks
        self.rows = 0

    async def run(self, row: Sequence[Any]) -> Rows | None:
        """Every row returned by the statement that carried ``row`` (its parameters); None
        when the server refused that statement for one of its rows (the caller then runs its
        own statement alone). Raises ``StorageError`` (the database could not answer)."""
        future: asyncio.Future[Rows | None] = asyncio.get_running_loop().create_future()
        self._queue.append((row, future))
        if len(self._tasks) < self._max_in_flight:
            self._send_next()
        return await future

    async def close(self) -> None:
        """Wait for the statements on their way."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _send_next(self) -> None:
        batch: list[tuple[Sequence[Any], asyncio.Future[Rows | None]]] = []
        while self._queue and len(batch) < self._max_rows:
            entry = self._queue.popleft()
            if not entry[1].done():  # a caller cancelled while it waited sends nothing
                batch.append(entry)
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        while self._queue and len(self._tasks) < self._max_in_flight:
            self._send_next()

    async def _send(self, batch: list[tuple[Sequence[Any], asyncio.Future[Rows | None]]]) -> None:
        cause: BaseException | None = None  # the statement failed for the connection's sake
        alone = False  # ...or for a row's
        sent = False  # a connection was had: the statement may have reached the server
        returned: Rows = frozenset()
        try:
            sql = self._sql.get(len(batch))
            if sql is None:
                sql = self._sql[len(batch)] = self._sql_for(len(batch))
            self.statements += 1
            self.rows += len(batch)
            async with self._pool.connection() as conn:
                sent = True
                cursor = await conn.execute(sql, [value for row, _ in batch for value in row])
                returned = frozenset(tuple(found) for found in await cursor.fetchall())
        except (psycopg.OperationalError, OSError, TimeoutError) as err:
            cause = err
        except psycopg.Error:
            alone = True
        except BaseException as err:  # cancelled (the loop stops), or a bug: none waits on
            for _, future in batch:
                if not future.done():
                    future.set_exception(_storage_error(err, sent))
            raise
        for _, future in batch:
            if future.done():  # the caller was cancelled meanwhile
                continue
            if alone:
                future.set_result(None)
            elif cause is not None:
                future.set_exception(_storage_error(cause, sent))  # one per caller
            else:
                future.set_result(returned)


def _storage_error(cause: BaseException, sent: bool) -> StorageError:
    error = StorageError() if sent else NothingSentError()
    error.__cause__ = cause
    return error
