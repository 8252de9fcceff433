"""``POST /v1/payments`` is served by a plain ASGI handler in front of FastAPI's stack; the
FastAPI route behind it documents the operation and, without that handler, serves it the same
way. Both give the same answers, byte for byte where nothing random is in them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cardseal.gateway.app import create_app
from tests.faults.asgi import InProcessGateway
from tests.faults.conftest import Home, assert_error, assert_paid, pay, running


def _requests(client: InProcessGateway, home: Home) -> list[httpx.Response]:
    token = home.seal()
    return [
        pay(client, token),  # paid
        pay(client, token),  # replayed
        client.post("/v1/payments", content=b"{not json", headers={"content-type": "x"}),
        client.post("/v1/payments", content=b"x" * 70_000),  # over the 64 KiB body limit
        client.post("/v1/payments", content=b"{}", headers={"content-length": "999999"}),
        client.post("/v1/payments", json={"token": "a.b.c", "amount": 1, "currency": "USD"}),
    ]


def _shape(response: httpx.Response) -> tuple[int, str, Any]:
    body = response.json()
    code = body["error"]["code"] if "error" in body else body["status"]
    return response.status_code, response.headers["content-type"], code


@pytest.fixture
def without_fast_path(home: Home) -> Iterator[InProcessGateway]:
    app = create_app(home.settings)
    assert app.payments is not None
    app.payments = None  # FastAPI's own route serves it
    with running(app) as client:
        yield client


def _request_counts(client: InProcessGateway) -> dict[str, float]:
    """``cardseal_http_requests_total`` of POST /v1/payments, by status."""
    counts = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('cardseal_http_requests_total{') and 'route="/v1/payments"' in line:
            assert 'method="POST"' in line
            status = line.split('status="')[1].split('"')[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts


def test_the_route_behind_answers_counts_and_times_as_the_handler_in_front(
    home: Home, without_fast_path: InProcessGateway
) -> None:
    with running(create_app(home.settings)) as client:
        fast = _requests(client, home)
        fast_counts = _request_counts(client)
        fast_metrics = client.get("/metrics").text
    slow = _requests(without_fast_path, home)
    slow_counts = _request_counts(without_fast_path)
    assert [_shape(r) for r in fast] == [_shape(r) for r in slow]
    for responses in (fast, slow):
        assert_paid(responses[0])
        assert_error(responses[1], 409, "token_replayed")
        assert_error(responses[2], 400, "request_invalid")
        assert_error(responses[3], 413, "request_too_large")
        assert_error(responses[4], 413, "request_too_large")
        assert_error(responses[5], 401, "token_malformed")
    assert [r.content for r in fast[1:]] == [r.content for r in slow[1:]]
    for f, s in zip(fast, slow, strict=True):
        assert f.headers["content-type"] == s.headers["content-type"] == "application/json"
        assert int(f.headers["content-length"]) == len(f.content)
        assert "retry-after" not in f.headers and "retry-after" not in s.headers
    expected = {"201": 1.0, "409": 1.0, "400": 1.0, "413": 2.0, "401": 1.0}
    assert fast_counts == slow_counts == expected
    assert ('cardseal_http_request_duration_seconds_count{route="/v1/payments"} 6.0'
            in fast_metrics)


def test_the_operation_is_documented(home: Home) -> None:
    operation = create_app(home.settings).openapi()["paths"]["/v1/payments"]["post"]
    assert operation["parameters"][0]["name"] == "Idempotency-Key"
    assert {"201", "400", "401", "409", "413", "503"} <= set(operation["responses"])
