"""psycopg's own connections, in autocommit, for the payment path's statements.

PostgreSQL's payment path is two statements, each its own transaction (``StatementBatcher``,
``SqlStore._first``).
Taken from SQLAlchemy's asyncio pool, each paid for a checkout through greenlets, a
``Connection``, autocommit switched on and off and a reset on return: ~210 us of CPU a
statement against ~120 us for the statement alone on a psycopg connection (measured here
against the local server, one statement after another). Here a statement costs ~140 us.

The pool keeps SQLAlchemy's pool's behaviour where it matters to a gateway, which is why it is
not psycopg_pool's: that one connects in the background, retrying with a growing delay, lets
a request wait out its whole timeout while the server refuses connections, and may catch up
only seconds after the server is back. Here:

- at most ``size`` connections; a request waits for one (at most ``timeout`` seconds, then
  ``TimeoutError``) when all are in use, and the first waiter gets the next one given back;
- a connection is opened when a request needs one and none is idle, so that while the
  server refuses connections a request fails at once (``storage_unavailable``), and the first
  request after it is back connects;
- a connection whose statement failed for the connection's sake (``OperationalError``: the
  server went away, a failover) is closed, and every other one with it (the idle ones at
  once, those in use as they come back), as SQLAlchemy's pool invalidates itself on a
  disconnect: they most likely went down together (``invalidate`` does the same, for the
  store when its SQLAlchemy pool meets a disconnect). Any other error
  (the server refused the statement) leaves the connection usable: in autocommit no
  transaction is left open; so does a statement the server cancelled (its
  ``statement_timeout``, though a ``QueryCanceled`` is an ``OperationalError``). A request
  cancelled in the middle of a statement closes its
  connection, whose state is then unknown;
- a block that holds a connection longer than ``statement_timeout`` seconds has its
  connection's socket shut down (``answer_within``): a statement whose server went silent (a
  dead link, a hung proxy, a stopped host) then fails at once as a lost connection, instead of
  holding the connection and its request for as long as TCP keeps the link up.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg

Connection = psycopg.AsyncConnection[Any]


@contextmanager
def answer_within(conn: Connection, seconds: float) -> Iterator[None]:
    """Shut ``conn``'s socket down if the block has not finished within ``seconds``.

    The statement waiting on it then fails at once with ``OperationalError`` (the server
    closed the connection), as if the link had dropped. Cancelling the statement instead would
    have psycopg send a cancel request and wait for the query's end, up to ~10 s more through
    the same silent link. Only the socket is shut down, on a duplicate of its descriptor:
    psycopg still owns (and closes) the connection.
    """
    timer = asyncio.get_running_loop().call_later(seconds, _shut_down, conn)
    try:
        yield
    finally:
        timer.cancel()


def _shut_down(conn: Connection) -> None:
    if conn.closed:  # psycopg let it go already: its descriptor may be another socket's now
        return
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, psycopg.Error):  # pragma: no cover - closed meanwhile
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # pragma: no cover - no longer connected
        pass
    finally:
        sock.close()


class DriverPool:
    """At most ``size`` autocommit psycopg connections to ``conninfo``, opened on demand."""

    def __init__(self, conninfo: str, *, size: int, timeout: float,
                 connect_timeout: int, statement_timeout: float) -> None:
        if size < 1 or timeout <= 0 or connect_timeout < 1 or statement_timeout <= 0:
            raise ValueError(
                "size >= 1, timeout > 0, connect_timeout >= 1 and statement_timeout > 0")
        self._conninfo = conninfo
        self._size = size
        self._timeout = timeout
        self._statement_timeout = statement_timeout
        self._connect_timeout = connect_timeout
        self._idle: list[Connection] = []  # the last given back is the first taken (warm)
        self._open = 0  # open or being opened, idle or in use
        # Connections opened before the last ``invalidate()`` are closed instead of used.
        self._generation = 0
        self._born: dict[int, int] = {}  # id(connection) -> generation it was opened in
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._closed = False
        self.connects = 0  # connections opened, for tests

    @property
    def open_connections(self) -> int:
        return self._open

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection for the block's statements, for at most ``statement_timeout``
        seconds; given back after it (see the module)."""
        conn = await self._acquire()
        try:
            with answer_within(conn, self._statement_timeout):
                yield conn
        except psycopg.errors.QueryCanceled:  # the server's statement_timeout: a sound session
            await self._give_back(conn)
            raise
        except psycopg.OperationalError:
            await self._discard(conn, flush=True)
            raise
        except psycopg.Error:
            await self._give_back(conn)
            raise
        except BaseException:  # cancelled mid-statement, or a bug: the state is unknown
            await self._discard(conn, flush=False)
            raise
        else:
            await self._give_back(conn)

    def invalidate(self) -> None:
        """Close every connection open now instead of using it again (the server went away:
        a failover, a restart), as SQLAlchemy's pool does on a disconnect. The store calls
        it when its other pool meets a disconnect too."""
        self._generation += 1

    async def close(self) -> None:
        """Close the idle connections now, the others as they are given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for conn in idle:
            self._born.pop(id(conn), None)
            await conn.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _acquire(self) -> Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            if self._closed:
                raise psycopg.OperationalError("the pool is closed")
            if self._idle:
                conn = self._idle.pop()
                if self._born.get(id(conn)) == self._generation:
                    return conn
                await self._discard(conn, flush=False)  # invalidated since it was opened
                continue
            if self._open < self._size:
                return await self._connect()
            waiter: asyncio.Future[Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # handed over as the wait ended
                    late = waiter.result()
                    if late is not None:
                        await self._give_back(late)
                    else:
                        self._wake_one(None)  # the free slot goes to the next in line
                waiter.cancel()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if handed is not None and self._born.get(id(handed)) == self._generation:
                return handed
            if handed is not None:  # invalidated between its hand-over and now
                await self._discard(handed, flush=False)
            # A connection was closed, so this request may open one (loop again).

    async def _connect(self) -> Connection:
        self._open += 1
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=self._connect_timeout)
        except BaseException:
            self._open -= 1
            self._wake_one(None)
            raise
        self.connects += 1
        self._born[id(conn)] = self._generation
        return conn

    async def _give_back(self, conn: Connection) -> None:
        if (self._closed or conn.closed  # ``closed``: also a connection psycopg found broken
                or self._born.get(id(conn)) != self._generation):
            await self._discard(conn, flush=False)
        elif not self._wake_one(conn):
            self._idle.append(conn)

    async def _discard(self, conn: Connection, *, flush: bool) -> None:
        dropped = [conn]
        if flush:
            self.invalidate()  # the connections in use now are closed as they come back
            dropped += self._idle
            self._idle = []
        self._open -= len(dropped)
        for _ in dropped:
            self._wake_one(None)  # each may open a connection of its own
        for each in dropped:
            self._born.pop(id(each), None)
            await each.close()  # no round trip: psycopg only lets the socket go

    def _wake_one(self, conn: Connection | None) -> bool:
        """Hand ``conn`` (or a free slot: None) to the first request still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False
