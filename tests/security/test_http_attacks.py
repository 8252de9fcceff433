"""Hostile requests to a real ``cardseal serve`` over HTTPS (the gateway suite's fixture).

Each asserts the exact status and contract code of CONTRACT.md section 5, that the error body is
the contract's shape, and, where a token was involved, that nothing was consumed or charged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.tokens import Payment
from tests.gateway.conftest import OTHER_ISSUER, OTHER_KEY, Gateway, card_json
from tests.security.test_jws_attacks import Listener, new_signer

ERROR_EXTRAS = {"decline_code", "payment_id"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The contract's error body, exactly, with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, response.text
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) - {"code", "message"} <= ERROR_EXTRAS
    return error


def post(client: httpx.Client, body: bytes | dict[str, Any], key: str | None = None
         ) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/payments", content=content, headers=headers)


def pays(client: httpx.Client, token: str) -> None:
    """The token was not consumed by the refused request: it still pays once."""
    response = post(client, {"token": token, "amount": 1999, "currency": "USD"})
    assert response.status_code == 201, response.text


# -- body size ----------------------------------------------------------------------------------


def test_oversize_http_body(gateway: Gateway, client: httpx.Client) -> None:
    """A body one byte over the 64 KiB limit is 413 before it is parsed; at the limit it is
    parsed (and here refused as a schema error, the token being far over 16 KiB).

    Source: CONTRACT.md section 5 (``request_too_large``, body over 64 KiB); OWASP API Security
    Top 10 2023, API4 (unrestricted resource consumption).
    """
    limit = gateway.home.settings.gateway.max_body_bytes
    assert limit == 64 * 1024

    def body(size: int) -> bytes:
        frame = json.dumps({"token": "", "amount": 1, "currency": "USD"}).encode()
        return frame.replace(b'""', b'"' + b"A" * (size - len(frame)) + b'"')

    assert len(body(limit + 1)) == limit + 1
    assert_error(post(client, body(limit + 1)), 413, "request_too_large")
    assert_error(post(client, body(limit)), 400, "request_invalid")


def test_oversize_chunked_body(client: httpx.Client) -> None:
    """A body with no Content-Length, streamed in chunks past the limit.

    Source: CONTRACT.md section 5; RFC 9112 section 7.1 (chunked transfer coding).
    """
    def chunks() -> Iterator[bytes]:
        yield b'{"token": "'
        for _ in range(80):
            yield b"A" * 1024
        yield b'", "amount": 1, "currency": "USD"}'

    response = client.post("/v1/payments", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")


def test_declared_content_length_over_the_limit(gateway: Gateway) -> None:
    """A Content-Length of 10^9 with almost no body: refused on the header, without waiting
    for (or buffering) a gigabyte.

    Source: CONTRACT.md section 5; CWE-400 (uncontrolled resource consumption).
    """
    context = ssl.create_default_context(cafile=str(gateway.home.cacert))
    host, port = "127.0.0.1", gateway.server.port
    with socket.create_connection((host, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /v1/payments HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{}")
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert json.loads(payload)["error"]["code"] == "request_too_large"


def _exchange(gateway: Gateway, *pieces: bytes) -> tuple[bytes, bytes]:
    """Send ``pieces`` on one TLS connection (stopping if the server closes it), then read
    until it closes; the response's head and body."""
    context = ssl.create_default_context(cafile=str(gateway.home.cacert))
    with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        try:
            for piece in pieces:
                tls.sendall(piece)
        except OSError:  # closed on us mid-way: what it answered is still there to read
            pass
        received = b""
        with contextlib.suppress(OSError):
            while chunk := tls.recv(65536):
                received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    return head, payload


def test_oversize_request_head(gateway: Gateway) -> None:
    """Headers that never end (one long header, or many): answered 431 and the connection
    closed once they pass 32 KiB, instead of a worker holding all of them (httptools has no
    limit of its own). Without a fix, 4 such connections took a worker from 95 to 534 MiB.

    Source: RFC 6585 section 5 (431); CWE-400 (uncontrolled resource consumption).
    """
    start = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
    chunked = (b"POST /v1/payments HTTP/1.1\r\nHost: localhost\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
    for pieces in (
        [start, b"X-Pad: "] + [b"a" * 4096] * 16,  # one header, streamed
        [start] + [b"X-Pad-%d: %s\r\n" % (i, b"b" * 1000) for i in range(64)],  # many
        [start + b"X-Pad: " + b"c" * 40000 + b"\r\n\r\n"],  # whole, in one write
        [start + b"X-Pad: " + b"d" * 20000 + b"\r\nX-Pad-2: " + b"e" * 20000 + b"\r\n\r\n"],
        # a chunked body's trailers, streamed past what one read of the server can hold
        # (a read that also ends the head is not counted: it is bounded by its size)
        [chunked, b"X-Trailer: "] + [b"f" * 4096] * 96,
        [chunked + b"X-Trailer: " + b"g" * 40000 + b"\r\n\r\n"],
    ):
        head, payload = _exchange(gateway, *pieces)
        assert head.startswith(b"HTTP/1.1 431 "), head
        assert json.loads(payload)["error"]["code"] == "request_too_large"
    # Under the bound, a long header is served; a body is not counted as head.
    head, _ = _exchange(gateway, start + b"X-Pad: " + b"c" * 20000 + b"\r\n"
                        b"Connection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    body = b'{"token": "' + b"A" * 60000 + b'", "amount": 1, "currency": "USD"}'
    head, payload = _exchange(gateway, b"POST /v1/payments HTTP/1.1\r\nHost: localhost\r\n"
                              b"Content-Type: application/json\r\nConnection: close\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert head.startswith(b"HTTP/1.1 400 "), head  # the app's answer: a token over 16 KiB
    assert json.loads(payload)["error"]["code"] == "request_invalid"


def test_bytes_that_are_not_http_get_the_contract_body(gateway: Gateway) -> None:
    """What the HTTP parser refuses is answered in the contract's error body, not uvicorn's
    text/plain "Invalid HTTP request received."

    Source: CONTRACT.md section 5 ("Every error body is {"error": ...}").
    """
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
        head, payload = _exchange(gateway, garbage)
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert b"content-type: application/json" in head.lower()
        assert json.loads(payload)["error"]["code"] == "request_invalid"


def test_websocket_upgrade_is_plain_http_and_logs_nothing(gateway: Gateway) -> None:
    """The gateway serves no WebSocket. An Upgrade request is answered as the plain request
    it also is (the contract's JSON error), and its path and query, where a careless client
    may put card data, reach no log line.

    Regression: uvicorn handed it to the websockets library, which answered 403 text/plain
    and logged the request line, ``cvv=...&pan=4242%204242...`` included, past the
    redaction (it masks digit runs, not percent-encoded ones).

    Source: CONTRACT.md section 5 ("No response, log line ... ever holds a PAN, a CVV").
    """
    marker = "ws" + secrets.token_hex(8)
    for extra in (b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                  b""):
        head, payload = _exchange(
            gateway, b"GET /v1/payments?%s=1&cvv=739&pan=4242%%204242%%204242%%204242 HTTP/1.1\r\n"
            b"Host: localhost\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n%s"
            b"\r\n" % (marker.encode(), extra))
        assert head.startswith(b"HTTP/1.1 405 "), head
        assert json.loads(payload)["error"]["code"] == "request_invalid"
    head, _ = _exchange(gateway, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                        b"Connection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    # httptools stops at an Upgrade request's head (what follows is the other protocol's):
    # answered, then closed, not kept open with a body and a next request left unread.
    body = b'{"token": "x", "amount": 1, "currency": "USD"}'
    started = time.monotonic()
    head, payload = _exchange(
        gateway, b"POST /v1/payments HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: h2c\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" % (len(body), body))
    assert time.monotonic() - started < 2  # not the keep-alive timeout's close
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower(), head
    assert json.loads(payload)["error"]["code"] == "request_invalid"
    log = gateway.log_path.read_text(errors="replace")
    assert marker not in log
    assert "WebSocket" not in log and "Unsupported upgrade" not in log


# -- malformed JSON bodies ----------------------------------------------------------------------


def _bodies(token: str) -> dict[str, bytes]:
    t = token.encode()
    good = b'{"token": "' + t + b'", "amount": 1999, "currency": "USD"}'
    return {
        "truncated": good[:-1],
        "trailing-garbage": good + b" {}",
        "single-quotes": good.replace(b'"', b"'"),
        "comment": good.replace(b"{", b"{/* x */", 1),
        "trailing-comma": good[:-1] + b",}",
        "nan-amount": good.replace(b"1999", b"NaN"),
        "infinity-amount": good.replace(b"1999", b"Infinity"),
        "huge-float-amount": good.replace(b"1999", b"1e400"),
        "huge-integer-amount": good.replace(b"1999", b"1" + b"0" * 5000),
        "deep-nesting": good[:-1] + b', "x": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        "utf8-bom": b"\xef\xbb\xbf" + good,
        "utf16": good.decode().encode("utf-16"),
        "utf16le": good.decode().encode("utf-16-le"),
        "utf32": good.decode().encode("utf-32"),
        "invalid-utf8": good.replace(b'"USD"', b'"US\xff"'),
        "lone-surrogate": good[:-1] + b', "reference": "\\ud800"}',
        "nul-in-reference": good[:-1] + b', "reference": "a\\u0000b"}',
        "newline-in-reference": good[:-1] + b', "reference": "a\\nb"}',
        "null": b"null",
        "array": b"[" + good + b"]",
        "empty": b"",
        "duplicate-amount": good[:-1] + b', "amount": 1}',
        "duplicate-token": good[:-1] + b', "token": "x"}',
        "duplicate-currency-escaped": good[:-1] + b', "\\u0063urrency": "EUR"}',
    }


BODY_CASES = ["truncated", "trailing-garbage", "single-quotes", "comment", "trailing-comma",
              "nan-amount", "infinity-amount", "huge-float-amount", "huge-integer-amount",
              "deep-nesting", "utf8-bom", "utf16", "utf16le", "utf32", "invalid-utf8",
              "lone-surrogate", "nul-in-reference", "newline-in-reference", "null", "array",
              "empty", "duplicate-amount", "duplicate-token", "duplicate-currency-escaped"]


@pytest.mark.parametrize("case", BODY_CASES)
def test_malformed_json_body(gateway: Gateway, client: httpx.Client, case: str) -> None:
    """Bodies that are not strict UTF-8 JSON of the contract's shape: truncated, trailing data,
    JavaScript-isms, NaN/Infinity, out-of-range numbers, 20,000-deep nesting, a BOM, UTF-16/32,
    invalid UTF-8, lone surrogates, control characters in the reference, duplicate members.

    Found by this suite: duplicate members were accepted, the last one winning (a proxy or WAF
    that keeps the first sees another amount than the gateway charges).

    Source: CONTRACT.md section 5 (``request_invalid``: bad JSON, wrong field types); RFC 8259
    sections 4, 6, 8.1, 9; RFC 7493 section 2 (I-JSON); CVE-2017-12635 (duplicate-key parser
    differential); CVE-2020-10735; CVE-2020-36518.
    """
    token = gateway.forge.seal()
    response = post(client, _bodies(token)[case])
    error = assert_error(response, 400, "request_invalid")
    assert token not in response.text and "1999" not in error["message"]
    pays(client, token)


@pytest.mark.parametrize("with_key", [True, False])
@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff"])
def test_lone_surrogate_issuer_with_idempotency_key(gateway: Gateway, client: httpx.Client,
                                                    with_key: bool, escape: str) -> None:
    """A forged, unsigned token whose ``iss`` is a lone surrogate: its issuer scopes the
    Idempotency-Key before verification.

    Found by this suite: the gateway answered 500 (the database could not encode the issuer);
    now the claim set is refused as malformed JSON before any storage is touched.

    Source: RFC 7493 section 2.1; CONTRACT.md section 5 (no 500 row; an error never echoes).
    """
    header = b64url_encode(json.dumps({"alg": "RS256", "kid": "x", "typ": "card+jwt"}).encode())
    claims = b64url_encode(('{"iss": "' + escape + '", "aud": "payment-gateway"}').encode())
    token = f"{header}.{claims}.{b64url_encode(bytes(256))}"
    response = post(client, {"token": token, "amount": 1, "currency": "USD"},
                    key="surrogate-" + escape[2:] if with_key else None)
    assert_error(response, 401, "token_malformed")


@pytest.mark.parametrize("reference", ["\ud800", "a\x00b", "x\ny"])
def test_unstorable_payment_reference_in_a_signed_token(gateway: Gateway, client: httpx.Client,
                                                        reference: str) -> None:
    """A genuine issuer signs a ``payment`` claim whose reference the ledger cannot hold (a lone
    surrogate; a NUL, which PostgreSQL refuses) or that would forge log lines.

    Found by this suite: the card was charged, then the ledger insert raised (500), leaving the
    token reserved and the charge unrecorded. Now the claim is refused before anything happens.

    Source: RFC 7493 section 2.1; CWE-117; PostgreSQL "Character Types" (no NUL in text).
    """
    forge = gateway.forge
    token = forge.forge(claims={"payment": {"amount": 500, "currency": "USD",
                                            "reference": reference}})
    assert_error(post(client, {"token": token}), 401, "token_malformed")
    assert not gateway.home.reserved(forge.replay_id_of(token))  # never reserved, never charged


# -- token attacks end to end -------------------------------------------------------------------


def _forged(gateway: Gateway, case: str) -> tuple[str, int, str]:
    forge = gateway.forge
    pem = forge.signer.public_key.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk = json.dumps(forge.signer.verification_key().to_jwk()).encode()
    genuine = forge.forge()
    head, payload, _ = genuine.split(".")
    cases: dict[str, tuple[str, int, str]] = {
        "alg-none": (forge.forge(header={"alg": "none"}, sign=lambda _: b""), 401,
                     "token_algorithm_not_allowed"),
        "alg-NoNe": (forge.forge(header={"alg": "NoNe"}, sign=lambda _: b""), 401,
                     "token_algorithm_not_allowed"),
        "hs256-public-pem": (forge.forge(header={"alg": "HS256"}, sign=lambda d: hmac.new(
            pem, d, hashlib.sha256).digest()), 401, "token_algorithm_not_allowed"),
        "hs256-public-jwk": (forge.forge(header={"alg": "HS256"}, sign=lambda d: hmac.new(
            jwk, d, hashlib.sha256).digest()), 401, "token_algorithm_not_allowed"),
        "hs256-empty-secret": (forge.forge(header={"alg": "HS256"}, sign=lambda d: hmac.new(
            b"", d, hashlib.sha256).digest()), 401, "token_algorithm_not_allowed"),
        "empty-signature": (f"{head}.{payload}.", 401, "token_signature_invalid"),
        "es256-psychic": (forge.forge(iss=OTHER_ISSUER, signer=forge.other_signer,
                                      sign=lambda _: bytes(64)), 401, "token_signature_invalid"),
        "kid-traversal": (forge.forge(header={"kid": "../../../../dev/null"}), 401,
                          "token_key_unknown"),
        "kid-sql": (forge.forge(header={"kid": "' OR 1=1--"}), 401, "token_key_unknown"),
        "kid-command": (forge.forge(header={"kid": "$(rm -rf /)"}), 401, "token_key_unknown"),
        "kid-not-a-string": (forge.forge(header={"kid": [forge.signer.kid]}), 401,
                             "token_key_unknown"),
        "jwe-as-token": (json.loads(b64url_decode(payload))["meta_data"], 401,
                         "token_malformed"),
        "crit": (forge.forge(header={"crit": ["exp"]}), 401, "token_malformed"),
        "b64-false": (forge.forge(header={"b64": False, "crit": ["b64"]}), 401,
                      "token_malformed"),
        "padded-base64url": (genuine + "=" * (-len(genuine.split(".")[2]) % 4 or 4), 401,
                             "token_malformed"),
        "typ-jwt": (forge.forge(header={"typ": "JWT"}), 401, "token_type_invalid"),
        "duplicate-alg": (_duplicate_alg(gateway), 401, "token_malformed"),
        "oversize-token": ("A" * (16 * 1024 + 1), 400, "request_invalid"),
        "meta-data-under-other-key": (forge.forge(meta_data=lambda jti: forge.envelope(
            card_json(), jti=jti, key_uri=OTHER_KEY)), 400, "kms_key_not_allowed"),
        "meta-data-of-another-token": (forge.forge(meta_data=lambda _: forge.envelope(
            card_json(), jti="another-token-jti-0001")), 400, "decryption_failed"),
    }
    return cases[case]


def _duplicate_alg(gateway: Gateway) -> str:
    forge = gateway.forge
    header = json.dumps({"alg": "RS256", "kid": forge.signer.kid, "typ": "card+jwt"})
    raw = header[:-1] + ', "alg": "none"}'
    genuine = forge.forge()
    signing_input = b64url_encode(raw.encode()) + "." + genuine.split(".")[1]
    return signing_input + "." + b64url_encode(forge.signer.sign(signing_input.encode()))


TOKEN_CASES = ["alg-none", "alg-NoNe", "hs256-public-pem", "hs256-public-jwk",
               "hs256-empty-secret", "empty-signature", "es256-psychic", "kid-traversal",
               "kid-sql", "kid-command", "kid-not-a-string", "jwe-as-token", "crit", "b64-false",
               "padded-base64url", "typ-jwt", "duplicate-alg", "oversize-token",
               "meta-data-under-other-key", "meta-data-of-another-token"]


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_attacks_over_https(gateway: Gateway, client: httpx.Client, case: str) -> None:
    """The token attacks of test_jws_attacks / test_meta_data_attacks, end to end: the status
    and code the contract's table gives each (an over-long token is refused by the request
    schema, before the token parser, as request_invalid).

    Source: the per-attack sources in test_jws_attacks.py and test_meta_data_attacks.py;
    CONTRACT.md section 5 (status per code).
    """
    token, status, code = _forged(gateway, case)
    response = post(client, {"token": token, "amount": 1999, "currency": "USD"})
    assert_error(response, status, code)
    for echo in ("../../", "OR 1=1", "rm -rf", "none", "NoNe"):
        assert echo not in response.text


@pytest.mark.parametrize("pointer", ["jku", "x5u"])
def test_jku_x5u_over_https_makes_no_request(gateway: Gateway, client: httpx.Client,
                                             pointer: str) -> None:
    """``jku`` / ``x5u`` pointing at a live listener the attacker controls: the gateway process
    never connects to it.

    Source: RFC 8725 sections 2.9 and 3.10 (SSRF); RFC 7515 sections 4.1.2 and 4.1.5.
    """
    listener = Listener()
    try:
        attacker = new_signer()
        token = gateway.forge.forge(header={pointer: listener.url("/jwks.json"),
                                            "kid": attacker.kid}, signer=attacker)
        response = post(client, {"token": token, "amount": 1999, "currency": "USD"})
        assert_error(response, 401, "token_key_unknown")
        assert listener.connections() == 0
    finally:
        listener.close()


def test_replayed_token(gateway: Gateway, client: httpx.Client) -> None:
    """The same genuine token presented twice (a captured token re-sent).

    Source: RFC 7519 section 4.1.7 (jti); RFC 8725 section 2.7; CONTRACT.md section 3 (single
    use at the gateway) and 5 (``token_replayed`` 409).
    """
    token = gateway.forge.seal()
    pays(client, token)
    assert_error(post(client, {"token": token, "amount": 1999, "currency": "USD"}), 409,
                 "token_replayed")
    assert_error(post(client, {"token": token, "amount": 1999, "currency": "USD"},
                      key="replay-with-a-fresh-key"), 409, "token_replayed")


def test_amount_in_body_cannot_override_the_signed_payment(gateway: Gateway,
                                                           client: httpx.Client) -> None:
    """The token's signed ``payment`` says 500; the body asks for 1 (or 10^12).

    Source: CONTRACT.md section 3 ("the gateway charges exactly this") and 5
    (``amount_mismatch``); OWASP API Security Top 10 2023, API6 (sensitive business flows).
    """
    token = gateway.forge.seal(payment=Payment(500, "USD"))
    for amount in (1, 10**12):
        assert_error(post(client, {"token": token, "amount": amount, "currency": "USD"}), 400,
                     "amount_mismatch")
    assert_error(post(client, {"token": token, "amount": 500, "currency": "EUR"}), 400,
                 "amount_mismatch")
    response = post(client, {"token": token})
    assert response.status_code == 201 and response.json()["amount"] == 500


# -- reading payments: authentication and object-level authorization ----------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ' OR '1'='1", "Bearer ' OR 1=1--", "Bearer *",
    "Bearer %", "Basic cGF5bWVudC1zZXJ2aWNlOg==", "bearer x", "Bearer " + "A" * 10_000,
])
def test_api_key_injection_and_guessing(gateway: Gateway, client: httpx.Client,
                                        authorization: str | None) -> None:
    """Missing, empty, SQL-injected, wildcard, other-scheme and over-long API keys.

    Source: OWASP API Security Top 10 2023, API2 (broken authentication); CWE-89;
    CONTRACT.md section 5 (``unauthorized`` 401).
    """
    token = gateway.forge.seal()
    payment = post(client, {"token": token, "amount": 1999, "currency": "USD"}).json()
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get(f"/v1/payments/{payment['id']}", headers=headers)
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize("payment_id", ["' OR 1=1--", "pay_%", "pay_*", "..%2F..%2Fhealthz",
                                        "pay_" + "0" * 24, "x" * 41])
def test_payment_id_injection(gateway: Gateway, client: httpx.Client, payment_id: str) -> None:
    """SQL, wildcard and traversal strings as the payment id, with a valid API key.

    Source: CWE-89; OWASP API Security Top 10 2023, API1 (broken object level authorization);
    CONTRACT.md section 5 (``not_found`` 404).
    """
    response = client.get(f"/v1/payments/{payment_id}",
                          headers={"Authorization": f"Bearer {gateway.api_key()}"})
    assert_error(response, 404, "not_found")


def test_other_issuers_payment_is_not_found(gateway: Gateway, client: httpx.Client) -> None:
    """Issuer B's valid API key asks for issuer A's payment: the same 404 as an unknown id,
    so B learns nothing, not even that it exists.

    Source: OWASP API Security Top 10 2023, API1 (BOLA); CONTRACT.md section 5 ("404 for unknown
    and for other issuers' payments alike").
    """
    token = gateway.forge.seal()
    payment = post(client, {"token": token, "amount": 1999, "currency": "USD"}).json()
    own = client.get(f"/v1/payments/{payment['id']}",
                     headers={"Authorization": f"Bearer {gateway.api_key()}"})
    assert own.status_code == 200 and own.json()["id"] == payment["id"]
    other = client.get(f"/v1/payments/{payment['id']}",
                       headers={"Authorization": f"Bearer {gateway.api_key(OTHER_ISSUER)}"})
    unknown = client.get("/v1/payments/pay_" + "0" * 24,
                         headers={"Authorization": f"Bearer {gateway.api_key(OTHER_ISSUER)}"})
    assert_error(other, 404, "not_found")
    assert other.content == unknown.content
