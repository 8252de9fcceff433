"""Wycheproof JWE vectors (json_web_encryption_test.json) against cardseal.

cardseal accepts exactly one JWE: the ``envelope`` ``meta_data``, protected header
``{"alg": "kms", "enc": "A256GCM", "kid", "jti"}`` (CONTRACT.md section 3). No Wycheproof vector
uses ``alg: "kms"`` (they use RSA-OAEP, RSA1_5, AES key wrap, ECDH-ES, dir), so Wycheproof's
valid/invalid verdict cannot apply as such: every vector must be refused, wherever it is offered.

Every one of the 139 vectors is run three ways:

1. as the token itself (a JWE where a JWS is expected): ``TokenVerifier.verify`` refuses it with
   ``token_malformed``;
2. as ``envelope`` ``meta_data`` given straight to ``EnvelopeOpener.open``: ``meta_data_malformed``
   before any KMS call;
3. inside a genuine, validly signed token, through ``TokenVerifier.verify`` and
   ``CardOpener.open_card`` (what the gateway does): ``meta_data_malformed``, no KMS call.

And the content layer: for every *valid* vector with ``enc: A256GCM`` (cardseal's only content
encryption), the test unwraps the CEK with the group's private key and decrypts with AES-GCM
exactly as ``EnvelopeOpener.open`` does its last step (12-byte IV, 16-byte tag appended to the
ciphertext, AAD = the ASCII of the encoded protected header, RFC 7516 section 5.2 step 14); it
must yield the vector's plaintext, and fail once the AAD, IV, ciphertext or tag is changed.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from tests.vectors.test_wycheproof_signatures import VECTOR_KEY, VectorKeyProvider

from cardseal import jws
from cardseal._encoding import b64url_decode
from cardseal.card import Card
from cardseal.envelope import EnvelopeOpener
from cardseal.errors import CardsealError
from cardseal.keys.base import KeyProviders
from cardseal.keys.jwk import VerificationKey, VerificationKeySet
from cardseal.testing import SAMPLE_PANS, LocalSetup, sample_card_json
from cardseal.tokens import IssuerPolicy, TokenVerifier

FILE: Final = "json_web_encryption_test.json"
T: Final = 1_750_000_000
CARD: Final = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))


def load(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / FILE).read_text())
    return document


def cases(document: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for group in document["testGroups"]:
        for test in group["tests"]:
            yield group, test


def _b64(text: str) -> bytes:
    """Lenient base64url for reading the vectors' own headers (not cardseal's decoder)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def protected_header(jwe: str) -> dict[str, Any] | None:
    try:
        header = json.loads(_b64(jwe.split(".")[0]))
    except (ValueError, IndexError):
        return None
    return header if isinstance(header, dict) else None


# -- 1-3: refused wherever offered ---------------------------------------------------------------


def token_verifier() -> TokenVerifier:
    key = VerificationKey.from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    policy = IssuerPolicy(iss="wycheproof", audience="wycheproof", keys=VerificationKeySet([key]),
                          allowed_kms_keys=(VECTOR_KEY,), algorithms=jws.ALGORITHMS,
                          formats=frozenset({"envelope", "kms-direct"}))
    return TokenVerifier(issuers=[policy], now=lambda: T)


def code_of(call: Any, *args: Any, **kwargs: Any) -> str:
    try:
        call(*args, **kwargs)
    except CardsealError as err:
        return err.code
    return "accepted"


def refusals(directory: Path, setup: LocalSetup) -> dict[str, Counter[str]]:
    """Each vector as a token, as bare meta_data, and in a genuine token: the codes, tallied.

    Also asserts that no KMS call was made for any of them.
    """
    verifier = token_verifier()
    provider = VectorKeyProvider()
    opener = EnvelopeOpener(providers=KeyProviders(provider), cache_size=0)
    kms_calls = setup.providers.total_calls
    result: dict[str, Counter[str]] = {"token": Counter(), "meta_data": Counter(),
                                       "in_token": Counter()}
    for _, test in cases(load(directory)):
        jwe = test["jwe"]
        result["token"][code_of(verifier.verify, jwe)] += 1
        result["meta_data"][code_of(opener.open, jwe, allowed_keys=(VECTOR_KEY,),
                                    iss="wycheproof", aud="wycheproof",
                                    jti="wycheproof-jwe-0001")] += 1
        genuine = jws.parse_compact(setup.sealer.seal(CARD))
        head, claims = genuine.header, json.loads(genuine.payload)
        claims["meta_data"] = jwe
        token = jws.encode_compact(dict(head), json.dumps(claims).encode(), setup.signer.sign)
        result["in_token"][code_of(verify_and_open, setup, token)] += 1
    assert provider.decrypts == 0
    assert setup.providers.calls["decrypt"] == 0  # sealing made data keys; nothing decrypted
    assert setup.providers.total_calls - kms_calls <= 1
    return result


def verify_and_open(setup: LocalSetup, token: str) -> None:
    setup.opener.open_card(setup.verifier.verify(token))


@pytest.fixture(scope="module")
def eddsa_setup(tmp_path_factory: pytest.TempPathFactory) -> LocalSetup:
    return LocalSetup.create(tmp_path_factory.mktemp("jwe"), alg="EdDSA", now=lambda: T)


def test_every_jwe_vector_is_refused_wherever_it_is_offered(wycheproof_dir: Path,
                                                            eddsa_setup: LocalSetup) -> None:
    """139 vectors x 3 places: token_malformed as a token, meta_data_malformed as meta_data."""
    document = load(wycheproof_dir)
    total = document["numberOfTests"]
    assert total == sum(1 for _ in cases(document)) == 139
    result = refusals(wycheproof_dir, eddsa_setup)
    assert result == {"token": Counter({"token_malformed": total}),
                      "meta_data": Counter({"meta_data_malformed": total}),
                      "in_token": Counter({"meta_data_malformed": total})}


def test_no_vector_uses_cardseals_header(wycheproof_dir: Path) -> None:
    """Why the Wycheproof verdict cannot apply: no vector has cardseal's ``alg``/members."""
    for _, test in cases(load(wycheproof_dir)):
        header = protected_header(test["jwe"])
        assert header is None or header.get("alg") != "kms"
        assert header is None or set(header) != {"alg", "enc", "kid", "jti"}


# -- the content layer: A256GCM as the envelope does it ------------------------------------------


def _private_key(jwk: Mapping[str, Any]) -> Any:
    if jwk["kty"] == "RSA":
        return RSAAlgorithm.from_jwk(dict(jwk))
    if jwk["kty"] == "EC":
        return ECAlgorithm.from_jwk(dict(jwk))
    return _b64(jwk["k"])


def _concat_kdf(shared: bytes, algorithm_id: str, bits: int, header: Mapping[str, Any]) -> bytes:
    """RFC 7518 section 4.6.2."""
    def datalen(value: bytes) -> bytes:
        return len(value).to_bytes(4, "big") + value

    other = (datalen(algorithm_id.encode()) + datalen(_b64(header.get("apu", "")))
             + datalen(_b64(header.get("apv", ""))) + bits.to_bytes(4, "big"))
    return ConcatKDFHash(hashes.SHA256(), bits // 8, other).derive(shared)


def unwrap_cek(header: Mapping[str, Any], encrypted_key: bytes, jwk: Mapping[str, Any]) -> bytes:
    """The content-encryption key of a vector (test-side key management, RFC 7518 section 4)."""
    alg = header["alg"]
    key = _private_key(jwk)
    if alg == "dir":
        return bytes(key)
    if alg == "RSA-OAEP":
        assert isinstance(key, rsa.RSAPrivateKey)
        sha1 = hashes.SHA1()  # noqa: S303 - RSA-OAEP is defined with SHA-1 (RFC 7518 4.3)
        return key.decrypt(encrypted_key, padding.OAEP(padding.MGF1(sha1), sha1, None))
    if alg == "RSA-OAEP-256":
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.decrypt(encrypted_key, padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                       hashes.SHA256(), None))
    if alg == "RSA1_5":
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.decrypt(encrypted_key, padding.PKCS1v15())
    if alg in ("A128KW", "A192KW", "A256KW"):
        return aes_key_unwrap(bytes(key), encrypted_key)
    if alg in ("A128GCMKW", "A192GCMKW", "A256GCMKW"):
        return AESGCM(bytes(key)).decrypt(_b64(header["iv"]), encrypted_key + _b64(header["tag"]),
                                          None)
    if alg.startswith("ECDH-ES"):
        epk = ECAlgorithm.from_jwk(dict(header["epk"]))
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(epk, ec.EllipticCurvePublicKey)
        shared = key.exchange(ec.ECDH(), epk)
        if alg == "ECDH-ES":
            return _concat_kdf(shared, header["enc"], 256, header)
        bits = int(alg[9:12])
        return aes_key_unwrap(_concat_kdf(shared, alg, bits, header), encrypted_key)
    raise AssertionError(f"no test-side key management for {alg}")


def envelope_content_decrypt(jwe: str, cek: bytes) -> bytes:
    """AES-256-GCM exactly as ``EnvelopeOpener.open`` applies it to the five parts."""
    protected, _, iv_b64, ciphertext_b64, tag_b64 = jwe.split(".")
    iv, ciphertext, tag = (b64url_decode(p) for p in (iv_b64, ciphertext_b64, tag_b64))
    assert len(cek) == 32 and len(iv) == 12 and len(tag) == 16  # the envelope's own checks
    return AESGCM(cek).decrypt(iv, ciphertext + tag, protected.encode("ascii"))


def a256gcm_valid(document: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(g, t) for g, t in cases(document) if t["result"] == "valid"
            and (protected_header(t["jwe"]) or {}).get("enc") == "A256GCM"]


def content_layer(directory: Path) -> Counter[str]:
    """Run every valid A256GCM vector through the envelope's AES-GCM step; tally per key
    management ``alg`` as "ALG ok" or "ALG FAILED"."""
    tally: Counter[str] = Counter()
    for group, test in a256gcm_valid(load(directory)):
        jwe = test["jwe"]
        header = protected_header(jwe)
        assert header is not None
        cek = unwrap_cek(header, b64url_decode(jwe.split(".")[1]), group["private"])
        ok = envelope_content_decrypt(jwe, cek) == bytes.fromhex(test["pt"])
        parts = jwe.split(".")
        for index in (0, 2, 3, 4):  # the AAD (encoded header), IV, ciphertext, tag
            raw = bytearray(_b64(parts[index]))
            raw[0] ^= 1
            changed = [*parts]
            changed[index] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
            try:
                envelope_content_decrypt(".".join(changed), cek)
                ok = False
            except InvalidTag:
                pass
        tally[f"{header['alg']} {'ok' if ok else 'FAILED'}"] += 1
    return tally


def test_a256gcm_content_layer_matches_rfc_7516(wycheproof_dir: Path) -> None:
    """Every valid A256GCM vector decrypts with the envelope's AES-GCM step; any change to the
    AAD (the encoded header), IV, ciphertext or tag makes it fail."""
    assert len(a256gcm_valid(load(wycheproof_dir))) == 11
    assert content_layer(wycheproof_dir) == {
        "RSA-OAEP ok": 2, "RSA-OAEP-256 ok": 1, "RSA1_5 ok": 1, "A256KW ok": 1,
        "A256GCMKW ok": 2, "ECDH-ES ok": 1, "ECDH-ES+A128KW ok": 2, "ECDH-ES+A256KW ok": 1}
