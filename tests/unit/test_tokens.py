"""Every token rejection of CONTRACT.md section 3 that needs no gateway, one thing wrong at a time.

Forged tokens start from a token the setup's ``Sealer`` really issued: its header and claims are
decoded, one member changed, and the result signed again with the setup's key
(``jws.encode_compact``), so the changed member is the only reason for a refusal.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from cardseal import jws
from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.card import Card
from cardseal.errors import CardsealError
from cardseal.keys.jwk import VerificationKey, VerificationKeySet, public_jwk
from cardseal.keys.signing import PemSigner, generate_private_key_pem
from cardseal.opener import CardOpener
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, LocalSetup, sample_card_json
from cardseal.tokens import IssuerPolicy, SignedToken, TokenVerifier, VerifiedToken

T = 1_750_000_000
CARD = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))


class Clock:
    def __init__(self) -> None:
        self.now: float = T

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def setup(tmp_path: Path, clock: Clock) -> LocalSetup:
    return LocalSetup.create(tmp_path, now=clock)


def decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parsed = jws.parse_compact(token)
    return dict(parsed.header), json.loads(parsed.payload)


def forge(setup: LocalSetup, *, header: dict[str, Any] | None = None,
          claims: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
          sign: Callable[[bytes], bytes] | None = None) -> str:
    """A freshly sealed token with ``header``/``claims`` members replaced, ``drop`` removed
    (from both), signed again by the setup's key unless ``sign`` is given."""
    base_header, base_claims = decode(setup.sealer.seal(CARD))
    base_header.update(header or {})
    base_claims.update(claims or {})
    for name in drop:
        base_header.pop(name, None)
        base_claims.pop(name, None)
    return jws.encode_compact(base_header, json.dumps(base_claims).encode(),
                              sign or setup.signer.sign)


def sign_raw(setup: LocalSetup, header: bytes, payload: bytes) -> str:
    """A token whose header and payload are exactly these bytes (duplicates, odd numbers)."""
    signing_input = b64url_encode(header) + "." + b64url_encode(payload)
    return signing_input + "." + b64url_encode(setup.signer.sign(signing_input.encode()))


def new_signer() -> tuple[PemSigner, bytes]:
    pem = generate_private_key_pem("RS256")
    return PemSigner(serialization.load_pem_private_key(pem, None)), pem  # type: ignore[arg-type]


def refused(verifier: TokenVerifier, token: str | bytes, code: str) -> None:
    with pytest.raises(CardsealError) as excinfo:
        verifier.verify(token)
    assert excinfo.value.code == code


def test_the_forge_alone_changes_nothing(setup: LocalSetup) -> None:
    token = setup.verifier.verify(forge(setup))
    assert setup.opener.open_card(token).pan == CARD.pan


def test_bad_signature(setup: LocalSetup) -> None:
    head, payload, signature = setup.sealer.seal(CARD).split(".")
    flipped = bytearray(b64url_decode(signature))
    flipped[0] ^= 1
    refused(setup.verifier, f"{head}.{payload}.{b64url_encode(bytes(flipped))}",
            "token_signature_invalid")
    refused(setup.verifier, forge(setup, sign=new_signer()[0].sign), "token_signature_invalid")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "AAAA"])
def test_alg_none_in_every_casing(setup: LocalSetup, alg: str, signature: str) -> None:
    head, payload, _ = forge(setup, header={"alg": alg}).split(".")
    refused(setup.verifier, f"{head}.{payload}.{signature}", "token_algorithm_not_allowed")


@pytest.mark.parametrize("with_kid", [True, False])
def test_hs256_keyed_with_the_public_key_pem(setup: LocalSetup, with_kid: bool) -> None:
    pem = setup.signer.public_key.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    token = forge(setup, header={"alg": "HS256"}, drop=() if with_kid else ("kid",),
                  sign=lambda data: hmac.new(pem, data, hashlib.sha256).digest())
    refused(setup.verifier, token, "token_algorithm_not_allowed")


@pytest.mark.parametrize(("after_exp", "ok"), [(29, True), (29.999, True), (30, False)])
def test_expiry_with_30_s_leeway(setup: LocalSetup, clock: Clock, after_exp: float, ok: bool,
                                 ) -> None:
    token = setup.sealer.seal(CARD)
    clock.now = T + 300 + after_exp
    if ok:
        assert setup.verifier.verify(token).exp == T + 300
    else:
        refused(setup.verifier, token, "token_expired")


def test_authenticate_is_verify_without_the_claims(setup: LocalSetup, clock: Clock) -> None:
    """``authenticate`` checks header, key and signature and nothing else (an expired token
    still names its signer, for the gateway's idempotency keys); ``check_claims`` on what it
    returns is ``verify``. A ``SignedToken`` is made by ``authenticate`` alone."""
    token = setup.sealer.seal(CARD)
    signed = setup.verifier.authenticate(token)
    assert signed.issuer is setup.policy and signed.claims == decode(token)[1]
    assert setup.verifier.check_claims(signed).claims == setup.verifier.verify(token).claims
    clock.now = T + 3600
    expired = setup.verifier.authenticate(token)  # the signature does not expire
    with pytest.raises(CardsealError) as excinfo:
        setup.verifier.check_claims(expired)
    assert excinfo.value.code == "token_expired"
    head, payload, _ = token.split(".")
    with pytest.raises(CardsealError) as excinfo:
        setup.verifier.authenticate(f"{head}.{payload}.{'A' * 342}")
    assert excinfo.value.code == "token_signature_invalid"
    with pytest.raises(TypeError):
        SignedToken(object(), signed.header, signed.claims, signed.issuer)
    assert "meta_data" not in repr(signed) and CARD.pan not in repr(signed)


@pytest.mark.parametrize(("claims", "ok"), [
    ({"nbf": T + 30}, True), ({"nbf": T + 31}, False),
    ({"iat": T + 30, "exp": T + 90}, True), ({"iat": T + 31, "exp": T + 91}, False),
])
def test_not_yet_valid_with_30_s_leeway(setup: LocalSetup, claims: dict[str, int], ok: bool,
                                        ) -> None:
    token = forge(setup, claims=claims)
    if ok:
        setup.verifier.verify(token)
    else:
        refused(setup.verifier, token, "token_not_yet_valid")


def test_lifetime_too_long(setup: LocalSetup) -> None:
    setup.verifier.verify(forge(setup, claims={"exp": T + 300}))
    refused(setup.verifier, forge(setup, claims={"exp": T + 301}), "token_lifetime_too_long")


@pytest.mark.parametrize("iss", ["attacker", "Payment-Service", "payment-service ", 7,
                                 [ISSUER]])
def test_wrong_issuer(setup: LocalSetup, iss: object) -> None:
    refused(setup.verifier, forge(setup, claims={"iss": iss}), "token_issuer_invalid")


@pytest.mark.parametrize("aud", ["payment-gateway-2", "", [AUDIENCE, "other"], 1, {}])
def test_wrong_audience(setup: LocalSetup, aud: object) -> None:
    refused(setup.verifier, forge(setup, claims={"aud": aud}), "token_audience_invalid")


@pytest.mark.parametrize("claim", ["jti", "iss", "aud", "exp", "iat", "meta_data"])
def test_required_claim_missing(setup: LocalSetup, claim: str) -> None:
    refused(setup.verifier, forge(setup, drop=(claim,)), "token_claim_missing")
    refused(setup.verifier, forge(setup, claims={claim: None}), "token_claim_missing")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "at+jwt", "", 1, None])
def test_wrong_or_missing_type(setup: LocalSetup, typ: object) -> None:
    token = forge(setup, drop=("typ",)) if typ is None else forge(setup, header={"typ": typ})
    refused(setup.verifier, token, "token_type_invalid")


@pytest.mark.parametrize("kid", ["unknown", "", 5, None])
def test_unknown_or_missing_kid(setup: LocalSetup, kid: object) -> None:
    token = forge(setup, drop=("kid",)) if kid is None else forge(setup, header={"kid": kid})
    refused(setup.verifier, token, "token_key_unknown")


@pytest.mark.parametrize("fmt", ["envelope", "kms-direct"])
def test_meta_data_moved_between_tokens_of_one_issuer(tmp_path: Path, fmt: str) -> None:
    setup = LocalSetup.create(tmp_path, format=fmt, now=lambda: T)
    donor = setup.verifier.verify(setup.sealer.seal(CARD))
    moved = setup.verifier.verify(forge(setup, claims={"meta_data": donor.meta_data}))
    with pytest.raises(CardsealError) as excinfo:
        setup.opener.open_card(moved)
    assert excinfo.value.code == "decryption_failed"


# The envelope parser accepts exactly {"alg": "kms", "enc": "A256GCM", "kid", "jti"}: any other
# member or value is meta_data_malformed, before any KMS call. A header with the same members
# encoded differently parses, but AES-GCM authenticates the encoded header (the AAD), so it is
# decryption_failed. A kid the issuer does not allow is kms_key_not_allowed, never decrypted.
@pytest.mark.parametrize(("change", "code"), [
    (lambda h: json.dumps(dict(reversed(h.items()))).encode(), "decryption_failed"),
    (lambda h: json.dumps({**h, "enc": "A128GCM"}).encode(), "meta_data_malformed"),
    (lambda h: json.dumps({**h, "zip": "DEF"}).encode(), "meta_data_malformed"),
    (lambda h: json.dumps({**h, "alg": "dir"}).encode(), "meta_data_malformed"),
    (lambda h: json.dumps({**h, "kid": "local://other"}).encode(), "kms_key_not_allowed"),
])
def test_tampered_jwe_protected_header(
    setup: LocalSetup, change: Callable[[dict[str, Any]], bytes], code: str
) -> None:
    _, claims = decode(setup.sealer.seal(CARD))
    protected, *rest = claims["meta_data"].split(".")
    header = json.loads(b64url_decode(protected))
    meta_data = ".".join([b64url_encode(change(header)), *rest])
    token = setup.verifier.verify(forge(setup, claims={**claims, "meta_data": meta_data}))
    calls = setup.providers.total_calls
    with pytest.raises(CardsealError) as excinfo:
        setup.opener.open_card(token)
    assert excinfo.value.code == code
    if code != "decryption_failed":
        assert setup.providers.total_calls == calls


def test_oversize_token(setup: LocalSetup) -> None:
    token = forge(setup, claims={"pad": "x" * jws.MAX_TOKEN_BYTES})
    assert len(token) > jws.MAX_TOKEN_BYTES
    refused(setup.verifier, token, "token_malformed")
    refused(setup.verifier, token.encode(), "token_malformed")


def test_deeply_nested_json(setup: LocalSetup) -> None:
    header, claims = decode(setup.sealer.seal(CARD))
    deep = "[" * 5000 + "]" * 5000
    refused(setup.verifier, sign_raw(setup, json.dumps(header).encode(),
                                     json.dumps(claims)[:-1].encode() + b',"x":' + deep.encode()
                                     + b"}"), "token_malformed")
    refused(setup.verifier, forge(setup, claims={"x": [[[[1]]]]}), "token_malformed")
    refused(setup.verifier, forge(setup, header={"x": {"y": {}}}), "token_malformed")
    refused(setup.verifier, sign_raw(setup, json.dumps(header)[:-1].encode() + b',"x":'
                                     + b"[" * 500 + b"]" * 500 + b"}", json.dumps(claims).encode()),
            "token_malformed")


@pytest.mark.parametrize(("claim", "raw"), [
    *(("exp", raw) for raw in ['"1750000300"', "1e400", "-1e400", "1750000300.0", "true", "NaN",
                               "Infinity", "1" * 30, "-1"]),
    # CONTRACT: nbf optional, checked when present; a present null is no NumericDate.
    *(("nbf", raw) for raw in ["null", '"0"', "true", "1.5", "-1"]),
])
def test_date_claim_that_is_no_integer_numeric_date(setup: LocalSetup, claim: str,
                                                    raw: str) -> None:
    header, claims = decode(setup.sealer.seal(CARD))
    claims[claim] = "DATE"
    payload = json.dumps(claims).replace('"DATE"', raw).encode()
    refused(setup.verifier, sign_raw(setup, json.dumps(header).encode(), payload),
            "token_malformed")


@pytest.mark.parametrize("claim", ["exp", "iat"])
def test_required_date_that_is_null_is_missing(setup: LocalSetup, claim: str) -> None:
    header, claims = decode(setup.sealer.seal(CARD))
    claims[claim] = None
    refused(setup.verifier, sign_raw(setup, json.dumps(header).encode(),
                                     json.dumps(claims).encode()), "token_claim_missing")


# Regression: a list or object as currency raised TypeError (unhashable) out of verify().
@pytest.mark.parametrize("payment", [{"amount": 1, "currency": []}, {"amount": 1, "currency": {}},
                                     {"amount": "1", "currency": "EUR"}, [], "EUR",
                                     {"amount": 1, "currency": "EUR", "extra": 1}])
def test_invalid_payment_claim(setup: LocalSetup, payment: object) -> None:
    refused(setup.verifier, forge(setup, claims={"payment": payment}), "token_malformed")


@pytest.mark.parametrize("member", ["iss", "aud", "exp", "jti", "meta_data"])
def test_duplicate_claim_keys(setup: LocalSetup, member: str) -> None:
    header, claims = decode(setup.sealer.seal(CARD))
    payload = json.dumps(claims)[:-1] + f", {json.dumps(member)}: {json.dumps(claims[member])}}}"
    refused(setup.verifier, sign_raw(setup, json.dumps(header).encode(), payload.encode()),
            "token_malformed")


def test_duplicate_header_keys(setup: LocalSetup) -> None:
    header, claims = decode(setup.sealer.seal(CARD))
    raw = json.dumps(header)[:-1] + ', "alg": "none"}'
    refused(setup.verifier, sign_raw(setup, raw.encode(), json.dumps(claims).encode()),
            "token_malformed")


@pytest.mark.parametrize("extension", [{"crit": ["exp"], "exp": T}, {"crit": []},
                                       {"b64": False, "crit": ["b64"]}])
def test_crit_header(setup: LocalSetup, extension: dict[str, Any]) -> None:
    refused(setup.verifier, forge(setup, header=extension), "token_malformed")


def test_key_pointing_headers_are_never_fetched(setup: LocalSetup,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the verifier touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    attacker, _ = new_signer()
    pointers = {"jku": "https://attacker.example/jwks.json", "jwk": public_jwk(attacker.public_key),
                "x5u": "https://attacker.example/cert.pem"}
    refused(setup.verifier, forge(setup, header=pointers, sign=attacker.sign),
            "token_signature_invalid")
    refused(setup.verifier, forge(setup, header={**pointers, "kid": attacker.kid},
                                  sign=attacker.sign), "token_key_unknown")
    # Signed by the configured key, the pointers change nothing: they are ignored.
    assert setup.verifier.verify(forge(setup, header=pointers)).issuer.iss == ISSUER


# -- the seed's token: PyJWT RS256, typ JWT, no kid, no jti, 30 minutes, kms-direct, no context


def seed_token(setup: LocalSetup, pem: str, **headers: str) -> tuple[str, bytes]:
    card_json = json.dumps({"card_number": SAMPLE_PANS["visa"], "expiry_date": "12/2099",
                            "cvv": "123"}).encode()
    blob = setup.providers.encrypt("local://main", card_json, None)
    payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": T, "exp": T + 1800,
               "meta_data": base64.b64encode(blob).decode()}
    return jwt.encode(payload, pem, algorithm="RS256", headers=headers or None), blob


def seed_policy(signer: PemSigner, **overrides: Any) -> IssuerPolicy:
    options: dict[str, Any] = {"formats": frozenset({"kms-direct"}), "max_lifetime": 1800,
                               "legacy": True, **overrides}
    return IssuerPolicy(iss=ISSUER, audience=AUDIENCE, allowed_kms_keys=("local://main",),
                        keys=VerificationKeySet([VerificationKey.from_public_key(signer.public_key)]),
                        **options)


def test_seed_shaped_token(setup: LocalSetup) -> None:
    signer, pem_bytes = new_signer()
    pem = pem_bytes.decode()  # the seed reads private.pem as text
    legacy = seed_policy(signer)
    token, blob = seed_token(setup, pem)
    assert decode(token)[0] == {"alg": "RS256", "typ": "JWT"}
    verified: VerifiedToken = TokenVerifier(issuers=[legacy], now=lambda: T).verify(token)
    assert verified.jti is None and verified.meta_data_format == "kms-direct"
    assert verified.replay_key == "ct:" + hashlib.sha256(blob).hexdigest()
    opener = CardOpener(providers=setup.providers, issuers=[legacy])
    assert opener.open_card(verified).pan == SAMPLE_PANS["visa"]
    again = TokenVerifier(issuers=[legacy], now=lambda: T).verify(seed_token(setup, pem)[0])
    assert again.replay_key != verified.replay_key  # KMS ciphertexts are randomized

    # A non-legacy issuer refuses it at the first gate it fails.
    strict = TokenVerifier(issuers=[seed_policy(signer, legacy=False)], now=lambda: T)
    refused(strict, token, "token_type_invalid")  # typ JWT
    card_typ = seed_token(setup, pem, typ="card+jwt", kid=signer.kid)[0]
    refused(strict, card_typ, "token_claim_missing")  # no jti
    default_lifetime = TokenVerifier(
        issuers=[seed_policy(signer, legacy=False, max_lifetime=300)], now=lambda: T)
    refused(default_lifetime, card_typ, "token_lifetime_too_long")  # 30 minutes
