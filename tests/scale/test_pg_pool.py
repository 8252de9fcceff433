"""``DriverPool`` against the real PostgreSQL server: its bound, its waits, and what each kind of
failure does to its connections (``src/cardseal/storage/pg_pool.py``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from cardseal.storage.pg_pool import DriverPool
from tests.conftest import PostgresServer
from tests.faults.conftest import TcpGate
from tests.scale.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def pool_for(url: str, *, size: int = 2, timeout: float = 5.0,
             statement_timeout: float = 5.0) -> DriverPool:
    return DriverPool(url, size=size, timeout=timeout, connect_timeout=5,
                      statement_timeout=statement_timeout)


@asynccontextmanager
async def opened(url: str, *, size: int = 2, timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> AsyncIterator[DriverPool]:
    """A pool for the block, closed after it."""
    pool = pool_for(url, size=size, timeout=timeout, statement_timeout=statement_timeout)
    try:
        yield pool
    finally:
        await pool.close()


async def backend_pid(pool: DriverPool) -> int:
    async with pool.connection() as conn:
        assert conn.autocommit
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.create_database("pool")


def test_a_burst_shares_the_pools_connections_and_opens_no_more(url: str) -> None:
    async def scenario() -> None:
        async with opened(url, size=3) as pool:
            async def one(i: int) -> Any:
                async with pool.connection() as conn:
                    row = await (await conn.execute("SELECT %s::int, pg_sleep(0.01)",
                                                    (i,))).fetchone()
                    assert pool.open_connections <= 3
                    return row[0] if row else None

            assert await asyncio.gather(*(one(i) for i in range(40))) == list(range(40))
            assert pool.connects == 3  # opened on demand, then shared
            assert pool.open_connections == 3
        assert pool.open_connections == 0

    run(scenario)


def test_a_request_waits_at_most_the_timeout_for_a_connection(url: str) -> None:
    async def scenario() -> None:
        async with opened(url, size=1, timeout=0.3) as pool:
            held = asyncio.Event()
            release = asyncio.Event()

            async def holder() -> None:
                async with pool.connection():
                    held.set()
                    await release.wait()

            task = asyncio.create_task(holder())
            await held.wait()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await backend_pid(pool)
            assert 0.25 < time.monotonic() - started < 2.0
            # The next in line gets the connection given back, not a new one.
            waiting = asyncio.create_task(backend_pid(pool))
            await asyncio.sleep(0.05)
            release.set()
            await task
            await waiting
            assert pool.connects == 1

    run(scenario)


def test_a_statement_the_server_refuses_leaves_the_connection_in_the_pool(url: str) -> None:
    async def scenario() -> None:
        async with opened(url) as pool:
            first = await backend_pid(pool)
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1 / 0")
            assert await backend_pid(pool) == first  # the same session, in autocommit
            assert pool.connects == 1

    run(scenario)


def test_a_statement_the_server_cancelled_leaves_the_connection_in_the_pool(url: str) -> None:
    """The server's ``statement_timeout`` (``QueryCanceled``, an ``OperationalError``) ends a
    statement, not the session: the connection is used again, the others are left alone."""
    async def scenario() -> None:
        async with opened(f"{url}?options=-c%20statement_timeout%3D100") as pool:
            first = await backend_pid(pool)
            with pytest.raises(psycopg.errors.QueryCanceled):
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(2)")
            assert await backend_pid(pool) == first
            assert pool.connects == 1

    run(scenario)


def test_a_lost_connection_closes_the_idle_ones_and_the_next_request_connects(
        postgres: PostgresServer, url: str) -> None:
    async def scenario() -> None:
        async with opened(url, size=2) as pool:
            # Two connections open and idle, both then ended by the server (a failover).
            async def hold_two() -> list[int]:
                async def pid_held(ready: asyncio.Event, go: asyncio.Event) -> int:
                    async with pool.connection() as conn:
                        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
                        ready.set()
                        await go.wait()
                        return int(row[0]) if row else 0
                go = asyncio.Event()
                readies = [asyncio.Event(), asyncio.Event()]
                tasks = [asyncio.create_task(pid_held(r, go)) for r in readies]
                for ready in readies:
                    await ready.wait()
                go.set()
                return list(await asyncio.gather(*tasks))

            pids = await hold_two()
            with postgres.admin() as admin:
                for pid in pids:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(psycopg.OperationalError):
                await backend_pid(pool)  # the first request meets a dead session
            assert pool.open_connections == 0  # ...and the other idle one went with it
            assert await backend_pid(pool) not in pids  # the next request connects
            assert pool.connects == 3

    run(scenario)


def test_while_the_server_refuses_connections_a_request_fails_at_once() -> None:
    gate = TcpGate(("127.0.0.1", 5432))

    async def scenario() -> None:
        async with opened(f"postgresql://postgres@127.0.0.1:{gate.port}/postgres") as pool:
            for _ in range(3):  # no wait for a timeout, no retry in the background
                started = time.monotonic()
                with pytest.raises(psycopg.OperationalError):
                    await backend_pid(pool)
                assert time.monotonic() - started < 1.0
                assert pool.open_connections == 0
            gate.open()
            await backend_pid(pool)  # the first request after the server is back connects
            assert pool.connects == 1

    try:
        run(scenario)
    finally:
        gate.close()


def test_invalidate_closes_the_connections_open_now_instead_of_using_them(url: str) -> None:
    async def scenario() -> None:
        async with opened(url) as pool:
            first = await backend_pid(pool)
            pool.invalidate()
            assert await backend_pid(pool) != first
            assert pool.connects == 2
            assert pool.open_connections == 1

    run(scenario)


def test_a_request_cancelled_mid_statement_closes_its_connection(url: str) -> None:
    async def scenario() -> None:
        async with opened(url) as pool:
            async def slow() -> None:
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(5)")

            task = asyncio.create_task(slow())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.open_connections == 0  # its state unknown: closed, not reused
            await backend_pid(pool)
            assert pool.connects == 2

    run(scenario)


def test_a_statement_whose_server_went_silent_fails_within_the_statement_timeout(
        postgres: PostgresServer, url: str) -> None:
    """A link that goes silent without closing (a dead network, a hung proxy): the statement
    fails as a lost connection once ``statement_timeout`` has passed, instead of holding its
    connection and its request for as long as TCP keeps the link up; its connection is
    closed, and once the link is back the next request connects."""
    proxy = TcpProxy("127.0.0.1", 5432)
    database = url.rsplit("/", 1)[1]

    async def scenario() -> None:
        async with opened(f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}",
                          statement_timeout=0.5) as pool:
            await backend_pid(pool)
            proxy.hang()
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                await backend_pid(pool)
            assert 0.5 <= time.monotonic() - started < 2.0
            assert pool.open_connections == 0
            proxy.up()
            await backend_pid(pool)
            assert pool.connects == 2
            async with pool.connection() as conn:  # a statement within the time is left be
                await conn.execute("SELECT pg_sleep(0.2)")
            assert pool.connects == 2

    try:
        run(scenario)
    finally:
        proxy.close()


def test_a_free_slot_handed_to_a_request_cancelled_meanwhile_goes_to_the_next(url: str) -> None:
    async def scenario() -> None:
        async with opened(url, size=1, timeout=2.0) as pool:
            release = asyncio.Event()

            async def failing_holder() -> None:
                async with pool.connection():
                    await release.wait()
                    raise RuntimeError("a bug in the block: its connection is closed")

            holder = asyncio.create_task(failing_holder())
            await asyncio.sleep(0.05)
            first = asyncio.create_task(backend_pid(pool))
            second = asyncio.create_task(backend_pid(pool))
            await asyncio.sleep(0.05)  # both wait for the one connection
            release.set()
            await asyncio.sleep(0)  # the holder fails: its slot is handed to ``first``...
            first.cancel()  # ...which is cancelled before it runs again
            with pytest.raises(asyncio.CancelledError):
                await first
            started = time.monotonic()
            await second  # the slot went on to the next in line, at once
            assert time.monotonic() - started < 1.0
            with pytest.raises(RuntimeError):
                await holder

    run(scenario)


def test_a_closed_pool_hands_out_nothing(url: str) -> None:
    async def scenario() -> None:
        pool = pool_for(url)
        await backend_pid(pool)
        await pool.close()
        assert pool.open_connections == 0
        with pytest.raises(psycopg.OperationalError):
            await backend_pid(pool)

    run(scenario)


def test_the_pool_refuses_impossible_bounds() -> None:
    for kwargs in ({"size": 0, "timeout": 1.0, "statement_timeout": 1.0},
                   {"size": 1, "timeout": 0.0, "statement_timeout": 1.0},
                   {"size": 1, "timeout": 1.0, "statement_timeout": 0.0}):
        with pytest.raises(ValueError):
            DriverPool("postgresql://", connect_timeout=5, **kwargs)  # type: ignore[arg-type]
