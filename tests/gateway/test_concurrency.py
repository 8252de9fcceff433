"""Concurrency against the real ``cardseal serve``: single use and idempotency under racing
requests. Each request runs in its own thread with its own HTTPS connection; a barrier releases
them together so that they really overlap inside the gateway."""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.gateway.conftest import PAN_MASTERCARD, Gateway
from tests.gateway.test_api_errors import assert_error, assert_payment


def race(gateway: Gateway, requests: list[Callable[[httpx.Client], httpx.Response]]
         ) -> list[httpx.Response]:
    """Run every request at the same moment, each on its own connection."""
    barrier = threading.Barrier(len(requests))

    def one(request: Callable[[httpx.Client], httpx.Response]) -> httpx.Response:
        with gateway.client() as client:
            client.get("/healthz")  # connect and handshake before the barrier
            barrier.wait(timeout=30)
            return request(client)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def post(token: str, amount: int = 500, key: str | None = None
         ) -> Callable[[httpx.Client], httpx.Response]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    body = {"token": token, "amount": amount, "currency": "USD"}
    return lambda client: client.post("/v1/payments", json=body, headers=headers)


def test_fifty_distinct_tokens_at_once_make_fifty_payments(gateway: Gateway) -> None:
    tokens = [gateway.forge.seal() for _ in range(50)]
    responses = race(gateway, [post(t) for t in tokens])
    assert [r.status_code for r in responses] == [201] * 50, [r.text for r in responses
                                                              if r.status_code != 201]
    ids = {assert_payment(r, amount=500)["id"] for r in responses}
    assert len(ids) == 50
    recorded = {row["id"] for row in gateway.home.query("SELECT id FROM payments")}
    assert ids <= recorded


def test_one_token_twenty_times_at_once_pays_once(gateway: Gateway) -> None:
    token = gateway.forge.seal()
    responses = race(gateway, [post(token) for _ in range(20)])
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 409: 19}, [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            assert_error(response, 409, "token_replayed")
    rows = gateway.home.query("SELECT id FROM payments WHERE replay_id = :rid",
                              rid=gateway.forge.replay_id_of(token))
    assert len(rows) == 1


def test_one_idempotency_key_twenty_times_at_once_is_one_payment(gateway: Gateway) -> None:
    token = gateway.forge.seal(PAN_MASTERCARD)
    key = "burst-" + secrets.token_hex(8)
    responses = race(gateway, [post(token, 777, key) for _ in range(20)])
    created = [r for r in responses if r.status_code == 201]
    assert created, [r.text for r in responses]
    first = created[0].content
    for response in responses:
        if response.status_code == 201:
            assert response.content == first  # the payment's response, byte for byte
        else:
            assert_error(response, 409, "idempotency_conflict")  # still in flight
    body = assert_payment(created[0], amount=777, pan=PAN_MASTERCARD)
    rows = gateway.home.query("SELECT id FROM payments WHERE replay_id = :rid",
                              rid=gateway.forge.replay_id_of(token))
    assert rows == [{"id": body["id"]}]
    # Once it completed, every repeat (even twenty at once) is the first response, byte for byte.
    repeats = race(gateway, [post(token, 777, key) for _ in range(20)])
    assert {(r.status_code, r.content) for r in repeats} == {(201, first)}
