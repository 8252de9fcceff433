"""The gateway's state on SQL (SQLite by default, PostgreSQL by URL), through SQLAlchemy.

``SqlStore`` keeps the ledger, the single-use record of tokens (``SqlReplayStore`` semantics:
reserve, release, spend, and done inside the payment's own transaction), idempotency keys and
API keys. Every database failure becomes ``StorageError`` (storage_unavailable): the gateway
fails closed. When the connection breaks while a reservation or a payment commits, the store
first looks (on a fresh connection) whether the commit landed, so that a payment the ledger holds
is not answered with a 503 (nor its token refused) just because the answer to COMMIT was lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import (
    Select,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.crud import REQUIRED
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from cardseal.errors import NothingSentError, RequestError, StorageError, TokenError
from cardseal.storage.models import api_keys, idempotency_keys, payments, used_tokens
from cardseal.storage.schema import async_url, sync_url
from cardseal.storage.sqlite_writer import (
    SQLITE_BUSY_TIMEOUT_MS,
    OperationGroup,
    SqliteWriter,
)

if TYPE_CHECKING:  # imported where PostgreSQL is used: a SQLite worker never loads them
    from sqlalchemy.ext.asyncio import AsyncEngine

    from cardseal.storage.pg_batches import StatementBatcher
    from cardseal.storage.pg_pool import DriverPool

_T = TypeVar("_T")


class _RandomPool:
    """Bytes of ``os.urandom`` drawn 4 KiB at a time and each handed out once.

    getrandom(2) costs ~15 us a call on the machines this was measured on, most of an id's
    cost on the payment path. The pool is emptied in a forked child, so that two processes
    never hand out the same bytes.
    """

    _CHUNK: Final = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        os.register_at_fork(after_in_child=self._clear)

    def _clear(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""

    def take(self, count: int) -> bytes:
        with self._lock:
            if len(self._buffer) < count:
                self._buffer = os.urandom(max(self._CHUNK, count))
            taken, self._buffer = self._buffer[:count], self._buffer[count:]
            return taken


_IDS = _RandomPool()


class ReservationInDoubtError(StorageError):
    """A reservation whose answer was lost: it may have landed. ``undo`` gives it back if it
    did (and does nothing if it did not), so that the client's retry is not refused; the
    gateway runs it in the background until it gets through."""

    def __init__(self, undo: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self.undo = undo


class _NotLandedError(StorageError):
    """``storage_unavailable`` whose statement is known not to have landed (nothing to look
    for again)."""


def _xact_status(conn: Connection, xid: int) -> str | None:
    """PostgreSQL's word on transaction ``xid``: committed, aborted, in progress, or None
    when it is not in this server's history: too old to remember, or not yet given out (a
    failover to a standby that never saw it; ``txid_status`` would raise, and the id would
    later name another transaction)."""
    try:
        with conn.begin_nested():  # the error leaves the enclosing transaction usable
            value = conn.execute(text("SELECT txid_status(:xid)"), {"xid": xid}).scalar()
    except DBAPIError as err:
        if getattr(err.orig, "sqlstate", None) == _XID_IN_THE_FUTURE:
            return None
        raise
    return None if value is None else str(value)


_XID_IN_THE_FUTURE: Final = "22023"  # txid_status: "transaction ID ... is in the future"


def new_payment_id() -> str:
    """``pay_``, the time in milliseconds since 1970 (12 hex digits, good until 10889) and 96
    random bits in hex.

    Ids in time order land where the last ones did in the payments' primary-key index, so a
    batch of inserts writes the same few pages instead of a random page each: SQLite's
    commit writes every changed page to its WAL (measured here: 10 random keys per commit
    0.40 ms, 10 in order 0.13 ms)."""
    return "pay_" + f"{time.time_ns() // 1_000_000:012x}" + _IDS.take(12).hex()


def replay_id(issuer: str, replay_key: str) -> str:
    """The stored name of a used token: a hash of (issuer, jti), never the token itself."""
    return hashlib.sha256(issuer.encode() + b"\x00" + replay_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class IdempotentReplay:
    """A finished request stored under an idempotency key: replay it byte for byte."""

    status_code: int
    body: str


@dataclass(frozen=True, slots=True)
class IdempotentTakeover:
    """A key found in flight for longer than any request takes (its gateway died mid-request)
    and claimed again by this request, with the same body."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # transactions are ours: BEGIN IMMEDIATE below
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a ledger: a 201 survives power loss
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # Take the write lock up front: a deferred transaction that reads, then writes, fails at
    # once (SQLITE_BUSY_SNAPSHOT, no busy wait) when another process wrote in between. On the
    # driver: SQLAlchemy's execution of a text costs ~20 us, once a batch in the writer.
    _driver(connection).execute("BEGIN IMMEDIATE")


def _driver(conn: Connection) -> Any:
    """The sqlite3 connection under ``conn``."""
    return conn.connection.driver_connection


_POOL_TIMEOUT: Final = 5.0
"""Seconds a request waits for a PostgreSQL connection when all are in use."""
_CONNECT_TIMEOUT: Final = 5
PURGE_CHUNK: Final = 5000
"""Most expired single-use records deleted in one transaction (``purge_expired_tokens``)."""
STATEMENT_TIMEOUT: Final = 5.0
"""Seconds a PostgreSQL transaction (on the payment path: a statement) may go unanswered;
then its connection's socket is shut down (``pg_pool.answer_within``): a silent server or link
fails the request (``storage_unavailable``) instead of holding it and its connection. The
server is told to give up on a statement sooner (``_server_options``), so that one it is
merely slow to run (waiting for a lock) is cancelled there, not left to commit after the
request was answered 503 and its check found nothing."""
_SERVER_SHARE: Final = 0.8
"""The server's ``statement_timeout``, as a share of ``STATEMENT_TIMEOUT``."""


def _server_options(parsed: URL, statement_timeout: float) -> str:
    """libpq ``options`` for every PostgreSQL connection: the URL's own (else ``PGOPTIONS``,
    which libpq reads only when the connection string names no options), then the server's
    ``statement_timeout`` and ``idle_in_transaction_session_timeout`` (last, so that they
    hold: a longer one would let a statement land after the client gave up on it, and a
    session whose link went silent in the middle of a transaction would keep its locks until
    TCP gave up on it, hours later)."""
    given = parsed.query.get("options")
    own = " ".join(given) if isinstance(given, tuple) else (given or os.environ.get(
        "PGOPTIONS", ""))
    milliseconds = max(1, int(statement_timeout * _SERVER_SHARE * 1000))
    return (f"{own} -c statement_timeout={milliseconds}"
            f" -c idle_in_transaction_session_timeout={milliseconds}").strip()


def _multi_row(head: str, columns: int, tail: str) -> Callable[[int], str]:
    """The text of a statement with ``n`` rows of ``columns`` placeholders between ``head``
    and ``tail``. Only placeholders and this module's own table and column names are put
    into the text; every value is bound."""
    row = "(" + ", ".join(["%s"] * columns) + ")"
    return lambda n: head + ", ".join([row] * n) + tail


# PostgreSQL's payment path, for many payments at once (``StatementBatcher``): the same two
# statements as ``_Statements.reserve`` and ``record_done``, with rows in the tables' column
# order and RETURNING what tells each caller whether its row went in.
_RESERVATIONS_SQL: Final = _multi_row(
    f"INSERT INTO used_tokens ({', '.join(c.name for c in used_tokens.c)}) VALUES ",  # noqa: S608
    len(used_tokens.c),
    " ON CONFLICT DO NOTHING RETURNING used_tokens.replay_id, used_tokens.payment_id")
_RECORDINGS_SQL: Final = _multi_row(
    "WITH recorded AS (INSERT INTO payments"  # noqa: S608 - the table's own column names
    f" ({', '.join(c.name for c in payments.c)}) VALUES ",
    len(payments.c),
    " ON CONFLICT DO NOTHING RETURNING payments.id, payments.replay_id),"
    " marked AS (UPDATE used_tokens SET state = 'done' FROM recorded"
    " WHERE used_tokens.replay_id = recorded.replay_id)"
    " SELECT recorded.id FROM recorded")

_SQLITE_MAX_PARAMS: Final = 999  # SQLite's default limit before 3.32


def _chunks(items: Sequence[_T], per_item: int) -> list[Sequence[_T]]:
    """``items`` in runs whose parameters stay within SQLite's limit."""
    size = max(1, _SQLITE_MAX_PARAMS // per_item)
    return [items[i:i + size] for i in range(0, len(items), size)]


class _SqliteRows:
    """A single-row ``INSERT ... VALUES (...) ON CONFLICT DO NOTHING`` compiled once by
    SQLAlchemy for SQLite, run for many rows as one multi-row INSERT on the sqlite3
    connection itself, with SQLAlchemy's own bind processing (its DATETIME text, for one).

    The payment path's writes go this way: SQLAlchemy's execution machinery costs about 30 us
    a statement, five times what SQLite takes, and every call into SQLite is a wait for the GIL
    (``SqliteWriter``): one statement a batch instead of one (or two) a payment.
    """

    def __init__(self, statement: Any, dialect: Any, column_keys: list[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        sql = str(compiled)
        self._slots: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup or ():
            default = compiled.params.get(name)
            process = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            self._slots.append((name, None if default is REQUIRED else default, process))
        head, values_at, rest = sql.partition(" VALUES (")
        row, row_end, tail = rest.partition(")")
        if not values_at or not row_end or tail != " ON CONFLICT DO NOTHING":
            raise ValueError(f"not a single-row INSERT ... ON CONFLICT DO NOTHING: {sql}")
        self._head, self._row, self._tail = head + " VALUES ", "(" + row + ")", tail
        self._sql: dict[int, str] = {}

    def _args(self, params: dict[str, Any]) -> list[Any]:
        args = []
        for name, default, process in self._slots:
            value = params.get(name, default)
            args.append(value if process is None or value is None else process(value))
        return args

    def inserted(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """How many of ``rows`` went in (the others met a row with the same key): sqlite3's
        ``rowcount``, which for an INSERT is SQLite's own count of changed rows."""
        driver = _driver(conn)
        count = 0
        for chunk in _chunks(rows, len(self._slots)):
            sql = self._sql.get(len(chunk))
            if sql is None:  # one text per batch size, cached (and so prepared once)
                sql = self._sql[len(chunk)] = (
                    self._head + ", ".join([self._row] * len(chunk)) + self._tail)
            count += int(driver.execute(sql, [a for row in chunk for a in self._args(row)]
                                        ).rowcount)
        return count


def _mark_done(conn: Connection, rids: Sequence[str]) -> None:
    """Tokens whose payment is recorded: ``done`` (one statement per SQLite's limit)."""
    driver = _driver(conn)
    for chunk in _chunks(rids, 1):
        # Only "?" placeholders are put into the text; the replay ids are bound.
        driver.execute("UPDATE used_tokens SET state = 'done' WHERE replay_id IN ("  # noqa: S608
                       + ", ".join("?" * len(chunk)) + ")", list(chunk))


class _Reservations(OperationGroup[dict[str, Any], str]):
    """A batch's token reservations as one multi-row INSERT; each gives the payment id to
    charge under (``SqlStore.reserve_token``). When a token is known already (replayed, or
    given back for a retry), the batch runs one by one: the known token's reservation is
    taken up again if it was given back, else it is ``token_replayed``."""

    def __init__(self, rows: _SqliteRows, statements: _Statements) -> None:
        self._rows = rows
        self._sql = statements

    def run_all(self, conn: Connection, items: Sequence[dict[str, Any]]) -> list[str] | None:
        if self._rows.inserted(conn, items) != len(items):
            return None
        return [item["payment_id"] for item in items]

    def run_one(self, conn: Connection, item: dict[str, Any]) -> str:
        if self._rows.inserted(conn, [item]) == 1:
            return str(item["payment_id"])
        return self._sql.reserve_again(conn, item["replay_id"])


class _Recordings(OperationGroup[dict[str, Any], None]):
    """A batch's payments as one multi-row INSERT, and their tokens marked done by one
    UPDATE (``SqlStore.record_payment``). When the ledger holds a payment for a token already
    (a replay store outside this database lost its record), the batch runs one by one and
    that payment is ``token_replayed``."""

    def __init__(self, rows: _SqliteRows) -> None:
        self._rows = rows

    def run_all(self, conn: Connection, items: Sequence[dict[str, Any]]) -> list[None] | None:
        if self._rows.inserted(conn, items) != len(items):
            return None
        _mark_done(conn, [item["replay_id"] for item in items])
        return [None] * len(items)

    def run_one(self, conn: Connection, item: dict[str, Any]) -> None:
        if self._rows.inserted(conn, [item]) != 1:
            raise TokenError(code="token_replayed")
        _mark_done(conn, [item["replay_id"]])


class _Compiled:
    """A statement compiled once for psycopg (``%(name)s`` placeholders), with the values of
    its literal parameters: run on the driver connection itself, it skips SQLAlchemy's
    execution machinery, ~0.3 ms of CPU a statement on the async engine (measured here)."""

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self.fixed = {name: bind.value for name, bind in compiled.binds.items()
                      if not bind.required}


class _Statements:
    """The hot statements, built once: SQLAlchemy then skips building and cache-keying a
    statement per call (of a payment's storage CPU, that was most)."""

    def __init__(self, dialect_insert: Callable[[Table], Any], sqlite: Any = None) -> None:
        """``sqlite``: the SQLite dialect, to run the payment path's writes as groups."""
        rid: BindParameter[str] = bindparam("rid")
        # RETURNING tells whether the row went in (an INSERT's rowcount is driver lore).
        self.reserve = dialect_insert(used_tokens).on_conflict_do_nothing().returning(
            used_tokens.c.replay_id)
        self.reserve_released = (
            update(used_tokens)
            .where(used_tokens.c.replay_id == rid, used_tokens.c.state == "released")
            .values(state="pending")
            .returning(used_tokens.c.payment_id))
        self.release = update(used_tokens).where(
            used_tokens.c.replay_id == rid, used_tokens.c.state == "pending",
        ).values(state="released")
        self.spend = update(used_tokens).where(used_tokens.c.replay_id == rid).values(
            state="spent")
        # The payment and its token's "done" as one statement (PostgreSQL runs data-modifying
        # CTEs atomically, and even where nothing selects from them): one round trip in
        # autocommit instead of BEGIN, INSERT, UPDATE, COMMIT. It returns the payment's id
        # only if its row went in; the token's row need not exist (a Redis replay store).
        # (Parameters named apart from the columns: a key named after a column would also
        # set that column in the UPDATE.)
        recorded = (dialect_insert(payments)
                    .values({c.key: bindparam("new_" + c.key) for c in payments.c})
                    .on_conflict_do_nothing()
                    .returning(payments.c.id, payments.c.replay_id)
                    .cte("recorded"))
        marked = (update(used_tokens)
                  .where(used_tokens.c.replay_id == recorded.c.replay_id)
                  .values(state="done")
                  .cte("marked"))
        self.record_done = select(recorded.c.id).add_cte(marked)
        self.claim_key = dialect_insert(idempotency_keys).on_conflict_do_nothing().returning(
            idempotency_keys.c.key)
        this_key = (idempotency_keys.c.issuer == bindparam("k_issuer"),
                    idempotency_keys.c.key == bindparam("k_key"))
        self.finish_key = update(idempotency_keys).where(*this_key).values(state="done")
        self.abandon_key = delete(idempotency_keys).where(
            *this_key, idempotency_keys.c.state == "in_flight")
        # On SQLite, the payment path's two writes go as groups (``SqliteWriter``).
        self.reservations = _Reservations(_SqliteRows(
            dialect_insert(used_tokens).on_conflict_do_nothing(), sqlite,
            [c.key for c in used_tokens.c]), self) if sqlite is not None else None
        self.recordings = _Recordings(_SqliteRows(
            dialect_insert(payments).on_conflict_do_nothing(), sqlite,
            [c.key for c in payments.c])) if sqlite is not None else None
        self.driver: tuple[_Compiled, _Compiled, _Compiled] | None = None

    def for_driver(self, dialect: Any) -> None:
        """Compile the payment path's statements for the PostgreSQL driver (``_first``)."""
        # The taking-up again also returns its transaction's id (``_retake_released``): only
        # for a row it changed, so that a replayed token costs no transaction id.
        self.driver = (_Compiled(self.reserve, dialect),
                       _Compiled(self.reserve_released.returning(func.txid_current()), dialect),
                       _Compiled(self.record_done, dialect))

    def reserve_again(self, conn: Connection, rid: str) -> str:
        """The payment id of a token given back for a retry, reserved again; else the token
        is ``token_replayed`` (spent, done or being charged)."""
        row = conn.execute(self.reserve_released, {"rid": rid}).first()
        if row is None:
            raise TokenError(code="token_replayed")
        return str(row.payment_id)


class SqlStore:
    """Ledger, replay, idempotency and API keys on one database.

    Every operation is one function of a connection, run in one transaction (``_run``). On
    PostgreSQL that is a transaction of the async engine's pool. SQLite has one writer at a
    time anyway, so there one thread with one connection runs them all (``SqliteWriter``),
    several per transaction (group commit): one fsync serves every payment recorded in it.
    """

    def __init__(self, *, url: str, pool_size: int = 10, engine: AsyncEngine | None = None,
                 statement_timeout: float = STATEMENT_TIMEOUT,
                 server_timeouts: bool = True) -> None:
        """``server_timeouts``: tell PostgreSQL to give up on a statement, or a transaction
        left idle, before the client's timer does (``_server_options``); off where something
        between refuses connection options (a PgBouncer), which must then set them itself."""
        blocking_url = sync_url(url)
        parsed = make_url(blocking_url)
        sqlite = parsed.get_backend_name() == "sqlite"
        self._writer: SqliteWriter | None = None
        self._reader: Engine | None = None
        if sqlite:
            writes = create_engine(blocking_url, poolclass=NullPool)
            event.listen(writes, "connect", _sqlite_pragmas)
            event.listen(writes, "begin", _sqlite_begin)
            database = parsed.database or ""
            file_backed = database not in ("", ":memory:") and not database.startswith(
                "file::memory:")
            self._writer = SqliteWriter(
                writes, lock_path=f"{database}-writer.lock" if file_backed else None)
            # Reads (each one statement, autocommit) on their own pool, beside the
            # writer: in WAL mode they neither wait for nor block it.
            self._reader = create_engine(blocking_url)
            event.listen(self._reader, "connect", _sqlite_pragmas)
            self._sql = _Statements(sqlite_insert, writes.dialect)
        else:
            self._sql = _Statements(pg_insert)
        self._drivers: DriverPool | None = None
        self._answer_within: Callable[[Any, float], AbstractContextManager[None]] | None = None
        self._statement_timeout = statement_timeout
        self._reservations: StatementBatcher | None = None
        self._recordings: StatementBatcher | None = None
        if not sqlite:
            # The payment path's two statements: psycopg connections of their own, in
            # autocommit (``DriverPool``: SQLAlchemy's asyncio pool cost ~90 us of CPU a
            # statement more). No overflow in either pool: a connection opened past a pool's
            # size would be closed as it came back, so a burst would keep connecting and
            # disconnecting (at 32 concurrent payments on one worker: ~730/s, most of the event
            # loop in psycopg's connect and close, the database idle); a request waits its turn
            # for one of the pool's connections instead, each held for one statement.
            from psycopg.conninfo import make_conninfo
            from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

            from cardseal.storage.pg_pool import DriverPool, answer_within

            self._answer_within = answer_within
            # libpq keywords as SQLAlchemy's own pool gets them (a URL rendered back would
            # keep a space in the password raw and turn one in the query into a "+"; several
            # hosts become libpq's "h1,h2" with "p1,p2"), so that both pools reach one server.
            dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
            _, keywords = dialect.create_connect_args(parsed)  # type: ignore[no-untyped-call]
            if server_timeouts:
                keywords["options"] = _server_options(parsed, statement_timeout)
            self._drivers = DriverPool(
                make_conninfo("", **keywords),
                size=pool_size, timeout=_POOL_TIMEOUT, connect_timeout=_CONNECT_TIMEOUT,
                statement_timeout=statement_timeout)
            # Concurrent payments' reservations, and their recorded payments, each as one
            # multi-row statement (``StatementBatcher``).
            from cardseal.storage.pg_batches import StatementBatcher

            self._reservations = StatementBatcher(self._drivers, _RESERVATIONS_SQL)
            self._recordings = StatementBatcher(self._drivers, _RECORDINGS_SQL)
        if engine is None and not sqlite:
            from sqlalchemy.ext.asyncio import create_async_engine

            # Everything else, through SQLAlchemy (idempotency keys, giving a token back,
            # reads): at most half as many connections. No pre-ping (a round trip per
            # checkout): the first query on a dead connection fails (storage_unavailable,
            # retryable) and SQLAlchemy then recycles the whole pool.
            engine = create_async_engine(
                async_url(url), pool_size=max(2, pool_size // 2), max_overflow=0,
                pool_timeout=_POOL_TIMEOUT, connect_args={
                    "connect_timeout": _CONNECT_TIMEOUT,
                    **({"options": _server_options(parsed, statement_timeout)}
                       if server_timeouts else {})})
        self.engine = engine
        if engine is not None and not sqlite:
            self._sql.for_driver(engine.dialect)
            drivers = self._drivers

            def disconnected(context: Any) -> None:
                # The server went away under SQLAlchemy's pool, or refuses connections: the
                # payment path's connections went with it (SQLAlchemy recycles its own).
                if drivers is not None and (context.is_disconnect or context.connection is None):
                    drivers.invalidate()

            event.listen(engine.sync_engine, "handle_error", disconnected)

    async def close(self) -> None:
        for batcher in (self._reservations, self._recordings):
            if batcher is not None:
                await batcher.close()
        if self._drivers is not None:
            await self._drivers.close()
        if self._writer is not None:
            await self._writer.close()
        if self._reader is not None:
            self._reader.dispose()
        if self.engine is not None:
            await self.engine.dispose()

    async def _run(self, work: Callable[[Connection], _T]) -> _T:
        """``work`` in one transaction. Database trouble is ``StorageError``; the contract's
        own errors that ``work`` raises pass through."""
        if self._writer is not None:
            return await self._writer.run(work)
        if self.engine is None:  # pragma: no cover - a store has a writer or an engine
            raise StorageError()
        if self._answer_within is None:  # pragma: no cover - built with the engine
            raise StorageError()
        try:
            async with self.engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                with self._answer_within(driver, self._statement_timeout):
                    async with conn.begin():
                        return await conn.run_sync(work)
        except (TokenError, RequestError):
            raise
        except (SQLAlchemyError, OSError, TimeoutError) as err:
            raise StorageError() from err

    async def _first(self, *steps: tuple[_Compiled, dict[str, Any]]) -> tuple[int, Any] | None:
        """``(i, row)``: the first row of the first of ``steps`` (statement, parameters) that
        returns one, and its place; each statement on its own (autocommit), in order, on one
        pooled connection; None if none returns a row. Database trouble is ``StorageError``.
        PostgreSQL only (SQLite writes go through its writer)."""
        import psycopg

        if self._drivers is None:  # pragma: no cover - a PostgreSQL store has one
            raise StorageError()
        sent = False
        try:
            async with self._drivers.connection() as driver:
                sent = True
                for i, (statement, params) in enumerate(steps):
                    cursor = await driver.execute(statement.sql, {**statement.fixed, **params})
                    row = await cursor.fetchone()
                    if row is not None:
                        return i, row
                return None
        except (psycopg.Error, OSError, TimeoutError) as err:
            raise (StorageError() if sent else NothingSentError()) from err

    def _pg_statements(self) -> tuple[_Compiled, _Compiled, _Compiled]:
        if self._sql.driver is None:  # pragma: no cover - built with the engine
            raise StorageError()
        return self._sql.driver

    async def _read(self, work: Callable[[Connection], _T]) -> _T:
        """``work`` that only reads: on SQLite beside the writer, elsewhere as ``_run``."""
        if self._reader is None:
            return await self._run(work)
        reader = self._reader

        def read() -> _T:
            with reader.connect() as conn:
                return work(conn)

        try:
            return await asyncio.to_thread(read)
        except (SQLAlchemyError, OSError, TimeoutError) as err:
            raise StorageError() from err

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute(text("SELECT 1")))

    async def _landed(self, query: Select[Any]) -> bool:
        """Whether a transaction that failed with ``StorageError`` committed all the same (its
        answer was lost with the connection): ``query`` finds a row only it could have written.
        Raises ``StorageError`` when the database still cannot answer."""
        return await self._read(lambda conn: conn.execute(query).first() is not None)

    # -- single use ---------------------------------------------------------------------------

    async def reserve_token(self, rid: str, expires_at: int) -> str:
        """Reserve a token for one charge; return the payment id to charge under.

        A token given back after a retryable failure (``release_token``) is reserved again
        with the same payment id, so the processor sees the same idempotency key. Raises
        ``TokenError(token_replayed)`` if the token is spent, done or being charged.
        """
        payment_id = new_payment_id()
        params = {"replay_id": rid, "payment_id": payment_id, "state": "pending",
                  "expires_at": expires_at}

        try:
            if self._writer is None or self._sql.reservations is None:
                return await self._reserve_pg(rid, payment_id, params)
            return await self._writer.run_grouped(self._sql.reservations, params)
        except (NothingSentError, ReservationInDoubtError, _NotLandedError):
            raise
        except StorageError as err:
            try:
                landed = await self._landed(select(used_tokens.c.replay_id).where(
                    used_tokens.c.replay_id == rid, used_tokens.c.payment_id == payment_id))
            except StorageError:  # neither answer came back: it may have landed
                async def undo() -> None:
                    await self._undo_reservation(rid, payment_id)

                raise ReservationInDoubtError(undo) from err
            if not landed:
                raise
            return payment_id  # the id is new: the reservation is this request's

    async def _reserve_pg(self, rid: str, payment_id: str, params: dict[str, Any]) -> str:
        """Two statements, each atomic: a new reservation (with those of concurrent payments),
        else the taking up again of one given back (only the purge of expired tokens deletes
        one)."""
        if self._reservations is None:  # pragma: no cover - a PostgreSQL store has one
            raise StorageError()
        reserve, _, _ = self._pg_statements()
        taken = await self._reservations.run([params[c.key] for c in used_tokens.c])
        if taken is None:  # its batch had a row the server refused: this one alone
            if await self._first((reserve, params)) is not None:
                return payment_id
        elif (rid, payment_id) in taken:
            return payment_id
        given_back = await self._retake_released(rid)
        if given_back is None:
            raise TokenError(code="token_replayed")
        return given_back

    async def _retake_released(self, rid: str) -> str | None:
        """Take up again a token given back after a retryable failure (``released``); its
        payment id, or None when it is not ``released`` (spent, done, being charged).

        One transaction: the update returns the transaction's id with the row, and COMMIT goes
        out only once that answer is in. So a lost answer before COMMIT means nothing landed;
        after it, the server tells whether it committed (``txid_status``), and the undo of one
        in doubt gives back exactly the row version it wrote (its ``xmin``), never the one a
        later retry wrote when it took the token up in turn. A token that is not ``released``
        (a replay) changes no row and costs no transaction id.
        """
        import psycopg

        if self._drivers is None:  # pragma: no cover - a PostgreSQL store has one
            raise StorageError()
        retake = self._pg_statements()[1]
        xid: int | None = None  # known once the update answered: COMMIT is then on its way
        sent = False
        try:
            async with self._drivers.connection() as conn:
                sent = True
                await conn.execute("BEGIN")
                try:
                    cursor = await conn.execute(retake.sql, {**retake.fixed, "rid": rid})
                    found = await cursor.fetchone()
                    if found is None:
                        await conn.execute("ROLLBACK")  # nothing written, no id taken
                        return None
                    xid = int(found[1])
                    await conn.execute("COMMIT")
                except psycopg.errors.QueryCanceled:  # the server's statement_timeout
                    await conn.execute("ROLLBACK")
                    raise
                except psycopg.OperationalError:
                    raise  # the connection is closed: the server rolls back what it did not commit
                except psycopg.Error:  # refused by the server: the session goes back clean
                    await conn.execute("ROLLBACK")
                    raise
                # Anything else (a cancelled request) closes the connection (``DriverPool``).
                return str(found[0])
        except (psycopg.Error, OSError, TimeoutError) as err:
            if not sent:
                raise NothingSentError() from err
            if xid is None:  # COMMIT never went out
                raise _NotLandedError() from err
            raise await self._settled_retake(rid, xid) from err

    async def _settled_retake(self, rid: str, xid: int) -> StorageError:
        """What to raise for a taking-up (transaction ``xid``) whose COMMIT's answer was lost:
        ``_NotLandedError`` when it did not commit; otherwise (committed, still running, or
        the server cannot tell now) ``ReservationInDoubtError``: the request answers 503 all
        the same, and its undo gives the token back once the transaction has committed."""
        try:
            outcome = await self._read(lambda conn: _xact_status(conn, xid))
        except StorageError:
            outcome = "unknown"
        if outcome in ("aborted", None):  # None: not in the server's history
            return _NotLandedError()

        def undo(conn: Connection) -> None:
            status = _xact_status(conn, xid)
            if status == "in progress":  # a slow COMMIT, or a session not yet ended
                raise StorageError()  # the repair tries again
            if status == "committed":
                conn.execute(text(
                    "UPDATE used_tokens SET state = 'released' WHERE replay_id = :rid"
                    " AND state = 'pending' AND xmin::text::bigint = :xid32"),
                    {"rid": rid, "xid32": xid % 2**32})

        async def undo_later() -> None:
            await self._run(undo)

        return ReservationInDoubtError(undo_later)

    async def _undo_reservation(self, rid: str, payment_id: str) -> None:
        """Delete the reservation made under ``payment_id`` if it landed and is still pending:
        its request answered 503 and charged nothing. The client's retry then reserves the
        token afresh, under a new payment id that this never matches, however often it runs
        (its own answer may be lost too)."""
        await self._run(lambda conn: conn.execute(delete(used_tokens).where(
            used_tokens.c.replay_id == rid, used_tokens.c.payment_id == payment_id,
            used_tokens.c.state == "pending")))

    async def release_token(self, rid: str) -> None:
        """Give a reserved token back after a failure worth retrying (KMS, processor down)."""
        await self._run(lambda conn: conn.execute(self._sql.release, {"rid": rid}))

    async def spend_token(self, rid: str) -> None:
        """Mark a reserved token used for good without a payment (its card was refused)."""
        await self._run(lambda conn: conn.execute(self._sql.spend, {"rid": rid}))

    # -- ledger -------------------------------------------------------------------------------

    async def record_payment(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Insert the payment and mark its token done, in one transaction; None.

        When the ledger already holds this very payment (its id and its token), an earlier
        run of the request recorded it and lost the answer, along with the check that would
        have told (the token was then given back, and the retry reached the processor again
        under the same payment id, its idempotency key): that row, which the retry answers.
        Raises ``TokenError(token_replayed)`` when the ledger holds another payment for this
        token (a replay store outside this database lost its record of it).
        """
        try:
            if self._writer is None or self._sql.recordings is None:
                await self._record_pg(row)
            else:
                await self._writer.run_grouped(self._sql.recordings, row)
        except NothingSentError:
            raise
        except StorageError:
            # Only this request holds the reservation that carries this payment id.
            if not await self._landed(select(payments.c.id).where(payments.c.id == row["id"])):
                raise
        except TokenError:
            earlier = await self._payment(payments.c.id == row["id"],
                                          payments.c.replay_id == row["replay_id"])
            if earlier is None:
                raise
            return earlier
        return None

    async def _record_pg(self, row: dict[str, Any]) -> None:
        """The payment and its token's ``done`` in one statement (with those of concurrent
        payments); ``token_replayed`` when the ledger has a payment for its token."""
        if self._recordings is None:  # pragma: no cover - a PostgreSQL store has one
            raise StorageError()
        recorded = await self._recordings.run([row.get(c.key) for c in payments.c])
        if recorded is None:  # its batch had a row the server refused: this one alone
            params = {"new_" + key: value for key, value in row.items()}
            went_in = await self._first((self._pg_statements()[2], params)) is not None
        else:
            went_in = (row["id"],) in recorded
        if not went_in:
            raise TokenError(code="token_replayed")

    async def get_payment(self, payment_id: str, issuer: str) -> dict[str, Any] | None:
        return await self._payment(payments.c.id == payment_id, payments.c.issuer == issuer)

    async def payment_of_token(self, rid: str, issuer: str) -> dict[str, Any] | None:
        """The payment recorded for the token whose replay id is ``rid``, if any."""
        return await self._payment(payments.c.replay_id == rid, payments.c.issuer == issuer)

    async def _payment(self, *where: ColumnElement[bool]) -> dict[str, Any] | None:
        def get(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(select(payments).where(*where)).first()
            return dict(row._mapping) if row is not None else None

        return await self._read(get)

    # -- idempotency --------------------------------------------------------------------------

    async def begin_idempotent(
        self, issuer: str, key: str, request_hash: str, *, stale_after: float | None = None
    ) -> IdempotentReplay | IdempotentTakeover | None:
        """Claim ``key`` for this request (None), or return the stored response to replay.

        A key in flight for more than ``stale_after`` seconds with this same body was left by
        a gateway that died mid-request: this request takes it over (``IdempotentTakeover``;
        of two such retries at once, one). Raises ``RequestError(idempotency_conflict)`` when
        the key is in flight or was used with another request body, ``StorageError`` on
        database trouble.
        """
        def begin(conn: Connection) -> IdempotentReplay | IdempotentTakeover | None:
            now = datetime.now(UTC)
            if conn.execute(self._sql.claim_key, {
                "issuer": issuer, "key": key, "request_hash": request_hash,
                "state": "in_flight", "created_at": now,
            }).first() is not None:
                return None
            row = conn.execute(select(idempotency_keys).where(
                idempotency_keys.c.issuer == issuer, idempotency_keys.c.key == key)).first()
            if (
                stale_after is not None and row is not None and row.state == "in_flight"
                and hmac.compare_digest(row.request_hash, request_hash)
                # Still stale when written: of two retries at once, the first takes it.
                and conn.execute(update(idempotency_keys).where(
                    idempotency_keys.c.issuer == issuer, idempotency_keys.c.key == key,
                    idempotency_keys.c.state == "in_flight",
                    idempotency_keys.c.created_at < now - timedelta(seconds=stale_after),
                ).values(created_at=now)).rowcount == 1
            ):
                return IdempotentTakeover()
            if (
                row is None  # abandoned since our insert (read committed): the caller may retry
                or not hmac.compare_digest(row.request_hash, request_hash)
                or row.state != "done"
            ):
                raise RequestError(code="idempotency_conflict")
            return IdempotentReplay(int(row.status_code), str(row.response))

        return await self._run(begin)

    async def reopen_idempotent(self, issuer: str, key: str) -> None:
        """Leave an in-flight key taken over again at once by the next retry (its takeover
        failed for want of the database)."""
        await self._run(lambda conn: conn.execute(update(idempotency_keys).where(
            idempotency_keys.c.issuer == issuer, idempotency_keys.c.key == key,
            idempotency_keys.c.state == "in_flight",
        ).values(created_at=datetime(1970, 1, 1, tzinfo=UTC))))

    async def finish_idempotent(self, issuer: str, key: str, status_code: int, body: str) -> None:
        await self._run(lambda conn: conn.execute(self._sql.finish_key, {
            "k_issuer": issuer, "k_key": key, "status_code": status_code, "response": body}))

    async def abandon_idempotent(self, issuer: str, key: str) -> None:
        """Forget an in-flight key whose request failed in a retryable way (5xx)."""
        await self._run(lambda conn: conn.execute(
            self._sql.abandon_key, {"k_issuer": issuer, "k_key": key}))

    # -- API keys -----------------------------------------------------------------------------

    async def create_api_key(self, issuer: str) -> str:
        """A new API key for ``issuer``: returned once, stored as a SHA-256 hash only."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        await self._run(lambda conn: conn.execute(insert(api_keys).values(
            id=key_id, issuer=issuer, created_at=datetime.now(UTC),
            secret_hash=hashlib.sha256(secret.encode()).hexdigest())))
        return f"csk_{key_id}_{secret}"

    async def issuer_for_api_key(self, api_key: str) -> str | None:
        """The issuer an API key belongs to, or None. The hash is compared in constant time."""
        prefix, _, rest = api_key.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != "csk" or len(key_id) != 16 or not secret or len(api_key) > 128:
            return None
        row = await self._read(
            lambda conn: conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first())
        presented = hashlib.sha256(secret.encode()).hexdigest()
        expected = row.secret_hash if row is not None else "0" * 64
        if hmac.compare_digest(presented, expected) and row is not None:
            return str(row.issuer)
        return None

    async def purge_expired_tokens(self, before: int, *, chunk: int = PURGE_CHUNK) -> int:
        """Delete single-use records of tokens that expired before ``before`` (epoch s); how
        many. In transactions of at most ``chunk`` rows each: every one short next to the
        statement timeout and to the payments' writes waiting for SQLite's one writer, however
        many records a long pause left behind."""
        oldest = (select(used_tokens.c.replay_id).where(used_tokens.c.expires_at < before)
                  .limit(chunk).scalar_subquery())
        statement = delete(used_tokens).where(used_tokens.c.replay_id.in_(oldest))
        purged = 0
        while True:
            count = await self._run(lambda conn: int(conn.execute(statement).rowcount or 0))
            purged += count
            if count < chunk:
                return purged
