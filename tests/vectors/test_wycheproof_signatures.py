"""Wycheproof known-answer vectors for the primitives under cardseal's tokens and envelopes.

Signatures go through ``cardseal.jws.verify_signature`` exactly as a token's would: a
``ParsedJws`` whose signing input is the vector's message, verified with the JOSE algorithm
that names the primitive (RS256, PS256, ES256, EdDSA). Keys are loaded both from the vector's
PEM and through ``VerificationKey.from_jwk`` where the vector carries a JWK, and must agree.

AES-GCM goes through ``cryptography``'s ``AESGCM`` as ``cardseal.envelope`` uses it (256-bit
key, 96-bit IV, 128-bit tag appended to the ciphertext). Every other vector shape is fed to
``EnvelopeOpener.open`` to show cardseal refuses it before any decryption.

Every vector of every file applies; each test asserts how many ran against the file's count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cardseal import jws
from cardseal._encoding import b64url_encode, dumps_compact
from cardseal.envelope import EnvelopeOpener
from cardseal.errors import CardsealError
from cardseal.keys.base import DataKey, KeyProvider, KeyProviders
from cardseal.keys.jwk import PublicKey, VerificationKey, public_jwk

# Wycheproof's "acceptable" vectors, decided one by one: True = cardseal accepts it.
ACCEPTABLE: Final[dict[tuple[str, int], bool]] = {
    # MissingNull: PKCS#1 v1.5 DigestInfo without the NULL parameter. RFC 8017 section 9.2
    # note 2 lets verifiers refuse it; OpenSSL does, so cardseal never accepts it.
    ("rsa_signature_2048_sha256_test.json", 8): False,
}

SIGNATURE_FILES = [
    ("rsa_signature_2048_sha256_test.json", "RS256", "keyJwk"),
    ("rsa_pss_2048_sha256_mgf1_32_test.json", "PS256", "publicKeyJwk"),
    ("ecdsa_secp256r1_sha256_p1363_test.json", "ES256", "publicKeyJwk"),
    ("ed25519_test.json", "EdDSA", "publicKeyJwk"),
]


def load(directory: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / name).read_text())
    return document


def cases(document: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for group in document["testGroups"]:
        for test in group["tests"]:
            yield group, test


def declared_count(document: Mapping[str, Any]) -> int:
    count = sum(len(group["tests"]) for group in document["testGroups"])
    assert count == document["numberOfTests"]
    return count


def group_key(group: Mapping[str, Any], jwk_member: str) -> PublicKey:
    key = serialization.load_pem_public_key(group["publicKeyPem"].encode())
    jwk = group.get(jwk_member)
    if jwk is not None:  # the same key through cardseal's JWK loader
        assert public_jwk(VerificationKey.from_jwk(jwk).key) == public_jwk(key)  # type: ignore[arg-type]
    return key  # type: ignore[return-value]


def verifies(alg: str, key: PublicKey, message: bytes, signature: bytes) -> bool:
    parsed = jws.ParsedJws(header={"alg": alg}, payload=b"", signing_input=message,
                           signature=signature)
    return jws.verify_signature(parsed, key, alg)


@pytest.mark.parametrize(("name", "alg", "jwk_member"), SIGNATURE_FILES)
def test_signature_vectors(wycheproof_dir: Path, name: str, alg: str, jwk_member: str) -> None:
    document = load(wycheproof_dir, name)
    applied = passed = 0
    wrong: list[int] = []
    for group, test in cases(document):
        key = group_key(group, jwk_member)
        if test["result"] == "acceptable":
            expected = ACCEPTABLE[(name, test["tcId"])]
        else:
            expected = test["result"] == "valid"
        applied += 1
        got = verifies(alg, key, bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"]))
        if got == expected:
            passed += 1
        else:
            wrong.append(test["tcId"])
    assert wrong == []
    assert applied == passed == declared_count(document)


def test_every_acceptable_vector_is_decided(wycheproof_dir: Path) -> None:
    found = {
        (name, test["tcId"])
        for name, _, _ in SIGNATURE_FILES
        for _, test in cases(load(wycheproof_dir, name))
        if test["result"] == "acceptable"
    }
    assert found == set(ACCEPTABLE)


# -- AES-GCM ----------------------------------------------------------------------------------

JTI = "wycheproof-aes-gcm-0001"
VECTOR_KEY = "vector://aes-gcm"


class VectorKeyProvider(KeyProvider):
    """A KMS whose every unwrap yields the current vector's key (to reach the data-key check)."""

    scheme: ClassVar[str] = "vector"

    def __init__(self) -> None:
        self.data_key = b""
        self.decrypts = 0

    def encrypt(self, key_uri: str, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        raise AssertionError("never called")

    def decrypt(self, key_uri: str, ciphertext: bytes, context: Mapping[str, str] | None
                ) -> bytes:
        self.decrypts += 1
        return self.data_key

    def generate_data_key(self, key_uri: str, context: Mapping[str, str] | None) -> DataKey:
        raise AssertionError("never called")


def envelope(iv: bytes, ciphertext: bytes, tag: bytes) -> str:
    protected = dumps_compact({"alg": "kms", "enc": "A256GCM", "kid": VECTOR_KEY, "jti": JTI})
    return ".".join(b64url_encode(p) for p in (protected, b"wrapped", iv, ciphertext, tag))


def open_code(opener: EnvelopeOpener, meta_data: str) -> str:
    with pytest.raises(CardsealError) as excinfo:
        opener.open(meta_data, allowed_keys=(VECTOR_KEY,), iss="iss", aud="aud", jti=JTI)
    return excinfo.value.code


def gcm_parts(test: Mapping[str, Any]) -> Sequence[bytes]:
    return [bytes.fromhex(test[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag")]


def test_aes_gcm_vectors(wycheproof_dir: Path) -> None:
    document = load(wycheproof_dir, "aes_gcm_test.json")
    provider = VectorKeyProvider()
    opener = EnvelopeOpener(providers=KeyProviders(provider), cache_size=0)
    cardseal_shape = other_iv = other_key = 0
    for group, test in cases(document):
        assert group["tagSize"] == 128  # the file has no other tag size; see the test below
        key, iv, aad, msg, ct, tag = gcm_parts(test)
        if group["ivSize"] != 96:  # refused by the envelope parser, before any KMS call
            before = provider.decrypts
            assert open_code(opener, envelope(iv, ct, tag)) == "meta_data_malformed"
            assert provider.decrypts == before
            other_iv += 1
        elif group["keySize"] != 256:  # a data key that is not 256 bits is never used
            provider.data_key = key
            assert open_code(opener, envelope(iv, ct, tag)) == "decryption_failed"
            other_key += 1
        else:  # cardseal's own construction: AES-256-GCM, 12-byte IV, tag after ciphertext
            aead = AESGCM(key)
            if test["result"] == "valid":
                assert aead.decrypt(iv, ct + tag, aad) == msg, test["tcId"]
                assert aead.encrypt(iv, msg, aad) == ct + tag, test["tcId"]
            else:
                with pytest.raises(InvalidTag):
                    aead.decrypt(iv, ct + tag, aad)
            cardseal_shape += 1
    expected_shape = sum(len(g["tests"]) for g in document["testGroups"]
                         if (g["keySize"], g["ivSize"], g["tagSize"]) == (256, 96, 128))
    expected_iv = sum(len(g["tests"]) for g in document["testGroups"] if g["ivSize"] != 96)
    assert (cardseal_shape, other_iv) == (expected_shape, expected_iv)
    assert cardseal_shape + other_iv + other_key == declared_count(document)


def test_aes_gcm_short_tags_are_refused(wycheproof_dir: Path) -> None:
    """GCM allows 32..128-bit tags; the file holds 128-bit ones only, so truncate them."""
    document = load(wycheproof_dir, "aes_gcm_test.json")
    provider = VectorKeyProvider()
    opener = EnvelopeOpener(providers=KeyProviders(provider), cache_size=0)
    applied = 0
    for group, test in cases(document):
        if (group["keySize"], group["ivSize"]) != (256, 96) or test["result"] != "valid":
            continue
        key, iv, _, _, ct, tag = gcm_parts(test)
        provider.data_key = key
        for wrong_tag in (tag[:4], tag[:8], tag[:12], tag[:15], tag + b"\x00"):
            assert open_code(opener, envelope(iv, ct, wrong_tag)) == "meta_data_malformed"
        applied += 1
    assert provider.decrypts == 0
    assert applied == sum(1 for g, t in cases(document)
                          if (g["keySize"], g["ivSize"]) == (256, 96) and t["result"] == "valid")
