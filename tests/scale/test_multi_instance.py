"""Three ``cardseal serve`` processes on three ports, one PostgreSQL database: single use,
idempotency and the ledger hold across instances.

The cluster runs twice: used tokens in the database (the default), then in Redis under a fresh
key prefix. Instance 0 runs ``--workers 2`` (uvicorn's supervisor, Prometheus multiprocess
mode); instances 1 and 2 run one worker each. Every payment a test sees a 201 for is kept in
``paid``, so the ledger can be compared with the answers as a whole.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cardseal.storage.replay import split_redis_spec
from tests.conftest import PostgresServer, RedisServer
from tests.gateway.test_api_errors import assert_error, assert_payment
from tests.scale.conftest import Cluster, Request, race, start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

INSTANCES = 3
WORKERS = (2, 1, 1)
SAME_TOKEN_REQUESTS = 30
SAME_TOKEN_ROUNDS = 3
DISTINCT_TOKENS = 300
THREADS = 12

paid: dict[str, dict[str, int]] = {}
"""Per cluster (its database URL): payment id -> amount of every 201 the tests received."""


@pytest.fixture(scope="module", params=["database", "redis"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            postgres: PostgresServer, redis_server: RedisServer) -> Iterator[Cluster]:
    replay_store = redis_server.replay_store() if request.param == "redis" else "database"
    started = start_cluster(tmp_path_factory.mktemp("multi"),
                            postgres.create_database("multi"), replay_store, workers=WORKERS)
    paid[started.home.database_url] = {}
    try:
        yield started
    finally:
        started.stop()


def record(cluster: Cluster, response: httpx.Response, amount: int) -> str:
    body = assert_payment(response, amount=amount)
    paid[cluster.home.database_url][body["id"]] = amount
    return str(body["id"])


def post(token: str, amount: int, key: str | None = None) -> Request:
    """``POST /v1/payments`` of ``token`` (with an ``Idempotency-Key`` if given)."""
    body = {"token": token, "amount": amount, "currency": "USD"}
    headers = {"Idempotency-Key": key} if key else {}
    return lambda client: client.post("/v1/payments", json=body, headers=headers)


def authorized_count(client: httpx.Client) -> float:
    """``cardseal_payment_outcomes_total{code="authorized"}`` on one instance's ``/metrics``."""
    page = client.get("/metrics").text
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if (sample.name == "cardseal_payment_outcomes_total"
                    and sample.labels.get("code") == "authorized"):
                return float(sample.value)
    return 0.0


def test_every_instance_is_ready_on_the_shared_database(cluster: Cluster) -> None:
    for index, instance in enumerate(cluster.instances):
        with cluster.client(index) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "replay_store": "ok", "kms": "ok"}
        assert instance.alive
    assert len({i.port for i in cluster.instances}) == INSTANCES
    started = [i.workers_started() for i in cluster.instances]
    assert started == list(WORKERS)  # instance 0 really runs two worker processes


def test_one_token_on_every_instance_at_once_pays_once(cluster: Cluster) -> None:
    for _ in range(SAME_TOKEN_ROUNDS):
        token = cluster.forge.seal()
        send = post(token, 2500)
        responses = race(cluster, [(i % INSTANCES, send) for i in range(SAME_TOKEN_REQUESTS)])
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {201: 1, 409: SAME_TOKEN_REQUESTS - 1}, [r.text for r in responses]
        (winner,) = [r for r in responses if r.status_code == 201]
        payment_id = record(cluster, winner, 2500)
        for response in responses:
            if response.status_code == 409:
                assert_error(response, 409, "token_replayed")
        rows = cluster.home.query("SELECT id FROM payments WHERE replay_id = :rid",
                                  rid=cluster.forge.replay_id_of(token))
        assert rows == [{"id": payment_id}]


def test_one_idempotency_key_on_every_instance_at_once_is_one_payment(
        cluster: Cluster) -> None:
    token = cluster.forge.seal()
    once = post(token, 3100, "multi-" + secrets.token_hex(8))
    send = [(i % INSTANCES, once) for i in range(SAME_TOKEN_REQUESTS)]
    responses = race(cluster, send)
    created = [r for r in responses if r.status_code == 201]
    assert created, [r.text for r in responses]
    first = created[0].content
    for response in responses:
        if response.status_code == 201:
            assert response.content == first  # one payment, answered byte for byte
        else:
            assert_error(response, 409, "idempotency_conflict")  # still in flight elsewhere
    payment_id = record(cluster, created[0], 3100)
    rows = cluster.home.query("SELECT id FROM payments WHERE replay_id = :rid",
                              rid=cluster.forge.replay_id_of(token))
    assert rows == [{"id": payment_id}]
    # Finished: every instance now answers the first response, byte for byte.
    assert {(r.status_code, r.content) for r in race(cluster, send)} == {(201, first)}


def test_distinct_tokens_across_instances_make_one_payment_each(
        cluster: Cluster, redis_server: RedisServer) -> None:
    forge = cluster.forge
    tokens = [forge.seal() for _ in range(DISTINCT_TOKENS)]
    amounts = [100 + i for i in range(DISTINCT_TOKENS)]  # all different: sums mean something
    clients = [cluster.client(i) for i in range(INSTANCES)]
    try:
        before = authorized_count(clients[0])

        def pay(i: int) -> httpx.Response:
            return post(tokens[i], amounts[i])(clients[i % INSTANCES])

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            responses = list(pool.map(pay, range(DISTINCT_TOKENS)))
        after = authorized_count(clients[0])
    finally:
        for client in clients:
            client.close()

    assert [r.status_code for r in responses] == [201] * DISTINCT_TOKENS, [
        r.text for r in responses if r.status_code != 201][:5]
    ids = [record(cluster, r, amounts[i]) for i, r in enumerate(responses)]
    assert len(set(ids)) == DISTINCT_TOKENS
    # Instance 0's two workers answered a third of the payments; its /metrics adds both up.
    assert after - before == DISTINCT_TOKENS // INSTANCES

    ledger = cluster.ledger()
    by_rid = {forge.replay_id_of(t): i for i, t in enumerate(tokens)}
    mine = {row["replay_id"]: row for row in ledger if row["replay_id"] in by_rid}
    assert len(mine) == DISTINCT_TOKENS  # one payment per token
    assert {rid: row["id"] for rid, row in mine.items()} == {
        rid: ids[i] for rid, i in by_rid.items()}  # each under the id its 201 gave
    assert all(row["amount"] == amounts[by_rid[rid]] for rid, row in mine.items())

    # Each token's single-use record is "done" in the configured store, and only there.
    spec = cluster.home.settings.gateway.replay_store
    used = {r["replay_id"]: r for r in cluster.home.query("SELECT * FROM used_tokens")}
    if spec == "database":
        assert {rid: used[rid]["state"] for rid in by_rid} == dict.fromkeys(by_rid, "done")
        assert {rid: used[rid]["payment_id"] for rid in by_rid} == {
            rid: ids[i] for rid, i in by_rid.items()}
    else:
        _, prefix = split_redis_spec(spec)
        assert used == {}
        records = redis_server.client.mget([prefix + rid for rid in by_rid])
        assert records == [f"done:{ids[i]}".encode() for i in by_rid.values()]

    # The whole ledger is exactly the 201s this module received: no duplicate, no stray row.
    answered = paid[cluster.home.database_url]
    assert len(ledger) == len({row["id"] for row in ledger}) == len(
        {row["replay_id"] for row in ledger})
    assert {row["id"]: row["amount"] for row in ledger} == answered
    assert sum(row["amount"] for row in ledger) == sum(answered.values())
    assert {row["status"] for row in ledger} == {"authorized"}
