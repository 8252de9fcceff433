"""The gateway on AWS KMS (moto's server behind a fault-injecting proxy), KMS in trouble.

Unreachable (connection refused), slow past the read timeout, and throttling: the payment is
``503 kms_unavailable`` with ``Retry-After`` within the client's bound, nothing is recorded,
the token is given back, ``/readyz`` says the KMS is unavailable; once the proxy heals, the
same request (same token, same ``Idempotency-Key``) is charged, on the same app.

KMS client settings: ``connect_timeout = read_timeout = 0.5`` s, ``max_attempts = 2``, so one
failing call ends within ``2 * (0.5 + 0.5) + 1 = 3`` s (see tests/integration/test_kms_faults.py
for the formula).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cardseal.config import build_sealer
from cardseal.gateway.app import create_app
from cardseal.processor.base import ChargeRequest, ChargeResult
from cardseal.processor.sandbox import SandboxProcessor
from tests.faults.conftest import (
    REGION,
    Home,
    KmsServer,
    assert_error,
    assert_paid,
    make_home,
    pay,
    running,
)
from tests.integration.kms_proxy import KmsProxy

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT = READ_TIMEOUT = 0.5
MAX_ATTEMPTS = 2
BOUND = MAX_ATTEMPTS * (CONNECT_TIMEOUT + READ_TIMEOUT) + sum(
    min(2**i, 20) for i in range(MAX_ATTEMPTS - 1))


@pytest.fixture
def proxy(kms_server: KmsServer) -> Iterator[KmsProxy]:
    proxy = KmsProxy(kms_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


def aws_home(tmp_path: Path, kms_server: KmsServer, proxy: KmsProxy, fmt: str) -> Home:
    """A home whose client seals under, and whose issuer allows, one AWS KMS key (by ARN)."""
    home = make_home(tmp_path / "gateway")
    key = "aws-kms://" + kms_server.new_key_arn()
    issuer = home.settings.issuers[0].model_copy(update={"allowed_kms_keys": [key]})
    aws = home.settings.kms.aws.model_copy(update={
        "region": REGION, "endpoint_url": proxy.endpoint, "connect_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT, "max_attempts": MAX_ATTEMPTS})
    settings = home.settings.model_copy(update={
        "issuers": [issuer],
        "kms": home.settings.kms.model_copy(update={"aws": aws}),
        "client": home.settings.client.model_copy(update={"kms_key": key, "format": fmt}),
    })
    return Home(home.directory, settings)


def inject(proxy: KmsProxy, fault: str) -> None:
    if fault == "unreachable":
        proxy.down()
    else:
        proxy.fault = fault
        proxy.delay = READ_TIMEOUT + 1.0


@pytest.mark.parametrize("fmt", ["envelope", "kms-direct"])
@pytest.mark.parametrize("fault", ["unreachable", "slow", "throttle"])
def test_kms_fault_is_kms_unavailable_then_the_same_request_pays(
    tmp_path: Path, kms_server: KmsServer, proxy: KmsProxy, fault: str, fmt: str
) -> None:
    home = aws_home(tmp_path, kms_server, proxy, fmt)
    app = create_app(home.settings)
    token = home.seal()  # sealed while the KMS is fine
    key = "order-" + secrets.token_hex(4)
    with running(app) as client:
        assert client.get("/readyz").status_code == 200
        inject(proxy, fault)

        start = time.monotonic()
        assert_error(pay(client, token, key=key), 503, "kms_unavailable")
        assert time.monotonic() - start < BOUND
        assert home.ledger() == []  # nothing recorded
        assert home.token_state(token) == "released"  # given back
        assert home.idempotency_state(key) is None  # the key is free for the retry
        start = time.monotonic()
        assert_error(client.get("/readyz"), 503, "kms_unavailable")
        assert time.monotonic() - start < BOUND

        proxy.heal()
        assert client.get("/readyz").json()["checks"]["kms"] == "ok"
        body = assert_paid(pay(client, token, key=key))
    assert [row["id"] for row in home.ledger()] == [body["id"]]
    assert home.token_state(token) == "done"


class _ThreadsSeen(SandboxProcessor):
    """The sandbox, noting the thread each charge runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.threads.append(threading.current_thread().name)
        return super().charge(request)


def test_requests_missing_one_data_key_at_once_share_one_fetch_and_one_thread(
    tmp_path: Path, kms_server: KmsServer, proxy: KmsProxy
) -> None:
    """A new data key reaches a busy gateway in every request in flight: one of them fetches
    it in a worker thread (one KMS Decrypt), the others wait for that and then open on the
    event loop, with no thread of their own."""
    home = aws_home(tmp_path, kms_server, proxy, "envelope")
    processor = _ThreadsSeen()
    app = create_app(home.settings, processor=processor)
    sealer = build_sealer(home.settings)  # the defaults: one data key for these
    tokens = [home.seal(sealer) for _ in range(12)]
    with running(app) as client:
        proxy.reset()
        proxy.fault, proxy.delay = "slow", 0.3  # every request is in flight before it answers
        responses = client.post_many(
            "/v1/payments", [{"token": t, "amount": 1999, "currency": "USD"} for t in tokens])
        proxy.heal()
    for response in responses:
        assert_paid(response)
    assert proxy.attempts == {"Decrypt": 1}
    on_loop = processor.threads.count("in-process-gateway")  # the app's event loop
    assert (on_loop, len(processor.threads)) == (11, 12), processor.threads
    assert len({t.split(".")[1] for t in tokens}) == 12  # distinct tokens, all paid once


def test_when_the_shared_fetch_fails_every_waiting_request_is_kms_unavailable(
    tmp_path: Path, kms_server: KmsServer, proxy: KmsProxy
) -> None:
    """The requests that waited for a fetch that failed try for themselves: each gets the
    contract's 503, each token is given back, and each pays once the KMS answers again."""
    home = aws_home(tmp_path, kms_server, proxy, "envelope")
    app = create_app(home.settings, processor=_ThreadsSeen())
    sealer = build_sealer(home.settings)
    tokens = [home.seal(sealer) for _ in range(6)]
    bodies = [{"token": t, "amount": 1999, "currency": "USD"} for t in tokens]
    with running(app) as client:
        proxy.fault = "throttle"
        for response in client.post_many("/v1/payments", bodies):
            assert_error(response, 503, "kms_unavailable")
        assert {home.token_state(t) for t in tokens} == {"released"}
        proxy.heal()
        for response in client.post_many("/v1/payments", bodies):
            assert_paid(response)
    assert len(home.ledger()) == 6
