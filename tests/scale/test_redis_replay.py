"""Redis as the replay store: its key prefix, and what a gateway does when Redis goes away.

The policy is fail closed: while Redis cannot answer, a payment is ``503 storage_unavailable``
with ``Retry-After`` (nothing is charged without its single-use record), ``/readyz`` is 503, and
the token is not used up, so the client's retry pays once Redis is back, without a restart.
Redis is reached through ``TcpProxy``, which makes it refuse connections (a dead server) or
swallow every byte (a dead network link: only timeouts tell), then brings it back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from cardseal.errors import ConfigError, StorageError, TokenError
from cardseal.storage.replay import (
    DEFAULT_REDIS_PREFIX,
    RedisReplayStore,
    build_replay_store,
    split_redis_spec,
)
from cardseal.storage.sql import ReservationInDoubtError, SqlStore
from tests.conftest import PostgresServer, RedisServer
from tests.gateway.test_api_errors import assert_error, assert_payment
from tests.scale.conftest import Cluster, start_cluster
from tests.scale.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AMOUNT = 4400
MAX_UNAVAILABLE_SECONDS = 10.0  # a 503 comes within the store's bounded timeouts and retries


def test_key_prefix_is_the_url_fragment(tmp_path: Path) -> None:
    assert split_redis_spec("redis://h:6379/0") == ("redis://h:6379/0", DEFAULT_REDIS_PREFIX)
    assert split_redis_spec("redis://:pw@h:6379/2#eu:pay:") == ("redis://:pw@h:6379/2",
                                                                 "eu:pay:")
    assert split_redis_spec("unix:///run/redis.sock?db=1#a%3Ab:") == (
        "unix:///run/redis.sock?db=1", "a:b:")
    store = SqlStore(url=f"sqlite:///{tmp_path}/unused.db")
    for bad in ("redis://h/0#", "redis://h/0#a%20b", "redis://h/0#" + "x" * 101,
                "redis://h/0#a%0Ab"):
        with pytest.raises(ConfigError) as excinfo:
            build_replay_store(bad, store)
        assert "x" * 20 not in str(excinfo.value)  # names the rule, does not echo the value
    replay = build_replay_store("redis://127.0.0.1:1/0#pfx:", store)
    assert isinstance(replay, RedisReplayStore)
    asyncio.run(replay.close())
    asyncio.run(store.close())


def test_records_stay_under_their_prefix(redis_server: RedisServer) -> None:
    spec = redis_server.replay_store()
    _, prefix = split_redis_spec(spec)

    async def scenario() -> tuple[str, str]:
        replay = build_replay_store(spec, SqlStore(url="sqlite:///:memory:"))
        try:
            first = await replay.reserve("a" * 64, int(time.time()) + 60)
            await replay.release("a" * 64)
            again = await replay.reserve("a" * 64, int(time.time()) + 60)
            await replay.done("a" * 64)
            return first, again
        finally:
            await replay.close()

    first, again = asyncio.run(scenario())
    assert first == again  # a released token is charged again under the same payment id
    assert redis_server.keys(spec) == [(prefix + "a" * 64).encode()]
    assert redis_server.client.get(prefix + "a" * 64) == f"done:{first}".encode()
    assert redis_server.client.ttl(prefix + "a" * 64) > 0  # expires with the token


class LosesAnAnswer(aioredis.Redis):
    """Applies the next ``SET`` in Redis (``lose_set``), then loses its reply, as a timeout
    does."""

    lose_set = False

    async def set(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        applied = await super().set(*args, **kwargs)
        if self.lose_set:
            self.lose_set = False
            raise TimeoutError("the answer was lost")
        return applied


def test_a_reservation_whose_answer_was_lost_is_given_back(redis_server: RedisServer) -> None:
    """``SET NX`` applied in Redis, its reply lost (a timeout): the token must not stay
    reserved until it expires, refusing the client's retry (``token_replayed``) though nothing
    was charged. The store says the reservation is in doubt; its ``undo`` gives it back (the
    gateway runs it in the background), and the retry reserves it afresh, under a new payment
    id, which the undo, run again, leaves alone, as it leaves a token past its reservation
    (spent, done)."""
    spec = redis_server.replay_store()
    url, prefix = split_redis_spec(spec)

    async def scenario() -> None:
        client = LosesAnAnswer.from_url(url, socket_timeout=2)
        client.lose_set = True
        replay = RedisReplayStore(url, prefix=prefix, client=client)
        rid, expires = "d" * 64, int(time.time()) + 60
        try:
            with pytest.raises(ReservationInDoubtError) as doubt:
                await replay.reserve(rid, expires)
            assert doubt.value.code == "storage_unavailable"
            stuck = redis_server.client.get(prefix + rid)
            assert stuck is not None and stuck.startswith(b"pending:")  # it had landed
            await doubt.value.undo()
            assert redis_server.client.get(prefix + rid) is None  # given back whole
            payment_id = await replay.reserve(rid, expires)  # the retry goes on, afresh
            assert stuck != b"pending:" + payment_id.encode()
            await doubt.value.undo()  # run again (its own answer lost): not the retry's
            assert redis_server.client.get(prefix + rid) == b"pending:" + payment_id.encode()
            await replay.done(rid)
            await doubt.value.undo()  # a paid token stays paid
            assert redis_server.client.get(prefix + rid) == b"done:" + payment_id.encode()
            with pytest.raises(TokenError):
                await replay.reserve(rid, expires)
        finally:
            await replay.close()

    async def refused() -> None:  # nothing sent: a plain 503, nothing to give back
        replay = RedisReplayStore("redis://127.0.0.1:1/0", prefix=prefix)
        try:
            with pytest.raises(StorageError) as failed:
                await replay.reserve("e" * 64, int(time.time()) + 60)
            assert not isinstance(failed.value, ReservationInDoubtError)
        finally:
            await replay.close()

    asyncio.run(scenario())
    asyncio.run(refused())



@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
                 redis_server: RedisServer) -> Iterator[tuple[Cluster, TcpProxy, str]]:
    """One gateway whose Redis replay store is reached through a ``TcpProxy``."""
    proxy = TcpProxy(*redis_server.address)
    try:
        spec = redis_server.replay_store(port=proxy.port)
        cluster = start_cluster(tmp_path_factory.mktemp("redis"),
                                postgres.create_database("redis"), spec, workers=(1,))
        try:
            yield cluster, proxy, spec
        finally:
            cluster.stop()
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["down", "hang"])
def test_redis_unreachable_fails_closed_and_recovers(
        fault: str, behind_proxy: tuple[Cluster, TcpProxy, str],
        redis_server: RedisServer) -> None:
    cluster, proxy, spec = behind_proxy
    forge = cluster.forge
    used, token = forge.seal(), forge.seal()
    key = {"Idempotency-Key": "redis-" + fault}
    body = {"token": token, "amount": AMOUNT, "currency": "USD"}
    ledger_before = len(cluster.ledger())
    with cluster.client(0) as client:
        assert_payment(client.post("/v1/payments", json={
            "token": used, "amount": AMOUNT, "currency": "USD"}), amount=AMOUNT)

        getattr(proxy, fault)()
        for headers in (key, {}):
            began = time.monotonic()
            response = client.post("/v1/payments", json=body, headers=headers)
            assert time.monotonic() - began < MAX_UNAVAILABLE_SECONDS
            assert_error(response, 503, "storage_unavailable")  # with Retry-After
        assert_error(client.get("/readyz"), 503, "storage_unavailable")
        assert client.get("/healthz").status_code == 200
        assert len(cluster.ledger()) == ledger_before + 1  # nothing charged meanwhile

        proxy.up()
        time.sleep(int(response.headers["retry-after"]))
        paid = client.post("/v1/payments", json=body, headers=key)
        payment = assert_payment(paid, amount=AMOUNT)
        again = client.post("/v1/payments", json=body, headers=key)
        assert (again.status_code, again.content) == (201, paid.content)
        assert_error(client.post("/v1/payments", json=body), 409, "token_replayed")
        assert_error(client.post("/v1/payments", json={
            "token": used, "amount": AMOUNT, "currency": "USD"}), 409, "token_replayed")
        assert client.get("/readyz").status_code == 200
    rows = cluster.home.query("SELECT id FROM payments WHERE replay_id = :rid",
                              rid=forge.replay_id_of(token))
    assert rows == [{"id": payment["id"]}]
    assert len(cluster.ledger()) == ledger_before + 2
    assert cluster.home.query("SELECT count(*) AS n FROM used_tokens") == [{"n": 0}]
    _, prefix = split_redis_spec(spec)
    records = redis_server.client.mget([prefix + forge.replay_id_of(t) for t in (used, token)])
    assert all(r is not None and r.startswith(b"done:") for r in records)  # they live in Redis
