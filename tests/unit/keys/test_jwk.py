"""Public JWKs: RFC 7638 thumbprints, JWK parsing rules, JWKS and PEM loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cardseal.errors import ConfigError
from cardseal.keys.jwk import (
    MAX_JWKS_KEYS,
    VerificationKey,
    VerificationKeySet,
    load_public_pem,
    public_jwk,
    thumbprint,
)

# RFC 7638 section 3.1.
RFC7638_JWK: dict[str, str] = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
    "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
    "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vM"
    "QFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def config_error(call: Any, *args: Any) -> str:
    with pytest.raises(ConfigError) as excinfo:
        call(*args)
    return excinfo.value.code


# -- thumbprints ------------------------------------------------------------------------------


def test_rfc7638_example_thumbprint() -> None:
    assert thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT


def test_thumbprint_of_the_parsed_key_matches() -> None:
    key = VerificationKey.from_jwk({k: v for k, v in RFC7638_JWK.items() if k != "kid"})
    assert key.kid == RFC7638_THUMBPRINT
    assert key.alg == "RS256"
    assert thumbprint(public_jwk(key.key)) == RFC7638_THUMBPRINT
    assert VerificationKey.from_public_key(key.key).kid == RFC7638_THUMBPRINT


def test_given_kid_is_kept() -> None:
    assert VerificationKey.from_jwk(RFC7638_JWK).kid == "2011-04-29"


def test_thumbprint_ignores_other_members_and_order() -> None:
    shuffled = {"e": "AQAB", "use": "sig", "kid": "x", "n": RFC7638_JWK["n"], "kty": "RSA"}
    assert thumbprint(shuffled) == RFC7638_THUMBPRINT


def test_thumbprint_needs_its_members() -> None:
    for jwk in ({"kty": "RSA", "n": "AQAB"}, {"n": "x", "e": "AQAB"}, {"kty": "oct", "k": "x"}):
        assert config_error(thumbprint, jwk) == "config_invalid"


def test_thumbprint_of_ec_and_okp_keys(ec_key: ec.EllipticCurvePrivateKey) -> None:
    jwk = public_jwk(ec_key.public_key())
    assert set(jwk) == {"kty", "crv", "x", "y"}
    assert VerificationKey.from_jwk(jwk).kid == thumbprint(jwk)
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    assert set(public_jwk(ed)) == {"kty", "crv", "x"}
    assert len(VerificationKey.from_public_key(ed).kid) == 43


# -- single JWKs ------------------------------------------------------------------------------


def test_private_jwk_is_refused(rsa_key: rsa.RSAPrivateKey,
                                ec_key: ec.EllipticCurvePrivateKey) -> None:
    for private in (RSAAlgorithm.to_jwk(rsa_key, as_dict=True),
                    ECAlgorithm.to_jwk(ec_key, as_dict=True)):
        assert "d" in private
        assert config_error(VerificationKey.from_jwk, private) == "config_invalid"
        assert config_error(VerificationKeySet.from_jwks, {"keys": [private]}) == "config_invalid"


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0"},
        {**RFC7638_JWK, "use": "enc"},
        {**RFC7638_JWK, "key_ops": ["encrypt"]},
        {**RFC7638_JWK, "key_ops": "verify"},
        {**RFC7638_JWK, "alg": 256},
        {**RFC7638_JWK, "kid": 7},
        {**RFC7638_JWK, "kty": "DSA"},
        {**RFC7638_JWK, "n": "!!"},
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
        {"kty": "RSA", "e": "AQAB"},
        "not an object",
    ],
    ids=["oct", "use-enc", "key-ops", "key-ops-str", "alg-int", "kid-int", "kty", "bad-n",
         "bad-point", "no-n", "str"],
)
def test_unusable_jwks_are_refused(jwk: Any) -> None:
    assert config_error(VerificationKey.from_jwk, jwk) == "config_invalid"


def test_to_jwk_round_trip(ec_key: ec.EllipticCurvePrivateKey) -> None:
    key = VerificationKey.from_public_key(ec_key.public_key(), alg="ES256")
    jwk = key.to_jwk()
    assert jwk["use"] == "sig" and jwk["alg"] == "ES256" and jwk["kid"] == key.kid
    assert "d" not in jwk
    assert VerificationKey.from_jwk(jwk) == key


# -- key sets ---------------------------------------------------------------------------------


def test_jwks_skips_keys_for_other_uses(ec_key: ec.EllipticCurvePrivateKey) -> None:
    sig = public_jwk(ec_key.public_key())
    document = {"keys": [
        {**RFC7638_JWK, "use": "enc"},
        {**RFC7638_JWK, "kid": "ops", "key_ops": ["encrypt", "wrapKey"]},
        {**RFC7638_JWK, "kid": "ops-verify", "key_ops": ["verify"]},
        sig,
    ]}
    keys = VerificationKeySet.from_jwks(document)
    assert [k.kid for k in keys] == ["ops-verify", thumbprint(sig)]
    assert keys.get("2011-04-29") is None
    assert keys.get("ops") is None
    assert len(keys) == 2


def test_private_key_marked_for_encryption_still_spoils_the_set(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    private = {**RSAAlgorithm.to_jwk(rsa_key, as_dict=True), "use": "enc"}
    document = {"keys": [RFC7638_JWK, private]}
    assert config_error(VerificationKeySet.from_jwks, document) == "config_invalid"


def test_duplicate_kid_is_refused(ec_key: ec.EllipticCurvePrivateKey) -> None:
    other = {**public_jwk(ec_key.public_key()), "kid": "2011-04-29"}
    document = {"keys": [RFC7638_JWK, other]}
    assert config_error(VerificationKeySet.from_jwks, document) == "config_invalid"
    key = VerificationKey.from_jwk(RFC7638_JWK)
    assert config_error(VerificationKeySet, [key, key]) == "config_invalid"


@pytest.mark.parametrize(
    "document",
    [{}, {"keys": {}}, {"keys": "x"}, [], {"keys": [RFC7638_JWK] * (MAX_JWKS_KEYS + 1)}],
)
def test_malformed_jwks(document: Any) -> None:
    assert config_error(VerificationKeySet.from_jwks, document) == "config_invalid"


@pytest.mark.parametrize("key_ops", [5, 1.5, True, None, {"verify": 1}, "verify"])
def test_key_ops_that_is_no_list_spoils_the_set(key_ops: Any) -> None:
    """RFC 7517 section 4.3: an array of strings. Anything else is a malformed key (a
    ``ConfigError``, which a JWKS refresh treats as a bad document), never a ``TypeError``
    nor a key quietly skipped as one for other uses."""
    jwk = {**RFC7638_JWK, "key_ops": key_ops}
    assert config_error(VerificationKey.from_jwk, jwk) == "config_invalid"
    assert config_error(VerificationKeySet.from_jwks, {"keys": [jwk]}) == "config_invalid"


def test_load_jwks_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "jwks.json"
    source = VerificationKeySet([VerificationKey.from_jwk(RFC7638_JWK),
                                 VerificationKey.from_public_key(ec_key.public_key())])
    path.write_text(json.dumps(source.to_jwks()))
    loaded = VerificationKeySet.load(path)
    assert [k.kid for k in loaded] == [k.kid for k in source]
    assert loaded.get("2011-04-29") == source.get("2011-04-29")


def test_load_pem_public_and_private(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    expected = thumbprint(public_jwk(rsa_key.public_key()))
    for name, data in (("pub.pem", public_pem), ("key.pem", private_pem)):
        (tmp_path / name).write_bytes(b"\n" + data)
        keys = list(VerificationKeySet.load(tmp_path / name))
        assert [k.kid for k in keys] == [expected]
        assert keys[0].alg is None


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
     b'{"keys": "x"}', b" " * 70_000],
)
def test_load_bad_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    assert config_error(VerificationKeySet.load, path) == "config_invalid"
    assert config_error(VerificationKeySet.load, tmp_path / "missing.json") == "config_invalid"


def test_load_public_pem_refuses_other_key_types() -> None:
    pem = x25519.X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert config_error(load_public_pem, pem) == "config_invalid"
