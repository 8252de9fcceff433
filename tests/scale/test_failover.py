"""PostgreSQL drops the gateway's connections in the middle of a burst of payments.

Eight client threads post distinct tokens to one ``cardseal serve`` on a fresh PostgreSQL
database (half of them with an ``Idempotency-Key``). Once the burst is going, a chaos thread
runs ``pg_terminate_backend`` on every connection to that database, again and again for a
while (a database failing over, or flapping), then stops; the burst goes on until enough
requests were sent after the chaos. Then:

- every answer is a 201 or a clean ``503 storage_unavailable`` with ``Retry-After``, never a 500,
  never a dropped connection;
- the same process recovers by itself: every request sent after the chaos pays, ``/readyz`` is
  200;
- nothing is lost or doubled: every 201's payment id is in the ledger under its token, one row
  per token at most;
- a 503'd request retried after ``Retry-After`` (same token, same key) pays, exactly once; once
  more with the key it is the same answer byte for byte, without it ``token_replayed``. In the
  end every token sent is paid exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest

from tests.conftest import PostgresServer
from tests.gateway.test_api_errors import assert_error, assert_payment
from tests.scale.conftest import Cluster, start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

THREADS = 8
CHAOS_AFTER = 25  # answers before the first kill
CHAOS_SECONDS = 1.5
CHAOS_PERIOD = 0.05  # seconds between two sweeps
SETTLE = 0.2  # seconds after the last sweep before "after the chaos" begins
AFTER_CHAOS = 40  # requests sent after the chaos, then the burst ends
AMOUNT = 6100


@dataclass
class Attempt:
    token: str
    key: str | None
    sent_at: float
    response: httpx.Response

    def body(self) -> dict[str, object]:
        return {"token": self.token, "amount": AMOUNT, "currency": "USD"}

    def headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.key} if self.key else {}


def terminate_backends(conn: psycopg.Connection[tuple[object, ...]], database: str) -> int:
    """The statement an operator (or a failover) runs: every session of ``database`` ends."""
    row = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchone()
    assert row is not None
    return int(str(row[0]))


class Chaos(threading.Thread):
    """Once ``start_event`` is set: a sweep every ``CHAOS_PERIOD`` s for ``CHAOS_SECONDS`` s.
    ``killed`` counts the sessions it ended; ``done`` is set, with ``ended_at``, when over."""

    def __init__(self, postgres: PostgresServer, database: str) -> None:
        super().__init__(daemon=True)
        self.postgres = postgres
        self.database = database
        self.start_event = threading.Event()
        self.done = threading.Event()
        self.killed = 0
        self.ended_at = float("inf")

    def run(self) -> None:
        try:
            if not self.start_event.wait(timeout=120):
                return
            with self.postgres.admin() as conn:
                began = time.monotonic()
                while time.monotonic() - began < CHAOS_SECONDS:
                    self.killed += terminate_backends(conn, self.database)
                    time.sleep(CHAOS_PERIOD)
                self.killed += terminate_backends(conn, self.database)
            self.ended_at = time.monotonic()
        finally:
            self.done.set()


@pytest.fixture
def failover_cluster(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
                     ) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("failover"),
                            postgres.create_database("failover"), "database", workers=(1,))
    try:
        yield cluster
    finally:
        cluster.stop()


def test_terminated_backends_mid_burst_fail_cleanly_and_recover(
        postgres: PostgresServer, failover_cluster: Cluster) -> None:
    cluster = failover_cluster
    database = cluster.home.database_url.rsplit("/", 1)[1]
    (instance,) = cluster.instances
    assert instance.proc is not None
    pid = instance.proc.pid
    forge = cluster.forge
    tokens: list[str] = []  # sealed as the burst needs them, however long it lasts
    attempts: list[Attempt] = []
    transport_errors: list[str] = []
    lock = threading.Lock()
    chaos = Chaos(postgres, database)
    chaos.start()

    def after_chaos() -> int:
        return sum(a.sent_at > chaos.ended_at + SETTLE for a in attempts)

    def client_thread() -> None:
        with cluster.client(0, timeout=30.0) as client:
            while True:
                with lock:
                    if chaos.done.is_set() and after_chaos() >= AFTER_CHAOS:
                        return
                    token = forge.seal()
                    tokens.append(token)
                    key = f"failover-{len(tokens)}" if len(tokens) % 2 else None
                headers = {"Idempotency-Key": key} if key else {}
                sent = time.monotonic()
                try:
                    response = client.post("/v1/payments", headers=headers, json={
                        "token": token, "amount": AMOUNT, "currency": "USD"})
                except httpx.TransportError as err:
                    with lock:
                        transport_errors.append(type(err).__name__)
                    continue
                with lock:
                    attempts.append(Attempt(token, key, sent, response))
                    if len(attempts) >= CHAOS_AFTER:
                        chaos.start_event.set()

    threads = [threading.Thread(target=client_thread) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    chaos.start_event.set()  # in case the burst never got going: the chaos thread must end
    chaos.join(timeout=60)

    assert transport_errors == []  # the gateway never dropped a connection
    assert chaos.killed > 0, "no PostgreSQL session was terminated"
    assert after_chaos() >= AFTER_CHAOS, "the burst ended before the chaos did"

    # 201 or a clean 503, nothing else (no 500, no other code).
    statuses = {a.response.status_code for a in attempts}
    assert statuses <= {201, 503}, [a.response.text for a in attempts
                                    if a.response.status_code not in (201, 503)]
    created = {a.token: assert_payment(a.response, amount=AMOUNT)["id"] for a in attempts
               if a.response.status_code == 201}
    failed = [a for a in attempts if a.response.status_code == 503]
    for attempt in failed:
        assert_error(attempt.response, 503, "storage_unavailable")  # with Retry-After
    assert failed, "no request met a terminated connection: the chaos proved nothing"

    # The pool recovered by itself: the same process, and everything sent after the chaos paid.
    assert instance.alive and instance.proc.pid == pid
    assert all(a.response.status_code == 201 for a in attempts
               if a.sent_at > chaos.ended_at + SETTLE)

    # Nothing lost, nothing doubled.
    sent = [a.token for a in attempts]
    assert sorted(sent) == sorted(tokens)  # every token sealed was sent, once
    by_rid = {forge.replay_id_of(t): t for t in tokens}
    ledger = [row for row in cluster.ledger() if row["replay_id"] in by_rid]
    assert len({row["replay_id"] for row in ledger}) == len(ledger) <= len(sent)
    paid = {by_rid[row["replay_id"]]: row["id"] for row in ledger}
    assert created.items() <= paid.items()  # every 201 is in the ledger, under its id

    # A 503'd request, retried after Retry-After with the same token and key, pays once.
    time.sleep(max(int(a.response.headers["retry-after"]) for a in failed))
    with cluster.client(0) as client:
        for attempt in failed:
            retry = client.post("/v1/payments", json=attempt.body(), headers=attempt.headers())
            body = assert_payment(retry, amount=AMOUNT)
            rows = cluster.home.query("SELECT id FROM payments WHERE replay_id = :rid",
                                      rid=forge.replay_id_of(attempt.token))
            assert rows == [{"id": body["id"]}]
            again = client.post("/v1/payments", json=attempt.body(),
                                headers=attempt.headers())
            if attempt.key:
                assert (again.status_code, again.content) == (201, retry.content)
            else:
                assert_error(again, 409, "token_replayed")
        assert client.get("/readyz").status_code == 200

    ledger = [row for row in cluster.ledger() if row["replay_id"] in by_rid]
    assert sorted(by_rid[row["replay_id"]] for row in ledger) == sorted(sent)  # once each
