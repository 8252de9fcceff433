"""Fuzz ``POST /v1/payments`` in-process (the ASGI app through ``httpx.ASGITransport``).

Bodies: random bytes, random JSON, the request object with each field given random or
borderline values (genuine tokens included, mutated or not), genuine bodies with characters
flipped; with random ``Idempotency-Key`` and ``Content-Type`` headers. Every answer is JSON with
a status below 500: a ``PAYMENT`` (201) or exactly the contract's error body, whose code has
that status, which never echoes the token. Any exception escaping the app fails the test.
"""

from __future__ import annotations

import json
import string
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardseal.errors import ALL_CODES, http_status_for
from cardseal.gateway.app import create_app
from tests.faults.asgi import InProcessGateway
from tests.faults.conftest import make_home
from tests.fuzz.conftest import FUZZ, Material
from tests.fuzz.strategies import INTERESTING_NUMBERS, dumps, json_values, mutated_text

PAYMENT_KEYS = {"id", "status", "amount", "currency", "reference", "card", "issuer",
                "created_at"}
ERROR_EXTRAS = {"decline_code", "payment_id"}
MAX_BODY = 64 * 1024


@dataclass
class Target:
    gateway: InProcessGateway
    tokens: list[str]  # genuine for this gateway (each pays once, then is a replay)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = make_home(tmp_path_factory.mktemp("fuzz-http") / "gateway")
    sealer = home.sealer()
    tokens = [home.seal(sealer) for _ in range(4)]
    with InProcessGateway(create_app(home.settings)) as gateway:
        yield Target(gateway, tokens)


def check_answer(response: httpx.Response, body: bytes) -> None:
    """The HTTP oracle: JSON, below 500, the contract's shapes, no echo of the token."""
    assert response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    answer: dict[str, Any] = response.json()
    if response.status_code == 201:
        assert set(answer) == PAYMENT_KEYS
    else:
        assert set(answer) == {"error"}
        error = answer["error"]
        assert error["code"] in ALL_CODES
        assert http_status_for(error["code"]) == response.status_code
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) - {"code", "message"} <= ERROR_EXTRAS
        assert "retry-after" not in response.headers
    try:
        sent = json.loads(body)
    except ValueError:
        return
    token = sent.get("token") if isinstance(sent, dict) else None
    if isinstance(token, str) and len(token) >= 16:
        assert token not in response.text


def post(target: Target, body: bytes, headers: dict[str, str]) -> None:
    response = target.gateway.post("/v1/payments", content=body, headers=headers)
    check_answer(response, body)


def request_objects(target: Target, material: Material) -> st.SearchStrategy[dict[str, Any]]:
    tokens = st.sampled_from(target.tokens + material.tokens)
    return st.fixed_dictionaries({}, optional={
        "token": st.one_of(tokens, tokens.flatmap(mutated_text), json_values,
                           st.text(max_size=40)),
        "amount": st.one_of(st.sampled_from([1999, 1, 0, -1, 10**12, 10**12 + 1, "1999",
                                             1999.0, True, None, *INTERESTING_NUMBERS]),
                            json_values),
        "currency": st.one_of(st.sampled_from(["USD", "usd", "Usd", "XXX", "ZZZ", "US", "USDD",
                                               "", "U$D", None, 840]), json_values),
        "reference": st.one_of(st.text(max_size=300), json_values),
        "extra": json_values,
    })


def headers() -> st.SearchStrategy[dict[str, str]]:
    printable = string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "") \
        .replace("\x0c", "")
    return st.fixed_dictionaries({}, optional={
        "Idempotency-Key": st.text(printable, max_size=300),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "",
                                         "application/json; charset=utf-16",
                                         "multipart/form-data; boundary=x"]),
    })


@FUZZ
@given(st.data())
def test_request_bodies(target: Target, material: Material, data: st.DataObject) -> None:
    genuine = dumps({"token": data.draw(st.sampled_from(target.tokens)), "amount": 1999,
                     "currency": "USD"})
    body = data.draw(st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda value: dumps(value).encode()),
        request_objects(target, material).map(lambda value: dumps(value).encode()),
        mutated_text(genuine, alphabet='{}[]",:0123456789 \\\u00e9\ud800tfnul').map(
            lambda text: text.encode("utf-8", "surrogatepass")),
    ))
    post(target, body, data.draw(headers()))


@pytest.mark.parametrize("size", [MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, 4 * MAX_BODY])
def test_body_size_limit(target: Target, size: int) -> None:
    body = b'{"token": "' + b"A" * (size - 13) + b'"}'
    assert len(body) == size
    response = target.gateway.post("/v1/payments", content=body)
    check_answer(response, body)
    expected = "request_too_large" if size > MAX_BODY else "request_invalid"
    assert response.json()["error"]["code"] == expected


def test_chunked_body_over_the_limit(target: Target) -> None:
    """No Content-Length: the limit holds on the bytes actually streamed."""
    async def stream() -> AsyncIterator[bytes]:
        yield b'{"token": "'
        for _ in range(80):
            yield b"A" * 1024

    response = target.gateway.post("/v1/payments", content=stream())
    assert "content-length" not in response.request.headers
    check_answer(response, b"")
    assert (response.status_code, response.json()["error"]["code"]) == (413, "request_too_large")
