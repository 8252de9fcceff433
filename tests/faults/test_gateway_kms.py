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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cardseal.gateway.app import create_app
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
