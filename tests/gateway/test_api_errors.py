"""Every row of the contract's error table (CONTRACT.md section 5), over a real HTTPS socket.

Most tests talk to the session's ``cardseal serve`` subprocess. The three 503 rows need a fault
(the KMS, the processor, the database down): those build the app in-process with
``create_app(settings, processor=...)`` and serve it with uvicorn in a thread on a free port,
still over HTTPS and a real socket.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import insert, update
from sqlalchemy.sql import Executable

from cardseal import jws
from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.errors import (
    ConfigError,
    KeyProviderError,
    ProcessorError,
    StorageError,
    TokenError,
)
from cardseal.gateway.app import create_app
from cardseal.gateway.payments import _dumps
from cardseal.gateway.schemas import PaymentRequest
from cardseal.keys.base import DataKey, EncryptionContext, KeyProvider, KeyProviders
from cardseal.keys.signing import PemSigner, generate_private_key_pem
from cardseal.processor.base import ChargeRequest, ChargeResult, PaymentProcessor
from cardseal.processor.sandbox import DECLINES, SandboxProcessor
from cardseal.storage.models import idempotency_keys
from cardseal.storage.replay import ReplayStore
from cardseal.storage.sql import ReservationInDoubtError, SqlStore, new_payment_id
from cardseal.testing import SANDBOX_DECLINES
from cardseal.tokens import Payment, TokenVerifier
from tests.gateway.conftest import (
    AUDIENCE,
    CVV,
    CVV_AMEX,
    EXPIRY,
    ISSUER,
    OTHER_ISSUER,
    OTHER_KEY,
    PAN_AMEX,
    PAN_LUHN_INVALID,
    PAN_MASTERCARD,
    PAN_NO_BRAND,
    PAN_VISA,
    Gateway,
    GatewayHome,
    TokenForge,
    card_json,
    cardseal_command,
    serve_in_thread,
    tamper_signature,
)

ERROR_EXTRAS = {"decline_code", "payment_id"}
PAYMENT_KEYS = {"id", "status", "amount", "currency", "reference", "card", "issuer", "created_at"}
CARD_KEYS = {"brand", "last4", "masked", "exp_month", "exp_year", "fingerprint"}
PAYMENT_ID = re.compile(r"pay_[0-9a-f]{36}")
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The contract's error body, exactly: ``{"error": {"code", "message", ...}}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code, response.text
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) - {"code", "message"} <= ERROR_EXTRAS
    if status == 503:
        assert response.headers["retry-after"].isdigit()
    else:
        assert "retry-after" not in response.headers
    return dict(error)


def pay(client: httpx.Client, token: str, amount: int | None = 1999,
        currency: str | None = "USD", *, key: str | bytes | None = None,
        **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"token": token, **extra}
    if amount is not None:
        body["amount"] = amount
    if currency is not None:
        body["currency"] = currency
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/payments", json=body, headers=headers)


def assert_payment(response: httpx.Response, *, amount: int, currency: str = "USD",
                   reference: str | None = None, pan: str = PAN_VISA,
                   issuer: str = ISSUER) -> dict[str, Any]:
    """A 201 whose body is exactly the contract's ``PAYMENT``."""
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == PAYMENT_KEYS
    assert PAYMENT_ID.fullmatch(body["id"])
    assert body["status"] == "authorized"
    assert (body["amount"], body["currency"], body["reference"]) == (amount, currency, reference)
    assert body["issuer"] == issuer
    assert CREATED_AT.fullmatch(body["created_at"])
    card = body["card"]
    assert set(card) == CARD_KEYS
    assert card["last4"] == pan[-4:]
    assert card["masked"] == pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    assert (card["exp_month"], card["exp_year"]) == (12, 2030)
    assert re.fullmatch(r"fp_[0-9a-f]{32}", card["fingerprint"])
    return body


# -- health, metrics, schema -----------------------------------------------------------------


def test_healthz_readyz_metrics_openapi(gateway: Gateway, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "replay_store": "ok",
                                                          "kms": "ok"}}
    assert pay(client, gateway.forge.seal()).status_code == 201
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "cardseal_payment_outcomes_total" in metrics.text
    assert 'cardseal_payment_outcomes_total{code="authorized"}' in metrics.text
    assert "cardseal_kms_calls_total" in metrics.text
    assert 'cardseal_kms_calls_total{operation="decrypt"}' in metrics.text
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/payments"]["post"]["responses"]
    assert {"201", "400", "401", "402", "409", "413", "422", "503"} <= set(responses)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    wrong = client.delete("/v1/payments")
    assert_error(wrong, 405, "request_invalid")
    assert wrong.headers["allow"] == "POST"  # a 405 names what the resource takes (RFC 9110)
    # A trailing slash is another path: the contract's 404, not a redirect whose Location
    # comes from the request's Host header.
    for path in ("/v1/payments/", "/healthz/"):
        response = client.post(path, headers={"Host": "evil.example"}, content=b"{}")
        assert "location" not in response.headers
        assert_error(response, 404, "not_found")


# -- 201 ---------------------------------------------------------------------------------------


def test_payment_body_is_the_contracts_payment(gateway: Gateway, client: httpx.Client) -> None:
    created = assert_payment(pay(client, gateway.forge.seal(), 1999, "usd", reference="order-1"),
                             amount=1999, reference="order-1")
    assert created["card"]["brand"] == "visa"
    again = client.get(f"/v1/payments/{created['id']}",
                       headers={"Authorization": f"Bearer {gateway.api_key()}"})
    assert again.status_code == 200
    assert again.json() == created


def test_payment_claim_is_charged_when_body_omits_amount(gateway: Gateway,
                                                         client: httpx.Client) -> None:
    token = gateway.forge.seal(PAN_MASTERCARD, payment=Payment(4200, "EUR", "inv-7"))
    body = assert_payment(pay(client, token, None, None), amount=4200, currency="EUR",
                          reference="inv-7", pan=PAN_MASTERCARD)
    assert body["card"]["brand"] == "mastercard"
    agreeing = gateway.forge.seal(PAN_AMEX, CVV_AMEX, payment=Payment(1, "JPY"))
    body = assert_payment(pay(client, agreeing, 1, "JPY"), amount=1, currency="JPY",
                          pan=PAN_AMEX)
    assert body["card"]["brand"] == "amex"


def test_kms_direct_and_second_issuer_pay(gateway: Gateway, client: httpx.Client) -> None:
    forge = gateway.forge
    direct = forge.forge(meta_data=lambda jti: forge.kms_direct(card_json(), jti=jti))
    assert_payment(pay(client, direct), amount=1999)
    other = forge.forge(iss=OTHER_ISSUER, signer=forge.other_signer)
    assert_payment(pay(client, other), amount=1999, issuer=OTHER_ISSUER)


def test_cardseal_pay_against_the_gateway(gateway: Gateway) -> None:
    """The client command end to end, with deprecations as errors (it once passed httpx a CA
    path as ``verify=<str>``, which httpx deprecates)."""
    home = gateway.home
    env = {**home.env, "PYTHONWARNINGS": "error::DeprecationWarning"}
    for pan in (PAN_VISA, "4000000000009995"):
        gateway.registry.card(card_json(pan, CVV))
    command = cardseal_command("--config", str(home.config), "pay", "--amount", "1500",
                               "--currency", "EUR", "--reference", "cli-1",
                               "--gateway", gateway.url)
    paid = subprocess.run(command, input=card_json(PAN_VISA, CVV), capture_output=True,
                          env=env, timeout=60, check=False)
    assert paid.returncode == 0, paid.stderr.decode(errors="replace")
    body = json.loads(paid.stdout)
    assert set(body) == PAYMENT_KEYS
    assert (body["status"], body["amount"], body["currency"], body["reference"]) == (
        "authorized", 1500, "EUR", "cli-1")
    gateway.registry.responses.append(paid.stdout + paid.stderr)
    declined = subprocess.run(command, input=card_json("4000000000009995", CVV),
                              capture_output=True, env=env, timeout=60, check=False)
    assert declined.returncode == 6, declined.stderr.decode(errors="replace")
    error = json.loads(declined.stderr)["error"]
    assert (error["code"], error["decline_code"]) == ("payment_declined", "insufficient_funds")
    gateway.registry.responses.append(declined.stdout + declined.stderr)


# -- request_invalid, request_too_large ----------------------------------------------------------


REQUEST_INVALID: dict[str, Callable[[str], bytes | dict[str, Any]]] = {
    "bad-json": lambda t: b'{"token": "' + t.encode() + b'", "amount": 1',
    "empty-body": lambda t: b"",
    "not-an-object": lambda t: b"[1, 2]",
    "nan": lambda t: b'{"token": "' + t.encode() + b'", "amount": NaN, "currency": "USD"}',
    "token-not-string": lambda t: {"token": 123, "amount": 1999, "currency": "USD"},
    "token-missing": lambda t: {"amount": 1999, "currency": "USD"},
    "token-empty": lambda t: {"token": "", "amount": 1999, "currency": "USD"},
    "amount-numeric-string": lambda t: {"token": t, "amount": "1999", "currency": "USD"},
    "amount-float": lambda t: {"token": t, "amount": 1999.0, "currency": "USD"},
    "amount-bool": lambda t: {"token": t, "amount": True, "currency": "USD"},
    "amount-zero": lambda t: {"token": t, "amount": 0, "currency": "USD"},
    "amount-negative": lambda t: {"token": t, "amount": -5, "currency": "USD"},
    "currency-unknown": lambda t: {"token": t, "amount": 1999, "currency": "ABC"},
    "currency-number": lambda t: {"token": t, "amount": 1999, "currency": 840},
    "currency-two-letters": lambda t: {"token": t, "amount": 1999, "currency": "US"},
    "reference-not-string": lambda t: {"token": t, "amount": 1999, "currency": "USD",
                                       "reference": 7},
    "unknown-field": lambda t: {"token": t, "amount": 1999, "currency": "USD",
                                "card_number": PAN_VISA},
    "no-amount-no-payment-claim": lambda t: {"token": t, "currency": "USD"},
    "no-currency-no-payment-claim": lambda t: {"token": t, "amount": 1999},
}


@pytest.mark.parametrize("case", list(REQUEST_INVALID))
def test_request_invalid(gateway: Gateway, client: httpx.Client, case: str) -> None:
    token = gateway.forge.seal()
    body = REQUEST_INVALID[case](token)
    if isinstance(body, dict):
        response = client.post("/v1/payments", json=body)
    else:
        response = client.post("/v1/payments", content=body,
                               headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "request_invalid")
    assert PAN_VISA not in response.text and token not in response.text
    assert "1999" not in error["message"]
    # Nothing was consumed: the same token still pays.
    assert pay(client, token).status_code == 201


def test_idempotency_key_too_long_is_request_invalid(gateway: Gateway,
                                                     client: httpx.Client) -> None:
    token = gateway.forge.seal()
    key = secrets.token_hex(8) + "k" * 239  # 255 characters, fresh in a shared database
    assert_error(pay(client, token, key=key + "k"), 400, "request_invalid")
    assert pay(client, token, key=key).status_code == 201


def test_idempotency_key_is_utf8_text(gateway: Gateway, client: httpx.Client) -> None:
    """A key's length counts characters, as the contract says, and its UTF-8 bytes are read
    as UTF-8: "clé" is stored as "clé" (it was read as latin-1, "clÃ©", and a 255-character
    key of two-byte letters was refused as too long). Bytes that are no UTF-8 are no key."""
    token = gateway.forge.seal()
    key = "clé-" + secrets.token_hex(8) + "é" * 235  # 255 characters, 491 bytes
    assert_error(pay(client, token, key=(key + "é").encode()), 400, "request_invalid")
    assert_error(pay(client, token, key=b"order-\xff\xfe"), 400, "request_invalid")
    first = pay(client, token, key=key.encode())
    assert_payment(first, amount=1999)
    again = pay(client, token, key=key.encode())
    assert (again.status_code, again.content) == (201, first.content)
    stored = gateway.home.query("SELECT key FROM idempotency_keys WHERE key LIKE 'cl%'")
    assert key in [row["key"] for row in stored]


def test_request_too_large(gateway: Gateway, client: httpx.Client) -> None:
    limit = gateway.home.settings.gateway.max_body_bytes
    assert limit == 64 * 1024
    padding = "A" * (limit + 10)
    body = json.dumps({"token": padding, "amount": 1, "currency": "USD"}).encode()
    assert_error(client.post("/v1/payments", content=body,
                             headers={"Content-Type": "application/json"}),
                 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    response = client.post("/v1/payments", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")
    # At the limit exactly the body is parsed (and refused for its oversized token instead).
    exact = json.dumps({"token": "A" * 20000, "amount": 1, "currency": "USD",
                        "reference": ""}).encode()
    exact = exact[:-1] + b" " * (limit - len(exact)) + b"}"
    assert len(exact) == limit
    assert_error(client.post("/v1/payments", content=exact,
                             headers={"Content-Type": "application/json"}),
                 400, "request_invalid")


# -- token_* -------------------------------------------------------------------------------------

_SPARE_RSA: list[PemSigner] = []


def spare_rsa_signer() -> PemSigner:
    """An RSA key the gateway does not know (made once: key generation is slow)."""
    if not _SPARE_RSA:
        pem = generate_private_key_pem("RS256")
        _SPARE_RSA.append(PemSigner(serialization.load_pem_private_key(pem, None),  # type: ignore[arg-type]
                                    alg="RS256"))
    return _SPARE_RSA[0]


def _segment(value: object) -> str:
    return b64url_encode(json.dumps(value).encode())


def _hs256(forge: TokenForge) -> str:
    # The classic confusion: HMAC keyed with the public key the gateway verifies with.
    secret = (forge.home.directory / "keys" / "jwks.json").read_bytes()
    return forge.forge(header={"alg": "HS256"},
                       sign=lambda data: hmac.new(secret, data, hashlib.sha256).digest())


def _resigned_claims(forge: TokenForge) -> str:
    """A valid signature moved onto other claims."""
    head, payload, signature = forge.seal().split(".")
    claims = json.loads(b64url_decode(payload))
    claims["exp"] += 1
    return f"{head}.{_segment(claims)}.{signature}"


TOKEN_CASES: dict[str, tuple[str, Callable[[TokenForge], str]]] = {
    "malformed-words": ("token_malformed", lambda f: "not-a-token"),
    "malformed-two-parts": ("token_malformed", lambda f: ".".join(f.seal().split(".")[:2])),
    "malformed-four-parts": ("token_malformed", lambda f: f.seal() + ".e30"),
    "malformed-padded": ("token_malformed", lambda f: f.seal() + "="),
    "malformed-header-not-json": ("token_malformed",
                                  lambda f: b64url_encode(b"{nope") + ".e30.AAAA"),
    "malformed-header-no-alg": ("token_malformed",
                                lambda f: _segment({"typ": "card+jwt"}) + ".e30.AAAA"),
    "malformed-payload-not-json": ("token_malformed", lambda f: ".".join(
        (_segment({"alg": "RS256", "kid": f.signer.kid, "typ": "card+jwt"}),
         b64url_encode(b"not json"), "AAAA"))),
    "malformed-non-ascii": ("token_malformed", lambda f: "é" + f.seal()),
    "alg-none": ("token_algorithm_not_allowed",
                 lambda f: f.forge(header={"alg": "none"}, sign=lambda _: b"")),
    "alg-none-lowercase-kidless": ("token_algorithm_not_allowed",
                                   lambda f: f.forge(header={"alg": "None"}, drop_header=["kid"],
                                                     sign=lambda _: b"")),
    "alg-hs256": ("token_algorithm_not_allowed", _hs256),
    "alg-ps256-same-key": ("token_algorithm_not_allowed", lambda f: f.forge(
        signer=PemSigner.from_file(f.home.directory / "keys" / "signing.pem", alg="PS256"))),
    "alg-es256-other-issuers-key": ("token_algorithm_not_allowed",
                                    lambda f: f.forge(signer=f.other_signer)),
    "signature-bit-flipped": ("token_signature_invalid", lambda f: tamper_signature(f.seal())),
    "signature-by-unknown-key-same-kid": ("token_signature_invalid",
                                          lambda f: f.forge(sign=spare_rsa_signer().sign)),
    "signature-of-other-claims": ("token_signature_invalid", _resigned_claims),
    "signature-empty": ("token_signature_invalid", lambda f: f.forge(sign=lambda _: b"")),
    "kid-unknown": ("token_key_unknown", lambda f: f.forge(header={"kid": "no-such-key"})),
    "kid-of-unknown-key": ("token_key_unknown", lambda f: f.forge(signer=spare_rsa_signer())),
    "kid-missing": ("token_key_unknown", lambda f: f.forge(drop_header=["kid"])),
    "expired": ("token_expired", lambda f: f.forge(
        claims={"iat": int(time.time()) - 200, "exp": int(time.time()) - 60})),
    "not-yet-valid-iat": ("token_not_yet_valid", lambda f: f.forge(
        claims={"iat": int(time.time()) + 120, "exp": int(time.time()) + 240})),
    "not-yet-valid-nbf": ("token_not_yet_valid",
                          lambda f: f.forge(claims={"nbf": int(time.time()) + 120})),
    "lifetime-too-long": ("token_lifetime_too_long", lambda f: f.forge(lifetime=301)),
    "issuer-unknown": ("token_issuer_invalid", lambda f: f.forge(claims={"iss": "evil-corp"})),
    "issuer-not-a-string": ("token_issuer_invalid", lambda f: f.forge(claims={"iss": ["x"]})),
    "audience-other": ("token_audience_invalid", lambda f: f.forge(claims={"aud": "elsewhere"})),
    "audience-list-of-two": ("token_audience_invalid",
                             lambda f: f.forge(claims={"aud": [AUDIENCE, "elsewhere"]})),
    **{f"claim-missing-{name}": ("token_claim_missing",
                                 lambda f, name=name: f.forge(drop=[name]))  # type: ignore[misc]
       for name in ("iss", "aud", "iat", "exp", "jti", "meta_data")},
    "typ-jwt": ("token_type_invalid", lambda f: f.forge(header={"typ": "JWT"})),
    "typ-missing": ("token_type_invalid", lambda f: f.forge(drop_header=["typ"])),
    "typ-other": ("token_type_invalid", lambda f: f.forge(header={"typ": "at+jwt"})),
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_token_rejected(gateway: Gateway, client: httpx.Client, case: str) -> None:
    code, make = TOKEN_CASES[case]
    token = make(gateway.forge)
    response = pay(client, token)
    assert_error(response, 401, code)
    assert token not in response.text


def test_token_replayed(gateway: Gateway, client: httpx.Client) -> None:
    token = gateway.forge.seal()
    assert pay(client, token).status_code == 201
    assert_error(pay(client, token), 409, "token_replayed")
    assert_error(pay(client, token, key="fresh-key-" + secrets.token_hex(4)), 409,
                 "token_replayed")
    # A token whose card was refused is spent too.
    refused = gateway.forge.forge(card=card_json(expiry="01/2020"))
    assert_error(pay(client, refused), 422, "card_expired")
    assert_error(pay(client, refused), 409, "token_replayed")


# -- meta_data, keys, amounts, cards ---------------------------------------------------------


def _flip_last_segment(meta: str) -> str:
    parts = meta.split(".")
    tag = bytearray(b64url_decode(parts[4]))
    tag[0] ^= 0x80
    parts[4] = b64url_encode(bytes(tag))
    return ".".join(parts)


META_CASES: dict[str, tuple[int, str, Callable[[TokenForge], str]]] = {
    "meta-not-a-string": (400, "meta_data_malformed",
                          lambda f: f.forge(meta_data=lambda jti: 42)),  # type: ignore[arg-type,return-value]
    "meta-five-junk-parts": (400, "meta_data_malformed",
                             lambda f: f.forge(meta_data=lambda jti: "a.b.c.d.e")),
    "meta-kms-direct-not-base64": (400, "meta_data_malformed",
                                   lambda f: f.forge(meta_data=lambda jti: "!!not base64!!")),
    "meta-envelope-extra-header-member": (400, "meta_data_malformed", lambda f: f.forge(
        meta_data=lambda jti: _segment({"alg": "kms", "enc": "A256GCM", "kid": "local://main",
                                        "jti": jti, "zip": "DEF"})
        + "." + ".".join(f.envelope(card_json(), jti=jti).split(".")[1:]))),
    "meta-plaintext-not-json": (400, "meta_data_malformed",
                                lambda f: f.forge(card=b"card: 4242424242424242")),
    "meta-plaintext-missing-cvv": (400, "meta_data_malformed", lambda f: f.forge(
        card=json.dumps({"card_number": PAN_VISA, "expiry_date": EXPIRY}).encode())),
    "meta-format-not-allowed-for-issuer": (400, "meta_data_malformed", lambda f: f.forge(
        iss=OTHER_ISSUER, signer=f.other_signer,
        meta_data=lambda jti: f.kms_direct(card_json(), jti=jti))),
    "decrypt-moved-from-other-token": (400, "decryption_failed", lambda f: f.forge(
        meta_data=lambda jti: f.envelope(card_json(), jti=secrets.token_urlsafe(16)))),
    "decrypt-tag-flipped": (400, "decryption_failed", lambda f: f.forge(
        meta_data=lambda jti: _flip_last_segment(f.envelope(card_json(), jti=jti)))),
    "decrypt-other-context": (400, "decryption_failed", lambda f: f.forge(
        meta_data=lambda jti: f.envelope(card_json(), jti=jti, aud="someone-else"))),
    "decrypt-kms-direct-other-jti": (400, "decryption_failed", lambda f: f.forge(
        meta_data=lambda jti: f.kms_direct(card_json(), jti=secrets.token_urlsafe(16)))),
    "key-envelope-under-other-key": (400, "kms_key_not_allowed", lambda f: f.forge(
        meta_data=lambda jti: f.envelope(card_json(), jti=jti, key_uri=OTHER_KEY))),
    "key-kms-direct-under-other-key": (400, "kms_key_not_allowed", lambda f: f.forge(
        meta_data=lambda jti: f.kms_direct(card_json(), jti=jti, key_uri=OTHER_KEY))),
    "key-envelope-names-unknown-key": (400, "kms_key_not_allowed", lambda f: f.forge(
        meta_data=lambda jti: _segment({"alg": "kms", "enc": "A256GCM",
                                        "kid": "aws-kms://alias/nope", "jti": jti})
        + "." + ".".join(f.envelope(card_json(), jti=jti).split(".")[1:]))),
    "card-luhn": (422, "card_number_invalid", lambda f: f.forge(card=card_json(PAN_LUHN_INVALID))),
    "card-letters": (422, "card_number_invalid",
                     lambda f: f.forge(card=card_json("4242abcd42424242"))),
    "card-length-for-brand": (422, "card_number_invalid",
                              lambda f: f.forge(card=card_json("42424242424242426"))),
    "card-expired": (422, "card_expired", lambda f: f.forge(card=card_json(expiry="01/2020"))),
    "card-expiry-garbage": (422, "card_expired", lambda f: f.forge(card=card_json(expiry="13/30"))),
    "card-cvv-short": (422, "card_cvv_invalid", lambda f: f.forge(card=card_json(cvv="73"))),
    "card-cvv-amex-three": (422, "card_cvv_invalid",
                            lambda f: f.forge(card=card_json(PAN_AMEX, cvv=CVV))),
    "card-brand": (422, "card_brand_unsupported",
                   lambda f: f.forge(card=card_json(PAN_NO_BRAND))),
    "card-brand-kms-direct": (422, "card_brand_unsupported", lambda f: f.forge(
        meta_data=lambda jti: f.kms_direct(card_json(PAN_NO_BRAND), jti=jti))),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_data_key_and_card_rejected(gateway: Gateway, client: httpx.Client,
                                         case: str) -> None:
    status, code, make = META_CASES[case]
    token = make(gateway.forge)
    response = pay(client, token)
    assert_error(response, status, code)
    if code == "decryption_failed":  # one message for every decryption failure
        assert response.json()["error"]["message"] == "The card data could not be decrypted."


@pytest.mark.parametrize(("body", "claim"), [
    ({"amount": 999, "currency": "USD"}, Payment(1000, "USD")),
    ({"amount": 1000, "currency": "EUR"}, Payment(1000, "USD")),
    ({"currency": "EUR"}, Payment(1000, "USD")),
    ({"amount": 1000, "currency": "USD", "reference": "other"}, Payment(1000, "USD", "mine")),
], ids=["amount", "currency", "currency-only", "reference"])
def test_amount_mismatch(gateway: Gateway, client: httpx.Client, body: dict[str, Any],
                         claim: Payment) -> None:
    token = gateway.forge.seal(payment=claim)
    assert_error(client.post("/v1/payments", json={"token": token, **body}), 400,
                 "amount_mismatch")
    # Refused before the token was reserved: it still pays its own amount.
    assert_payment(pay(client, token, None, None), amount=claim.amount, currency=claim.currency,
                   reference=claim.reference)


# -- payment_declined --------------------------------------------------------------------------


def test_sandbox_declines_are_the_contracts() -> None:
    assert DECLINES == SANDBOX_DECLINES
    assert len(SANDBOX_DECLINES) == 7


@pytest.mark.parametrize(("pan", "decline_code"), sorted(SANDBOX_DECLINES.items()))
def test_payment_declined(gateway: Gateway, client: httpx.Client, pan: str,
                          decline_code: str) -> None:
    token = gateway.forge.seal(pan)
    error = assert_error(pay(client, token, 2500), 402, "payment_declined")
    assert error["decline_code"] == decline_code
    assert PAYMENT_ID.fullmatch(error["payment_id"])
    recorded = client.get(f"/v1/payments/{error['payment_id']}",
                          headers={"Authorization": f"Bearer {gateway.api_key()}"})
    assert recorded.status_code == 200
    body = recorded.json()
    assert (body["status"], body["decline_code"], body["amount"]) == ("declined", decline_code,
                                                                       2500)
    assert body["card"]["last4"] == pan[-4:]
    assert_error(pay(client, token, 2500), 409, "token_replayed")


# -- idempotency -------------------------------------------------------------------------------


def test_idempotency_replay_and_conflict(gateway: Gateway, client: httpx.Client) -> None:
    forge = gateway.forge
    key = "order-" + secrets.token_hex(8)
    token = forge.seal()
    first = pay(client, token, 1200, key=key)
    assert_payment(first, amount=1200)
    again = pay(client, token, 1200, key=key)
    assert (again.status_code, again.content) == (201, first.content)
    assert_error(pay(client, token, 1201, key=key), 409, "idempotency_conflict")
    assert_error(pay(client, forge.seal(), 1200, key=key), 409, "idempotency_conflict")
    # A declined answer is replayed as it was.
    declined_key = "order-" + secrets.token_hex(8)
    declined_token = forge.seal("4000000000000002")
    declined = pay(client, declined_token, key=declined_key)
    assert_error(declined, 402, "payment_declined")
    assert pay(client, declined_token, key=declined_key).content == declined.content
    # Keys are scoped per issuer: another issuer may use the same key.
    other = forge.forge(iss=OTHER_ISSUER, signer=forge.other_signer)
    assert_payment(pay(client, other, 1200, key=key), amount=1200, issuer=OTHER_ISSUER)


def _write(gateway: Gateway, statement: Executable) -> int:
    """Run one write on the gateway's database; the rows it touched."""
    engine = gateway.home.engine()
    try:
        with engine.begin() as conn:
            return conn.execute(statement).rowcount
    finally:
        engine.dispose()


def _leave_in_flight(gateway: Gateway, key: str, *, age: float) -> None:
    """The key's row as a gateway that died mid-request left it: in flight, no answer."""
    assert _write(gateway, update(idempotency_keys).where(idempotency_keys.c.key == key).values(
        state="in_flight", status_code=None, response=None,
        created_at=datetime.now(UTC) - timedelta(seconds=age))) == 1


def test_a_key_left_in_flight_by_a_dead_gateway_is_taken_over(gateway: Gateway,
                                                              client: httpx.Client) -> None:
    """A gateway killed between recording a payment and storing its answer leaves the key
    in flight. Found so past ``gateway.idempotency_in_flight_timeout`` (900 s), the same
    request takes it over and gets the recorded payment, byte for byte what the first run
    answered (the client never got it), not idempotency_conflict forever; the card is not
    charged again. Before that timeout the key is in flight as far as anyone can tell."""
    forge = gateway.forge
    for pan, status in ((PAN_VISA, 201), ("4000000000000002", 402)):
        key = "order-" + secrets.token_hex(8)
        token = forge.seal(pan)
        first = pay(client, token, 1300, key=key)
        assert first.status_code == status
        payments_before = gateway.home.query("SELECT count(*) AS n FROM payments")[0]["n"]

        _leave_in_flight(gateway, key, age=60)  # might still be running: hands off
        assert_error(pay(client, token, 1300, key=key), 409, "idempotency_conflict")
        _leave_in_flight(gateway, key, age=901)
        assert_error(pay(client, token, 1301, key=key), 409, "idempotency_conflict")  # body
        recovered = pay(client, token, 1300, key=key)
        assert (recovered.status_code, recovered.content) == (status, first.content)
        again = pay(client, token, 1300, key=key)  # and stored under the key again
        assert (again.status_code, again.content) == (status, first.content)
        assert gateway.home.query("SELECT count(*) AS n FROM payments")[0]["n"] == payments_before


def test_a_dead_gateways_key_without_a_payment_goes_on(gateway: Gateway,
                                                       client: httpx.Client) -> None:
    """Killed before the token was reserved: the same request, taking the key over, pays."""
    key = "order-" + secrets.token_hex(8)
    token = gateway.forge.seal()
    body = {"token": token, "amount": 1400, "currency": "USD"}
    request_hash = hashlib.sha256(
        _dumps(PaymentRequest.model_validate(body).model_dump())).hexdigest()
    _write(gateway, insert(idempotency_keys).values(
        issuer=ISSUER, key=key, request_hash=request_hash, state="in_flight",
        created_at=datetime.now(UTC) - timedelta(hours=1)))
    first = client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    assert_payment(first, amount=1400)
    again = client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    assert (again.status_code, again.content) == (201, first.content)


def test_forged_token_cannot_claim_an_issuers_idempotency_key(gateway: Gateway,
                                                              client: httpx.Client) -> None:
    """Keys are scoped by the token's issuer, which is only known once the token verifies.

    Regression: the gateway stored the 401 of a forged token claiming ``iss`` =
    payment-service under that issuer's key, so anyone who guessed a merchant's next key
    (``order-1234``) made its real payment fail with ``idempotency_conflict``.
    """
    key = "order-" + secrets.token_hex(8)
    forged = tamper_signature(gateway.forge.seal())
    assert_error(pay(client, forged, key=key), 401, "token_signature_invalid")
    assert_payment(pay(client, gateway.forge.seal(), key=key), amount=1999)


def test_a_forged_token_learns_nothing_of_an_issuers_keys(gateway: Gateway,
                                                         client: httpx.Client) -> None:
    """A token no issuer signed is refused with its own code whatever the key: it cannot
    tell a merchant's used or in-flight keys (``order-42``: 409) from unused ones (401).

    Regression: the key was looked up under the token's unverified ``iss`` first, so an
    unsigned token answered 409 idempotency_conflict for every key the issuer had used.
    """
    used = "order-" + secrets.token_hex(8)
    assert_payment(pay(client, gateway.forge.seal(), key=used), amount=1999)
    in_flight = "order-" + secrets.token_hex(8)
    assert_payment(pay(client, gateway.forge.seal(), key=in_flight), amount=1999)
    _leave_in_flight(gateway, in_flight, age=60)
    unsigned = jws.encode_compact({"alg": "RS256", "typ": "card+jwt"},
                                  json.dumps({"iss": ISSUER}).encode(), lambda _: b"\0" * 256)
    for token, code in ((tamper_signature(gateway.forge.seal()), "token_signature_invalid"),
                        (unsigned, "token_key_unknown")):
        for key in (used, in_flight, "order-" + secrets.token_hex(8)):
            assert_error(pay(client, token, key=key), 401, code)


def test_refused_parameters_are_not_saved_under_the_key(gateway: Gateway,
                                                        client: httpx.Client) -> None:
    """As Stripe: a request that failed validation saves no result; the fixed one goes on."""
    key = "order-" + secrets.token_hex(8)
    token = gateway.forge.seal(payment=Payment(1000, "USD"))
    assert_error(pay(client, token, 999, key=key), 400, "amount_mismatch")
    assert_error(pay(client, token, None, "EUR", key=key), 400, "amount_mismatch")
    first = pay(client, token, 1000, key=key)
    assert_payment(first, amount=1000)
    assert pay(client, token, 1000, key=key).content == first.content


# -- GET /v1/payments/{id}: unauthorized, not_found ----------------------------------------------


@pytest.fixture(scope="module")
def payment_of_each_issuer(gateway: Gateway) -> dict[str, str]:
    with gateway.client() as client:
        mine = pay(client, gateway.forge.seal()).json()["id"]
        theirs = pay(client, gateway.forge.forge(iss=OTHER_ISSUER,
                                                 signer=gateway.forge.other_signer)).json()["id"]
    return {ISSUER: mine, OTHER_ISSUER: theirs}


def test_get_payment_unauthorized(gateway: Gateway, client: httpx.Client,
                                  payment_of_each_issuer: dict[str, str]) -> None:
    path = f"/v1/payments/{payment_of_each_issuer[ISSUER]}"
    key = gateway.api_key()
    prefix, key_id, secret = key.split("_", 2)
    for headers in (
        {},
        {"Authorization": ""},
        {"Authorization": key},
        {"Authorization": f"Basic {key}"},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Bearer {prefix}_{key_id}_{secrets.token_urlsafe(32)}"},
        {"Authorization": f"Bearer {prefix}_{'0' * 16}_{secret}"},
        {"Authorization": f"bearer {key}x"},
        {"Authorization": f"Bearer {key}{'x' * 600}"},  # was an undocumented 400
    ):
        refused = client.get(path, headers=headers)
        assert_error(refused, 401, "unauthorized")
        assert refused.headers["www-authenticate"] == "Bearer"
    for scheme in ("bearer", "BEARER"):  # a scheme's name is case-insensitive (RFC 9110)
        assert client.get(path, headers={"Authorization": f"{scheme} {key}"}).status_code == 200
    assert_error(client.get("/v1/payments/pay_unknown"), 401, "unauthorized")


def test_head_is_a_get_without_its_body(gateway: Gateway, client: httpx.Client,
                                        payment_of_each_issuer: dict[str, str]) -> None:
    """RFC 9110 9.3.2: HEAD answers as GET would, without the body (it was 405 everywhere
    but /openapi.json)."""
    auth = {"Authorization": f"Bearer {gateway.api_key()}"}
    for path, headers in (("/healthz", {}), ("/readyz", {}), ("/openapi.json", {}),
                          (f"/v1/payments/{payment_of_each_issuer[ISSUER]}", auth)):
        got, head = client.get(path, headers=headers), client.head(path, headers=headers)
        assert (got.status_code, head.status_code, head.content) == (200, 200, b""), path
        for name in ("content-type", "content-length"):
            assert head.headers[name] == got.headers[name], (path, name)
    refused = client.head(f"/v1/payments/{payment_of_each_issuer[ISSUER]}")
    assert (refused.status_code, refused.headers["www-authenticate"]) == (401, "Bearer")
    wrong = client.head("/v1/payments")
    assert (wrong.status_code, wrong.headers["allow"], wrong.content) == (405, "POST", b"")
    assert_error(posted := client.post("/healthz"), 405, "request_invalid")
    assert posted.headers["allow"] == "GET, HEAD"


def test_get_payment_not_found(gateway: Gateway, client: httpx.Client,
                               payment_of_each_issuer: dict[str, str]) -> None:
    mine = {"Authorization": f"Bearer {gateway.api_key(ISSUER)}"}
    theirs = {"Authorization": f"Bearer {gateway.api_key(OTHER_ISSUER)}"}
    assert client.get(f"/v1/payments/{payment_of_each_issuer[ISSUER]}",
                      headers=mine).status_code == 200
    assert client.get(f"/v1/payments/{payment_of_each_issuer[OTHER_ISSUER]}",
                      headers=theirs).status_code == 200
    unknown = client.get("/v1/payments/pay_" + "0" * 24, headers=mine)
    assert_error(unknown, 404, "not_found")
    cross = [client.get(f"/v1/payments/{payment_of_each_issuer[OTHER_ISSUER]}", headers=mine),
             client.get(f"/v1/payments/{payment_of_each_issuer[ISSUER]}", headers=theirs)]
    for response in cross:
        assert_error(response, 404, "not_found")
        assert response.content == unknown.content  # alike: nothing tells them apart
    assert_error(client.get("/v1/payments/" + "x" * 300, headers=mine), 404, "not_found")
    # What no payment id holds never reaches the database: a NUL (PostgreSQL refuses it in
    # text, which once came back as a 503 storage_unavailable), non-ASCII, a quote.
    for odd in ("pay_%00", "pay_%C3%A9", "pay_%27", "pay_0%000"):
        assert_error(client.get(f"/v1/payments/{odd}", headers=mine), 404, "not_found")


# -- 503s: faults injected in-process ------------------------------------------------------------


class FailingProcessor(PaymentProcessor):
    def __init__(self) -> None:
        self.calls = 0

    def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls += 1
        raise ProcessorError()


class ChargeThenTimeout(PaymentProcessor):
    """Charges (through the sandbox), then loses the answer once: the outcome is unknown."""

    def __init__(self, *, timeouts: int = 1) -> None:
        self.sandbox = SandboxProcessor()
        self.calls: list[tuple[str, str]] = []
        self.timeouts = timeouts

    def charge(self, request: ChargeRequest) -> ChargeResult:
        result = self.sandbox.charge(request)
        self.calls.append((request.payment_id, result.processor_ref))
        if len(self.calls) <= self.timeouts:
            raise ProcessorError()
        return result


class UnreachableKms(KeyProvider):
    """A ``local://`` provider whose every KMS call times out."""

    scheme = "local"

    def encrypt(self, key_uri: str, plaintext: bytes, context: EncryptionContext | None) -> bytes:
        raise KeyProviderError()

    def decrypt(self, key_uri: str, ciphertext: bytes, context: EncryptionContext | None) -> bytes:
        raise KeyProviderError()

    def generate_data_key(self, key_uri: str, context: EncryptionContext | None) -> DataKey:
        raise KeyProviderError()


def _in_process_client(home: GatewayHome, url: str, gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=url, verify=home.ssl_context(), timeout=30.0,
                        event_hooks={"response": [gateway.registry.response]})


def test_processor_unavailable(gateway: Gateway, client: httpx.Client) -> None:
    home = gateway.home
    processor = FailingProcessor()
    app = create_app(home.settings, processor=processor)
    token = gateway.forge.seal()
    key = "retry-" + secrets.token_hex(6)
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        assert_error(pay(faulty, token), 503, "processor_unavailable")
        # Released, not spent: the retry reaches the processor again (same key too).
        assert_error(pay(faulty, token, key=key), 503, "processor_unavailable")
        assert processor.calls == 2
    # The healthy gateway (same database) charges it, under the same idempotency key.
    assert_payment(pay(client, token, key=key), amount=1999)


def test_processor_idempotency_holds_across_a_retry(gateway: Gateway) -> None:
    home = gateway.home
    processor = ChargeThenTimeout()
    app = create_app(home.settings, processor=processor)
    token = gateway.forge.seal(PAN_MASTERCARD)
    key = "retry-" + secrets.token_hex(6)
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        assert_error(pay(faulty, token, key=key), 503, "processor_unavailable")
        body = assert_payment(pay(faulty, token, key=key), amount=1999, pan=PAN_MASTERCARD)
    (first_id, first_ref), (second_id, second_ref) = processor.calls
    assert first_id == second_id == body["id"]  # the same payment id: the processor's key
    assert first_ref == second_ref  # so the processor charged once
    rows = home.query("SELECT id, processor_ref FROM payments WHERE replay_id = :rid",
                      rid=gateway.forge.replay_id_of(token))
    assert rows == [{"id": body["id"], "processor_ref": first_ref}]


def test_kms_unavailable(gateway: Gateway, client: httpx.Client,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = gateway.home
    monkeypatch.setattr("cardseal.gateway.app.build_providers",
                        lambda settings: KeyProviders(UnreachableKms()))
    app = create_app(home.settings)
    tokens = [gateway.forge.seal(), gateway.forge.forge(
        meta_data=lambda jti: gateway.forge.kms_direct(card_json(), jti=jti))]
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        for token in tokens:
            assert_error(pay(faulty, token), 503, "kms_unavailable")
            assert_error(pay(faulty, token), 503, "kms_unavailable")  # released, not spent
    for token in tokens:  # the KMS is back: the same tokens pay
        assert_payment(pay(client, token), amount=1999)


def test_storage_unavailable(gateway: Gateway, client: httpx.Client, tmp_path: Path) -> None:
    home = gateway.home
    broken = home.settings.gateway.model_copy(
        update={"database_url": f"sqlite:///{tmp_path}/missing/folder/cardseal.db"})
    app = create_app(home.settings.model_copy(update={"gateway": broken}),
                     check_migrations=False)
    token = gateway.forge.seal()
    auth = {"Authorization": f"Bearer {gateway.api_key()}"}
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        assert_error(pay(faulty, token), 503, "storage_unavailable")
        assert_error(pay(faulty, token, key="k-" + secrets.token_hex(4)), 503,
                     "storage_unavailable")
        assert_error(faulty.get("/v1/payments/pay_" + "0" * 24, headers=auth), 503,
                     "storage_unavailable")
        assert_error(faulty.get("/readyz"), 503, "storage_unavailable")
        assert faulty.get("/healthz").status_code == 200
    # Fail closed, and nothing was consumed: the healthy gateway charges the same token.
    assert_payment(pay(client, token), amount=1999)


def test_a_taken_over_key_gets_its_payment_though_the_token_expired_since(
        gateway: Gateway, client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry of a request whose gateway died comes 15 minutes later or more: its token
    has expired by then. The payment its first run recorded is found all the same (the key's
    stored hash proves it is that very body; that run verified the token). A database that
    fails during the lookup leaves the key to be taken over again by the next retry."""
    home = gateway.home
    key = "order-" + secrets.token_hex(8)
    token = gateway.forge.seal()
    first = pay(client, token, 1500, key=key)
    assert_payment(first, amount=1500)
    _leave_in_flight(gateway, key, age=3600)

    def an_hour_later(settings: Any, policies: Any) -> TokenVerifier:
        return TokenVerifier(issuers=policies, leeway=settings.gateway.leeway,
                             now=lambda: time.time() + 3600)

    monkeypatch.setattr("cardseal.gateway.app.build_verifier", an_hour_later)
    calls = {"n": 0}
    lookup = SqlStore.payment_of_token

    async def flaky(store: SqlStore, rid: str, issuer: str) -> dict[str, Any] | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StorageError()
        return await lookup(store, rid, issuer)

    monkeypatch.setattr(SqlStore, "payment_of_token", flaky)
    app = create_app(home.settings)
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as later:
        assert_error(pay(later, gateway.forge.seal(), 1500), 401, "token_expired")
        assert_error(pay(later, token, 1500, key=key), 503, "storage_unavailable")
        recovered = pay(later, token, 1500, key=key)  # taken over again at once
        assert (recovered.status_code, recovered.content) == (201, first.content)
    again = pay(client, token, 1500, key=key)
    assert (again.status_code, again.content) == (201, first.content)


@pytest.mark.parametrize("timeout", [5.0, 130.0])
def test_an_in_flight_timeout_a_running_request_could_reach_is_refused(gateway: Gateway,
                                                                      timeout: float) -> None:
    """Under processor.timeout (10 s) + 120 s a retry could take over a request still
    running and answer for it: a configuration error, not a setting."""
    settings = gateway.home.settings
    short = settings.gateway.model_copy(update={"idempotency_in_flight_timeout": timeout})
    with pytest.raises(ConfigError):
        create_app(settings.model_copy(update={"gateway": short}))


class DetachedReplayStore(ReplayStore):
    """A replay store outside the ledger's database, as Redis is, with Redis's semantics.

    ``fail_done`` makes its first ``done`` fail (the connection drops right after the payment
    committed); ``forget`` makes it lose every record (a Redis restarted without persistence);
    ``lose_reservation`` makes its first reservation land and its answer get lost.
    """

    def __init__(self, *, fail_done: bool = False, forget: bool = False,
                 lose_reservation: bool = False) -> None:
        self.records: dict[str, tuple[str, str]] = {}
        self.fail_done = fail_done
        self.forget = forget
        self.lose_reservation = lose_reservation
        self.undone = 0
        self.hold_undo = False  # the store does not answer the undo yet

    async def reserve(self, rid: str, expires_at: int) -> str:
        state, payment_id = self.records.get(rid, ("", new_payment_id()))
        if self.forget:  # no record of the token: a new reservation, a new payment id
            state, payment_id = "", new_payment_id()
        if not state or state == "released":
            self.records[rid] = ("pending", payment_id)
            if self.lose_reservation:
                self.lose_reservation = False

                async def undo() -> None:
                    if self.hold_undo:
                        raise StorageError()
                    if self.records.get(rid) == ("pending", payment_id):
                        del self.records[rid]
                    self.undone += 1

                raise ReservationInDoubtError(undo)
            return payment_id
        raise TokenError(code="token_replayed")

    def _move(self, rid: str, to: str, only_from: str | None = None) -> None:
        state, payment_id = self.records[rid]
        if only_from is None or state == only_from:
            self.records[rid] = (to, payment_id)

    async def release(self, rid: str) -> None:
        self._move(rid, "released", only_from="pending")

    async def spend(self, rid: str) -> None:
        self._move(rid, "spent")

    async def done(self, rid: str) -> None:
        if self.fail_done:
            self.fail_done = False
            raise StorageError()
        self._move(rid, "done")

    async def ping(self) -> None:
        return None


def app_with_replay_store(gateway: Gateway, monkeypatch: pytest.MonkeyPatch,
                          replay: ReplayStore) -> tuple[Any, ChargeThenTimeout]:
    """An app on ``gateway``'s home whose replay store is ``replay``, charging through a
    sandbox that records each call."""
    monkeypatch.setattr("cardseal.gateway.app.build_replay_store", lambda spec, store: replay)
    processor = ChargeThenTimeout(timeouts=0)
    return create_app(gateway.home.settings, processor=processor), processor


def test_replay_store_failing_after_the_payment_committed(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the payment was recorded, then marking the token done in a detached replay
    store failed; the gateway answered 503 and released the token, so the retry charged the
    card again under the same payment id and crashed on the ledger's key with a 500."""
    home = gateway.home
    replay = DetachedReplayStore(fail_done=True)
    app, processor = app_with_replay_store(gateway, monkeypatch, replay)
    token = gateway.forge.seal()
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        body = assert_payment(pay(faulty, token), amount=1999)  # recorded, so it is a 201
        assert_error(pay(faulty, token), 409, "token_replayed")
    assert len(processor.calls) == 1  # charged once
    rows = home.query("SELECT id FROM payments WHERE replay_id = :rid",
                      rid=gateway.forge.replay_id_of(token))
    assert rows == [{"id": body["id"]}]


def test_a_reservation_in_doubt_is_given_back_in_the_background(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay store reserved the token and lost the answer: the client gets a retryable
    503, the gateway gives the reservation back in the background, and the client's retry is
    charged (once), not refused as a replay until the token expires."""
    home = gateway.home
    replay = DetachedReplayStore(lose_reservation=True)
    app, processor = app_with_replay_store(gateway, monkeypatch, replay)
    token = gateway.forge.seal()
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        assert_error(pay(faulty, token), 503, "storage_unavailable")
        deadline = time.monotonic() + 5
        while not replay.undone and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replay.undone == 1
        assert_payment(pay(faulty, token), amount=1999)
    assert len(processor.calls) == 1


def test_a_retry_faster_than_the_give_back_is_told_to_retry_not_replayed(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry of a reservation in doubt comes before the gateway could give it back (the
    store does not answer the undo yet): a 503 again, not a 409 ``token_replayed``, which its
    Idempotency-Key would keep for good; once the undo lands, the same request pays."""
    home = gateway.home
    replay = DetachedReplayStore(lose_reservation=True)
    replay.hold_undo = True
    app, processor = app_with_replay_store(gateway, monkeypatch, replay)
    token, key = gateway.forge.seal(), "retry-" + secrets.token_hex(6)
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        assert_error(pay(faulty, token, key=key), 503, "storage_unavailable")
        assert_error(pay(faulty, token, key=key), 503, "storage_unavailable")
        assert not processor.calls
        replay.hold_undo = False
        deadline = time.monotonic() + 5
        while not replay.undone and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replay.undone == 1
        assert_payment(pay(faulty, token, key=key), amount=1999)
        assert_error(pay(faulty, token), 409, "token_replayed")  # paid: a replay again
    assert len(processor.calls) == 1


def test_replay_store_that_lost_its_records_never_gives_a_500(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a token replayed after the replay store lost its record reached the
    ledger, whose unique ``replay_id`` refused it with an IntegrityError: a 500 with a
    text/plain body. It is ``token_replayed``. (The processor was still asked to charge: a
    Redis replay store must be persistent, see the report.)"""
    home = gateway.home
    monkeypatch.setattr("cardseal.gateway.app.build_replay_store",
                        lambda spec, store: DetachedReplayStore(forget=True))
    app = create_app(home.settings)
    token = gateway.forge.seal()
    with serve_in_thread(app, home) as url, _in_process_client(home, url, gateway) as faulty:
        body = assert_payment(pay(faulty, token), amount=1999)
        assert_error(pay(faulty, token), 409, "token_replayed")
    rows = home.query("SELECT id FROM payments WHERE replay_id = :rid",
                      rid=gateway.forge.replay_id_of(token))
    assert rows == [{"id": body["id"]}]

