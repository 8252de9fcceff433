"""``SqlStore`` on PostgreSQL, below the HTTP layer: what a lost connection does to each step.

``pg_terminate_backend`` (``test_failover.py``) ends a session between statements, so a
transaction either never committed or committed and said so. A crashing server or a broken
link can also lose the answer to a COMMIT that did land. Here that is made exact: the driver's
commit runs, then the connection "breaks" before the answer is read. The store must find out
what happened instead of reporting a failure for a payment that is recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, text

from cardseal.errors import NothingSentError, StorageError, TokenError
from cardseal.storage.migrate import upgrade
from cardseal.storage.sql import (
    ReservationInDoubtError,
    SqlStore,
    _xact_status,
    new_payment_id,
    replay_id,
)
from tests.conftest import PostgresServer
from tests.faults.conftest import TcpGate
from tests.scale.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def payment_row(payment_id: str, rid: str) -> dict[str, Any]:
    return {
        "id": payment_id, "issuer": "payment-service", "status": "authorized", "amount": 900,
        "currency": "USD", "reference": None, "card_brand": "visa", "card_last4": "4242",
        "card_masked": "424242******4242", "card_exp_month": 12, "card_exp_year": 2030,
        "card_fingerprint": "fp_" + "0" * 32, "decline_code": None, "processor_ref": "ref",
        "replay_id": rid, "created_at": datetime.now(UTC).replace(microsecond=0),
    }


class LostCommitAnswers:
    """Makes the next ``lose`` commits land on the server and then fail on the client: the
    COMMIT of a transaction (SQLAlchemy's), or a statement the store runs on its own in
    autocommit (the payment path's, on the driver connection), which is its own commit."""

    def __init__(self, store: SqlStore) -> None:
        self.lose = 0
        self.spare_transactions = False  # lose only the payment path's statements' answers
        dialect = store.engine.sync_engine.dialect
        original = dialect.do_commit

        def do_commit(dbapi_connection: Any) -> None:
            original(dbapi_connection)
            if not self.spare_transactions:
                self._maybe_lose()

        dialect.do_commit = do_commit  # type: ignore[method-assign]
        self._execute = execute = psycopg.AsyncConnection.execute

        async def autocommitted(conn: psycopg.AsyncConnection[Any], *args: Any,
                                **kwargs: Any) -> Any:
            cursor = await execute(conn, *args, **kwargs)
            if conn.autocommit:
                self._maybe_lose()
            return cursor

        psycopg.AsyncConnection.execute = autocommitted  # type: ignore[assignment,method-assign]

    def _maybe_lose(self) -> None:
        if self.lose:
            self.lose -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    def restore(self) -> None:
        psycopg.AsyncConnection.execute = self._execute  # type: ignore[method-assign]


def run(postgres: PostgresServer, scenario: Callable[[SqlStore, LostCommitAnswers],
                                                     Coroutine[Any, Any, None]]) -> None:
    url = postgres.create_database("store")
    upgrade(url)

    async def main() -> None:
        store = SqlStore(url=url, pool_size=2)
        faults = LostCommitAnswers(store)
        try:
            await scenario(store, faults)
        finally:
            faults.restore()
            await store.close()

    asyncio.run(main())


def test_a_reservation_whose_commit_answer_was_lost_is_kept(postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-lost-reserve")
        faults.lose = 1
        payment_id = await store.reserve_token(rid, int(time.time()) + 60)
        assert faults.lose == 0  # the answer was lost, and the store found its reservation
        with pytest.raises(TokenError) as excinfo:  # reserved: a second use is a replay
            await store.reserve_token(rid, int(time.time()) + 60)
        assert excinfo.value.code == "token_replayed"
        await store.release_token(rid)
        assert await store.reserve_token(rid, int(time.time()) + 60) == payment_id

    run(postgres, scenario)


def test_a_reservation_whose_answer_and_check_were_lost_is_given_back(
        postgres: PostgresServer) -> None:
    """The reservation landed, its answer was lost, and so was the check that would have told:
    the store says so (``ReservationInDoubtError``, ``storage_unavailable``), and its undo
    deletes the reservation (nothing was charged under it), so that the client's retry is not
    refused until the token expires. Run again (its own answer lost), the undo leaves the
    retry's reservation, and the payment recorded under it, alone."""
    async def scenario(store: SqlStore, faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-in-doubt")
        expires = int(time.time()) + 60
        faults.lose = 2  # the reservation's answer, then the check's
        with pytest.raises(ReservationInDoubtError) as doubt:
            await store.reserve_token(rid, expires)
        assert faults.lose == 0 and doubt.value.code == "storage_unavailable"
        with pytest.raises(TokenError):  # it had landed: the token is pending
            await store.reserve_token(rid, expires)
        await doubt.value.undo()
        payment_id = await store.reserve_token(rid, expires)  # the retry
        await doubt.value.undo()
        with pytest.raises(TokenError):  # the retry's reservation stands
            await store.reserve_token(rid, expires)
        await store.record_payment(payment_row(payment_id, rid))
        await doubt.value.undo()
        assert await store.get_payment(payment_id, "payment-service") is not None
        with pytest.raises(TokenError):
            await store.reserve_token(rid, expires)

    run(postgres, scenario)


class CommitFault:
    """Makes the next explicit ``COMMIT`` on a payment-path connection land and lose its
    answer (``land=True``), or fail before it goes out (``land=False``)."""

    def __init__(self, land: bool) -> None:
        self.land = land
        self.armed = True
        self._execute = execute = psycopg.AsyncConnection.execute

        async def faulty(conn: psycopg.AsyncConnection[Any], query: Any, *args: Any,
                         **kwargs: Any) -> Any:
            if self.armed and query == "COMMIT":
                self.armed = False
                if self.land:
                    await execute(conn, query, *args, **kwargs)
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return await execute(conn, query, *args, **kwargs)

        psycopg.AsyncConnection.execute = faulty  # type: ignore[assignment,method-assign]

    def restore(self) -> None:
        psycopg.AsyncConnection.execute = self._execute  # type: ignore[method-assign]


def test_a_token_taken_up_again_whose_answer_was_lost_is_given_back(
        postgres: PostgresServer) -> None:
    """A token given back after a retryable failure is taken up again by the retry, under its
    payment id, and the answer to that COMMIT is lost after it landed: the store asks the
    server whether the transaction committed (it did), answers 503, and its undo gives back
    exactly that taking-up; run again, the undo leaves the next retry's taking-up alone.
    A COMMIT that never went out leaves the token free (the undo, should the server not yet
    have seen the session end, changes nothing)."""
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-retaken")
        expires = int(time.time()) + 60
        payment_id = await store.reserve_token(rid, expires)
        await store.release_token(rid)
        fault = CommitFault(land=True)
        try:
            with pytest.raises(ReservationInDoubtError) as doubt:
                await store.reserve_token(rid, expires)
        finally:
            fault.restore()
        assert not fault.armed
        with pytest.raises(TokenError):  # it had landed: pending
            await store.reserve_token(rid, expires)
        await doubt.value.undo()
        assert await store.reserve_token(rid, expires) == payment_id  # the next retry
        await doubt.value.undo()
        with pytest.raises(TokenError):  # the retry's taking-up stands
            await store.reserve_token(rid, expires)

        await store.release_token(rid)
        fault = CommitFault(land=False)
        try:
            with pytest.raises(StorageError) as failed:
                await store.reserve_token(rid, expires)
        finally:
            fault.restore()
        assert not fault.armed
        if isinstance(failed.value, ReservationInDoubtError):  # the server had not yet seen
            await undo_until_done(failed.value)  # the session end: the undo waits for it
        assert await store.reserve_token(rid, expires) == payment_id

    run(postgres, scenario)


async def undo_until_done(doubt: ReservationInDoubtError) -> None:
    """Run ``doubt``'s undo as the gateway's repair does: again until it stops failing."""
    deadline = time.monotonic() + 5
    while True:
        try:
            await doubt.undo()
            return
        except StorageError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


def test_the_undo_of_a_taking_up_waits_for_its_transaction_to_end(
        postgres: PostgresServer) -> None:
    """A taking-up whose COMMIT is still running (a slow disk, a synchronous standby) when
    the undo comes: the undo fails, so the repair tries again, instead of changing nothing and
    counting as done; once the transaction has committed, the undo gives the token back."""
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-slow-commit")
        expires = int(time.time()) + 60
        payment_id = await store.reserve_token(rid, expires)
        await store.release_token(rid)
        database = store.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        with psycopg.connect(database) as running:  # the taking-up, not yet committed
            row = running.execute(
                "UPDATE used_tokens SET state = 'pending' WHERE replay_id = %s"
                " AND state = 'released' RETURNING txid_current()", (rid,)).fetchone()
            assert row is not None
            doubt = await store._settled_retake(rid, int(row[0]))
            assert isinstance(doubt, ReservationInDoubtError)
            with pytest.raises(StorageError):
                await doubt.undo()
            running.commit()
        await doubt.undo()
        assert await store.reserve_token(rid, expires) == payment_id

    run(postgres, scenario)


def test_a_transaction_id_the_server_never_gave_out_did_not_land(
        postgres: PostgresServer) -> None:
    """After a failover to a standby that never saw the taking-up's commit, its id is ahead of
    the new server's counter (``txid_status`` would raise): not landed, and the status its
    undo reads says "not in this server's history" (a no-op that finishes), rather than
    failing until the id names another transaction."""
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-future-xid")
        expires = int(time.time()) + 60
        await store.reserve_token(rid, expires)
        future = await store._read(
            lambda conn: int(conn.execute(text("SELECT txid_current()")).scalar_one())
        ) + 1_000_000
        settled = await store._settled_retake(rid, future)
        assert type(settled).__name__ == "_NotLandedError"  # a plain 503, no undo
        assert settled.code == "storage_unavailable"
        assert await store._run(lambda conn: _xact_status(conn, future)) is None  # the undo's

    run(postgres, scenario)


def test_a_replayed_token_costs_no_transaction_id(postgres: PostgresServer) -> None:
    """Replays are the attacker's to send: refusing one must not take a transaction id (each
    brings PostgreSQL's anti-wraparound vacuum nearer)."""
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-replayed")
        payment_id = await store.reserve_token(rid, int(time.time()) + 60)
        await store.record_payment(payment_row(payment_id, rid))
        database = store.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)

        def next_xid() -> int:
            with psycopg.connect(database, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
                assert row is not None
                return int(row[0])

        before = next_xid()
        for _ in range(40):
            with pytest.raises(TokenError):
                await store.reserve_token(rid, int(time.time()) + 60)
        # One id a replay took 40; the margin is for other sessions on the server.
        assert next_xid() - before < 20

    run(postgres, scenario)


def test_each_connection_tells_the_server_its_timeouts(
        postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both pools' connections carry the server's statement and idle-in-transaction timeouts
    after the URL's own options (or ``PGOPTIONS``), and the URL's other parameters as given
    (a space in one stays a space, several hosts stay several); ``server_timeouts=False``
    sends no timeouts."""
    url = postgres.create_database("options")
    upgrade(url)
    monkeypatch.setenv("PGOPTIONS", "-c application_name=from-pgoptions")

    async def settings(store: SqlStore) -> set[tuple[str, str]]:
        assert store._drivers is not None and store.engine is not None
        names = ("statement_timeout", "idle_in_transaction_session_timeout",
                 "application_name", "search_path")
        query = "SELECT name, setting FROM pg_settings WHERE name = ANY(%(names)s)"
        async with store._drivers.connection() as conn:
            driver = await (await conn.execute(query, {"names": list(names)})).fetchall()
        async with store.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            engine = await (await raw.execute(query, {"names": list(names)})).fetchall()
            await raw.rollback()
        assert sorted(driver) == sorted(engine)  # the two pools alike
        return set(driver)

    async def main() -> None:
        for store_url, timeouts, expected in (
            (url + "?options=-c%20search_path%3Dpublic,pg_catalog&application_name=my%20app",
             True,
             {("statement_timeout", "400"), ("idle_in_transaction_session_timeout", "400"),
              ("search_path", "public,pg_catalog"), ("application_name", "my app")}),
            (url, True, {("statement_timeout", "400"), ("application_name", "from-pgoptions")}),
            (url, False, {("statement_timeout", "0"),
                          ("idle_in_transaction_session_timeout", "0")}),
            # A password with a space (trust auth takes any) and SQLAlchemy's several hosts.
            (url.replace("postgres@127.0.0.1:5432/", "postgres:pass%20word@/")
             + "?host=127.0.0.1:5432&host=127.0.0.1:5432", True,
             {("statement_timeout", "400")}),
        ):
            store = SqlStore(url=store_url, statement_timeout=0.5, server_timeouts=timeouts)
            try:
                assert expected <= await settings(store)
            finally:
                await store.close()

    asyncio.run(main())


def test_a_silent_link_fails_each_step_within_the_statement_timeout(
        postgres: PostgresServer) -> None:
    """PostgreSQL behind a link that goes silent without closing (a dead network, a hung
    proxy): each step, on the payment path's connections and on SQLAlchemy's, fails with
    ``storage_unavailable`` once the statement timeout has passed, instead of holding the
    request and its connection; a reservation that may have gone out is in doubt, and its
    undo, once the link is back, leaves the token free for the client's retry."""
    url = postgres.create_database("silent")
    upgrade(url)
    proxy = TcpProxy("127.0.0.1", 5432)
    through = url.replace(":5432/", f":{proxy.port}/")

    async def main() -> None:
        store = SqlStore(url=through, pool_size=2, statement_timeout=0.5)
        rid = replay_id("payment-service", "jti-silent")
        expires = int(time.time()) + 60
        try:
            assert await store.get_payment("pay_none", "payment-service") is None  # warm
            await store.record_payment(payment_row(new_payment_id(), replay_id("p", "warm")))
            proxy.hang()
            started = time.monotonic()
            with pytest.raises(ReservationInDoubtError) as doubt:
                await store.reserve_token(rid, expires)
            assert time.monotonic() - started < 3.0  # the statement, then the check
            started = time.monotonic()
            with pytest.raises(StorageError):  # the pool was dropped: a connect that times out
                await store.get_payment("pay_none", "payment-service")
            assert time.monotonic() - started < 7.0
            proxy.up()
            await doubt.value.undo()
            payment_id = await store.reserve_token(rid, expires)
            await store.record_payment(payment_row(payment_id, rid))
            assert await store.get_payment(payment_id, "payment-service") is not None
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        proxy.close()


def test_a_statement_the_server_is_slow_to_run_is_cancelled_there_not_left_to_land(
        postgres: PostgresServer) -> None:
    """A live server slow to run the reservations (another session holds a lock on
    ``used_tokens`` that lets reads through): the server cancels each statement (its
    ``statement_timeout``, below the client's timer), so none lands after its request was
    answered 503 and its check found nothing; the connections stay within the pools' bounds
    however often it happens; once the lock is gone the tokens are free."""
    url = postgres.create_database("slow")
    upgrade(url)
    holder = psycopg.connect(url)

    async def main() -> None:
        store = SqlStore(url=url, pool_size=2, statement_timeout=0.5)
        names = [replay_id("payment-service", f"jti-slow-{i}") for i in range(4)]
        expires = int(time.time()) + 60
        try:
            holder.execute("LOCK TABLE used_tokens IN SHARE MODE")
            for _ in range(3):
                results = await asyncio.gather(
                    *(store.reserve_token(rid, expires) for rid in names),
                    return_exceptions=True)
                for result in results:  # plain 503s: the check answered "not landed"
                    assert isinstance(result, StorageError), result
                    assert not isinstance(result, ReservationInDoubtError)
            sessions = holder.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()").fetchone()
            assert sessions is not None and sessions[0] <= 2 + 2  # the two pools' sizes
            holder.rollback()
            await asyncio.sleep(0.2)
            assert holder.execute("SELECT count(*) FROM used_tokens").fetchone() == (0,)
            for rid in names:
                await store.reserve_token(rid, expires)
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        holder.close()


def test_a_request_that_could_not_connect_sent_nothing(postgres: PostgresServer) -> None:
    """While the server refuses connections, a reservation or a payment fails at once with
    ``NothingSentError``: no check, no undo in doubt (which would put a background retry per
    payment on the event loop for as long as the outage lasts)."""
    url = postgres.create_database("refused")
    upgrade(url)
    gate = TcpGate(("127.0.0.1", 5432))
    through = url.replace(":5432/", f":{gate.port}/")

    async def main() -> None:
        store = SqlStore(url=through, pool_size=2)
        rid = replay_id("payment-service", "jti-refused")
        try:
            for attempt in (store.reserve_token(rid, int(time.time()) + 60),
                            store.record_payment(payment_row(new_payment_id(), rid))):
                started = time.monotonic()
                with pytest.raises(NothingSentError):
                    await attempt
                assert time.monotonic() - started < 1.0
            gate.open()
            await store.reserve_token(rid, int(time.time()) + 60)
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        gate.close()


def test_a_payment_whose_commit_answer_was_lost_is_recorded_once(
        postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-lost-record")
        payment_id = await store.reserve_token(rid, int(time.time()) + 60)
        faults.lose = 1
        await store.record_payment(payment_row(payment_id, rid))  # no StorageError: it landed
        assert faults.lose == 0
        row = await store.get_payment(payment_id, "payment-service")
        assert row is not None and row["replay_id"] == rid
        with pytest.raises(TokenError):  # done, not pending: never charged again
            await store.reserve_token(rid, int(time.time()) + 60)

    run(postgres, scenario)


async def answer_lost_with_its_check(store: SqlStore) -> None:
    """A payment recorded by a run whose answer and check were both lost (it gave the token
    back): the retry, under the same payment id, gets that payment back, not token_replayed;
    another payment id for the token is still a replay."""
    rid = replay_id("payment-service", "jti-recorded-then-retried")
    payment_id = await store.reserve_token(rid, int(time.time()) + 60)
    assert await store.record_payment(payment_row(payment_id, rid)) is None
    retried = payment_row(payment_id, rid) | {"processor_ref": "ref-of-the-retry"}
    recorded = await store.record_payment(retried)
    assert recorded is not None
    assert (recorded["id"], recorded["processor_ref"]) == (payment_id, "ref")
    with pytest.raises(TokenError) as excinfo:
        await store.record_payment(payment_row(new_payment_id(), rid))
    assert excinfo.value.code == "token_replayed"


def test_a_retry_finds_the_payment_its_lost_run_recorded(postgres: PostgresServer) -> None:
    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        await answer_lost_with_its_check(store)

    run(postgres, scenario)


def test_a_failure_before_the_commit_is_storage_unavailable(postgres: PostgresServer) -> None:
    """The check tells a lost answer from a real failure: nothing landed, nothing is claimed."""

    async def scenario(store: SqlStore, faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-unrecorded")
        payment_id = await store.reserve_token(rid, int(time.time()) + 60)
        row = payment_row(payment_id, rid) | {"currency": "TOO-LONG"}  # fails in the server
        with pytest.raises(StorageError) as excinfo:
            await store.record_payment(row)
        assert excinfo.value.code == "storage_unavailable"
        assert await store.get_payment(payment_id, "payment-service") is None
        other = replay_id("payment-service", "jti-other")
        await store.record_payment(payment_row(new_payment_id(), other))  # the pool is fine

    run(postgres, scenario)


def test_the_payment_path_statements_each_stand_alone(postgres: PostgresServer) -> None:
    """The payment path runs single statements in autocommit on the driver: a reservation, a
    reservation taken up again after a release, a payment recorded with its token marked done
    in one statement, a payment whose token has no row here (a Redis replay store), and a
    second payment for one token refused without touching anything."""

    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        rid = replay_id("payment-service", "jti-path")
        payment_id = await store.reserve_token(rid, int(time.time()) + 60)
        await store.release_token(rid)
        assert await store.reserve_token(rid, int(time.time()) + 60) == payment_id
        await store.record_payment(payment_row(payment_id, rid))
        with pytest.raises(TokenError) as again:  # done: never reserved again
            await store.reserve_token(rid, int(time.time()) + 60)
        assert again.value.code == "token_replayed"
        with pytest.raises(TokenError) as twice:  # the ledger has this token's payment
            await store.record_payment(payment_row(new_payment_id(), rid))
        assert twice.value.code == "token_replayed"
        elsewhere = replay_id("payment-service", "jti-redis")  # no used_tokens row
        other_id = new_payment_id()
        await store.record_payment(payment_row(other_id, elsewhere))
        assert (await store.get_payment(other_id, "payment-service")) is not None
        # All on the payment path's own connections, in autocommit; SQLAlchemy's pool served
        # only the release.
        assert store._drivers is not None and store._drivers.connects == 1
        assert store.engine is not None
        async with store.engine.connect() as conn:
            assert (await conn.get_raw_connection()).driver_connection.autocommit is False

    run(postgres, scenario)


def test_a_burst_waits_for_the_pools_connections_instead_of_opening_more(
    postgres: PostgresServer,
) -> None:
    # Connections opened past the pool's size were closed when they came back, so a burst
    # connected and disconnected all the time (at 32 payments at once: half the rate).
    async def scenario(store: SqlStore, faults: LostCommitAnswers) -> None:
        connects = []
        assert store.engine is not None and store._drivers is not None
        event.listen(store.engine.sync_engine, "connect", lambda *_: connects.append(1))
        expires = int(time.time()) + 60
        ids = await asyncio.gather(*(store.reserve_token(replay_id("payment-service", f"b-{i}"),
                                                         expires) for i in range(40)))
        assert len(set(ids)) == 40  # every reservation went in
        assert store._drivers.connects <= 2  # pool_size=2, and no connection beyond it
        assert connects == []  # nor any through SQLAlchemy's pool

    run(postgres, scenario)


def test_a_disconnect_seen_by_sqlalchemy_retires_the_payment_paths_connections(
    postgres: PostgresServer,
) -> None:
    """Both pools lose their sessions at once when the server goes away; whichever finds out
    first, the other does not hand out a dead session afterwards."""

    async def scenario(store: SqlStore, _faults: LostCommitAnswers) -> None:
        assert store._drivers is not None and store.engine is not None
        expires = int(time.time()) + 60
        first, second = replay_id("payment-service", "d-1"), replay_id("payment-service", "d-2")
        await store.reserve_token(first, expires)  # a session in each pool, idle after
        await store.release_token(first)
        assert store._drivers.connects == 1
        with postgres.admin() as admin:  # the server ends every session (a failover)
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()",
                          (store.engine.url.database,))
        with pytest.raises(StorageError):  # SQLAlchemy's pool finds out first
            await store.release_token(first)
        await store.reserve_token(second, expires)  # not on the dead session: it pays
        assert store._drivers.connects == 2

    run(postgres, scenario)
