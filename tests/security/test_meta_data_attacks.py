"""Attacks on ``meta_data``: moved between tokens, issuers and audiences; sealed under a KMS key
the issuer may not use; its envelope cut, extended or re-encoded; and IV/nonce uniqueness.

Every tampered ``meta_data`` here rides in a validly signed token whose other claims are genuine
(the signature covers ``meta_data``, so only an issuer's signing key can put it there: these are
the attacks of a compromised or confused issuer, and of a token thief who re-signs nothing).
Codes: CONTRACT.md section 5 (``meta_data_malformed``, ``decryption_failed``,
``kms_key_not_allowed``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization

from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.card import Card
from cardseal.client import Sealer
from cardseal.envelope import (
    MAX_META_DATA_CHARS,
    DataKeyReuse,
    EnvelopeSealer,
    kms_direct_context,
    seal_kms_direct,
)
from cardseal.errors import CardsealError
from cardseal.keys.base import DataKey, EncryptionContext, KeyProvider, KeyProviders
from cardseal.keys.jwk import VerificationKeySet
from cardseal.keys.signing import PemSigner, generate_private_key_pem
from cardseal.opener import CardOpener
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, LocalSetup, sample_card_json
from cardseal.tokens import IssuerPolicy, TokenVerifier
from tests.security.conftest import CARD, Forge, T, refused, refused_open

PLAINTEXT = sample_card_json(SAMPLE_PANS["visa"])


def retouch(setup: LocalSetup, change: Callable[[str], str], **claims: object) -> str:
    """A genuine token whose ``meta_data`` went through ``change``, signed again with the same
    claims (same jti), so the envelope is the only thing that differs."""
    forge = Forge(setup)
    head, body = forge.parts()
    body.update(claims)
    body["meta_data"] = change(str(body["meta_data"]))
    return forge.raw(json.dumps(head).encode(), json.dumps(body).encode())


def part(index: int, change: Callable[[bytes], bytes]) -> Callable[[str], str]:
    """A ``meta_data`` change that rewrites the decoded bytes of envelope part ``index``."""
    def apply(meta_data: str) -> str:
        parts = meta_data.split(".")
        parts[index] = b64url_encode(change(b64url_decode(parts[index])))
        return ".".join(parts)
    return apply


# -- moved between tokens, issuers, audiences ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["envelope", "kms-direct"])
def test_meta_data_swapped_between_tokens(tmp_path_factory: pytest.TempPathFactory,
                                          fmt: str) -> None:
    """``meta_data`` lifted from one genuine token into another genuine token of the same
    issuer (another jti): it must not decrypt there.

    Source: RFC 8725 section 2.7 (substitution attacks); CONTRACT.md section 3 ("a meta_data
    moved into another token fails").
    """
    setup = LocalSetup.create(tmp_path_factory.mktemp(fmt), format=fmt, now=lambda: T)
    donor = setup.verifier.verify(setup.sealer.seal(CARD))
    refused_open(setup, Forge(setup).with_meta_data(donor.meta_data), "decryption_failed")


@pytest.fixture
def two_issuers(rs256: LocalSetup) -> tuple[TokenVerifier, CardOpener, PemSigner, IssuerPolicy]:
    """The setup's issuer A and a second trusted issuer B, both allowed ``local://main``."""
    signer_b = PemSigner(serialization.load_pem_private_key(  # type: ignore[arg-type]
        generate_private_key_pem("RS256"), None))
    policy_b = IssuerPolicy(iss="other-service", audience=AUDIENCE,
                            keys=VerificationKeySet([signer_b.verification_key()]),
                            allowed_kms_keys=("local://main",))
    verifier = TokenVerifier(issuers=[rs256.policy, policy_b], now=lambda: T)
    opener = CardOpener(providers=rs256.providers, issuers=[rs256.policy, policy_b])
    return verifier, opener, signer_b, policy_b


def test_meta_data_swapped_between_issuers(
    rs256: LocalSetup, two_issuers: tuple[TokenVerifier, CardOpener, PemSigner, IssuerPolicy],
) -> None:
    """Issuer B (trusted, allowed the same KMS key) copies issuer A's ``meta_data`` and its jti
    into a token of its own: the data key is bound to A by the KMS encryption context.

    Source: RFC 8725 section 2.7; CONTRACT.md section 3 (context ``{"purpose", "iss", "aud"}``);
    AWS KMS Developer Guide, "Encryption context" (binding ciphertext to its use).
    """
    verifier, opener, signer_b, _ = two_issuers
    stolen = rs256.verifier.verify(rs256.sealer.seal(CARD))
    forge_b = Forge(rs256)
    _, claims = forge_b.parts()
    claims.update(iss="other-service", jti=stolen.jti, meta_data=stolen.meta_data)
    head = {"alg": "RS256", "kid": signer_b.kid, "typ": "card+jwt"}
    token = forge_b.raw(json.dumps(head).encode(), json.dumps(claims).encode(), signer_b.sign)
    verified = verifier.verify(token)
    assert verified.issuer.iss == "other-service"
    with pytest.raises(CardsealError) as excinfo:
        opener.open_card(verified)
    assert excinfo.value.code == "decryption_failed"


def test_meta_data_swapped_between_audiences(rs256: LocalSetup) -> None:
    """``meta_data`` sealed for another gateway (audience) by the same issuer and key, put in a
    token for this gateway with the same jti; and the other gateway's whole token.

    Source: RFC 8725 section 3.9 (use and validate the audience); RFC 7519 section 4.1.3.
    """
    forge = Forge(rs256)
    _, claims = forge.parts()
    sealer = EnvelopeSealer(providers=rs256.providers, key_uri="local://main")
    elsewhere = sealer.seal(PLAINTEXT, iss=ISSUER, aud="another-gateway", jti=str(claims["jti"]))
    refused_open(rs256, retouch(rs256, lambda _: elsewhere, jti=claims["jti"]),
                 "decryption_failed")
    refused(rs256.verifier, forge.token(claims={"aud": "another-gateway",
                                                "meta_data": elsewhere}),
            "token_audience_invalid")


def test_kms_direct_swapped_between_issuers(rs256: LocalSetup) -> None:
    """A ``kms-direct`` ciphertext made for another issuer's context (same KMS key, same jti).

    Source: RFC 8725 section 2.7; CONTRACT.md section 3 (context with iss, aud and jti).
    """
    forge = Forge(rs256)
    _, claims = forge.parts()
    jti = str(claims["jti"])
    blob = seal_kms_direct(rs256.providers, "local://main", PLAINTEXT,
                           kms_direct_context("other-service", AUDIENCE, jti))
    refused_open(rs256, retouch(rs256, lambda _: blob, jti=jti), "decryption_failed")


# -- KMS keys the issuer does not allow ----------------------------------------------------------


class RecordingProvider(KeyProvider):
    """Wraps the local provider; records the key named in every decrypt."""

    scheme = "local"

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.decrypted_with: list[str] = []

    def encrypt(self, key_uri: str, plaintext: bytes, context: EncryptionContext | None
                ) -> bytes:
        return self.inner.encrypt(key_uri, plaintext, context)

    def decrypt(self, key_uri: str, ciphertext: bytes, context: EncryptionContext | None
                ) -> bytes:
        self.decrypted_with.append(key_uri)
        return self.inner.decrypt(key_uri, ciphertext, context)

    def generate_data_key(self, key_uri: str, context: Mapping[str, str] | None) -> DataKey:
        return self.inner.generate_data_key(key_uri, context)


@pytest.fixture
def recorded(fresh: LocalSetup) -> tuple[LocalSetup, RecordingProvider]:
    """A fresh setup whose gateway side decrypts through a recording provider."""
    local = fresh.providers.provider_for("local://main")
    recorder = RecordingProvider(local)
    providers = KeyProviders(recorder)
    opener = CardOpener(providers=providers, issuers=[fresh.policy], cache_size=0)
    return replace(fresh, opener=opener), recorder


@pytest.mark.parametrize("case", ["kid-names-other", "kid-claims-main-wrapped-by-other",
                                  "kid-unknown-scheme", "kid-traversal", "kid-alias-lookalike",
                                  "kms-direct-under-other"])
def test_kms_ciphertext_under_a_key_the_issuer_does_not_allow(
    recorded: tuple[LocalSetup, RecordingProvider], case: str,
) -> None:
    """Card data sealed under ``local://other`` (in the keyring, allowed for no issuer), named
    as such or disguised as the allowed ``local://main``; a key of another KMS, a traversal, a
    look-alike name. The KMS is only ever asked to decrypt under the allowed key, and never
    yields the plaintext.

    Source: CONTRACT.md section 3 ("A ciphertext under any other key is kms_key_not_allowed and
    is never decrypted"); PCI DSS v4.0 requirement 3.7.7 (prevent unauthorized key
    substitution); AWS Encryption SDK, strict vs discovery mode.
    """
    setup, recorder = recorded
    forge = Forge(setup)
    _, claims = forge.parts()
    jti = str(claims["jti"])
    other = EnvelopeSealer(providers=setup.providers, key_uri="local://other")
    under_other = other.seal(PLAINTEXT, iss=ISSUER, aud=AUDIENCE, jti=jti)

    def rename(meta_data: str, kid: str) -> str:
        head, *rest = meta_data.split(".")
        header = json.loads(b64url_decode(head))
        return ".".join([b64url_encode(json.dumps({**header, "kid": kid}).encode()), *rest])

    meta_data = {
        "kid-names-other": under_other,
        "kid-claims-main-wrapped-by-other": rename(under_other, "local://main"),
        "kid-unknown-scheme": rename(under_other, "aws-kms://alias/attacker"),
        "kid-traversal": rename(under_other, "local://main/../other"),
        "kid-alias-lookalike": rename(under_other, "local://main "),
        "kms-direct-under-other": seal_kms_direct(setup.providers, "local://other", PLAINTEXT,
                                                  kms_direct_context(ISSUER, AUDIENCE, jti)),
    }[case]
    refused_open(setup, retouch(setup, lambda _: meta_data, jti=jti), "kms_key_not_allowed")
    assert set(recorder.decrypted_with) <= {"local://main"}
    if case != "kid-claims-main-wrapped-by-other" and case != "kms-direct-under-other":
        assert recorder.decrypted_with == []  # refused on the header alone


# -- the envelope cut, extended, re-encoded ------------------------------------------------------

WRAPPED, IV, CIPHERTEXT, TAG = 1, 2, 3, 4

ENVELOPE_CHANGES: dict[str, tuple[Callable[[str], str], str]] = {
    "iv-truncated": (part(IV, lambda b: b[:-1]), "meta_data_malformed"),
    "iv-extended": (part(IV, lambda b: b + b"\x00"), "meta_data_malformed"),
    "iv-empty": (part(IV, lambda b: b""), "meta_data_malformed"),
    "iv-16-bytes": (part(IV, lambda b: b + bytes(4)), "meta_data_malformed"),
    "tag-truncated-to-15": (part(TAG, lambda b: b[:-1]), "meta_data_malformed"),
    "tag-truncated-to-12": (part(TAG, lambda b: b[:12]), "meta_data_malformed"),
    "tag-truncated-to-4": (part(TAG, lambda b: b[:4]), "meta_data_malformed"),
    "tag-extended": (part(TAG, lambda b: b + b"\x00"), "meta_data_malformed"),
    "tag-empty": (part(TAG, lambda b: b""), "meta_data_malformed"),
    "tag-flipped": (part(TAG, lambda b: bytes([b[0] ^ 1]) + b[1:]), "decryption_failed"),
    "ciphertext-truncated": (part(CIPHERTEXT, lambda b: b[:-1]), "decryption_failed"),
    "ciphertext-extended": (part(CIPHERTEXT, lambda b: b + b"\x00"), "decryption_failed"),
    "ciphertext-empty": (part(CIPHERTEXT, lambda b: b""), "decryption_failed"),
    "ciphertext-flipped": (part(CIPHERTEXT, lambda b: bytes([b[0] ^ 1]) + b[1:]),
                           "decryption_failed"),
    "ciphertext-oversize": (part(CIPHERTEXT, lambda b: b + bytes(4096)), "meta_data_malformed"),
    "tag-moved-into-ciphertext": (lambda m: ".".join([
        *m.split(".")[:3],
        b64url_encode(b64url_decode(m.split(".")[3]) + b64url_decode(m.split(".")[4])), ""]),
        "meta_data_malformed"),
    "wrapped-key-truncated": (part(WRAPPED, lambda b: b[:-1]), "decryption_failed"),
    "wrapped-key-cut-to-3-bytes": (part(WRAPPED, lambda b: b[:3]), "decryption_failed"),
    "wrapped-key-extended": (part(WRAPPED, lambda b: b + b"\x00"), "decryption_failed"),
    "wrapped-key-empty": (part(WRAPPED, lambda b: b""), "meta_data_malformed"),
    "wrapped-key-oversize": (part(WRAPPED, lambda b: b + bytes(2048)), "meta_data_malformed"),
    "four-parts": (lambda m: m.rsplit(".", 1)[0], "meta_data_malformed"),
    "six-parts": (lambda m: m + ".AAAA", "meta_data_malformed"),
    "padded-part": (lambda m: m + "=" * (-len(m.split(".")[4]) % 4 or 4),
                    "meta_data_malformed"),
    "whitespace": (lambda m: m.replace(".", ". ", 1), "meta_data_malformed"),
    "oversize": (lambda m: m + "A" * MAX_META_DATA_CHARS, "meta_data_malformed"),
    "not-a-string": (lambda m: m, "meta_data_malformed"),  # replaced below by a JSON object
}


@pytest.mark.parametrize("case", list(ENVELOPE_CHANGES))
def test_envelope_truncated_or_extended(rs256: LocalSetup, case: str) -> None:
    """IVs, tags, ciphertexts and wrapped keys cut or extended by a byte, emptied, oversize;
    a GCM tag truncated to 32..120 bits (GCM allows it, JWE A256GCM does not); the tag moved
    into the ciphertext; a part count or encoding off.

    Source: RFC 7518 section 5.3 (A256GCM: 96-bit IV, 128-bit tag); NIST SP 800-38D sections
    5.2.1.2 and appendix C (short tags weaken forgery bounds); RFC 7516 section 5.2;
    Wycheproof aes_gcm vectors.
    """
    change, code = ENVELOPE_CHANGES[case]
    if case == "not-a-string":
        token = Forge(rs256).token(claims={"meta_data": {"protected": "x"}})
        refused(rs256.verifier, token, code)
        return
    refused_open(rs256, retouch(rs256, change), code)


@pytest.mark.parametrize("case", ["truncated", "extended", "empty-after-decode", "one-byte",
                                  "mixed-alphabets", "whitespace"])
def test_kms_direct_ciphertext_truncated_or_extended(tmp_path_factory: pytest.TempPathFactory,
                                                     case: str) -> None:
    """A ``kms-direct`` CiphertextBlob cut or extended by a byte, emptied, one byte long, or
    encoded with mixed base64 alphabets or whitespace.

    Source: AWS KMS API reference, Decrypt (InvalidCiphertextException); RFC 4648 section 3.3.
    """
    setup = LocalSetup.create(tmp_path_factory.mktemp("direct"), format="kms-direct",
                              now=lambda: T)

    def change(meta_data: str) -> str:
        blob = base64.b64decode(meta_data)
        return {
            "truncated": lambda: base64.b64encode(blob[:-1]).decode(),
            "extended": lambda: base64.b64encode(blob + b"\x00").decode(),
            "empty-after-decode": lambda: "====",
            "one-byte": lambda: base64.b64encode(blob[:1]).decode(),
            "mixed-alphabets": lambda: "-_" + meta_data[2:].replace("A", "+", 1),
            "whitespace": lambda: meta_data[:8] + "\n" + meta_data[8:],
        }[case]()

    code = "decryption_failed" if case in ("truncated", "extended", "one-byte") \
        else "meta_data_malformed"
    refused_open(setup, retouch(setup, change), code)


def test_jwe_protected_header_rewritten(rs256: LocalSetup) -> None:
    """The envelope's protected header re-encoded (same members, other order or spacing),
    given a ``zip`` member (decompression bombs) or another ``enc``: the header bytes are the
    AAD, and anything but the contract's four members is refused before any KMS call.

    Source: RFC 7516 section 5.2 step 14 (AAD is the encoded protected header); CVE-2024-33664
    (python-jose JWE decompression bomb); RFC 8725 section 3.6 (avoid compression).
    """
    def rewrite(header: Callable[[dict[str, object]], dict[str, object]]
                ) -> Callable[[str], str]:
        def apply(meta_data: str) -> str:
            head, *rest = meta_data.split(".")
            value = header(json.loads(b64url_decode(head)))
            return ".".join([b64url_encode(json.dumps(value).encode()), *rest])
        return apply

    refused_open(rs256, retouch(rs256, rewrite(lambda h: dict(reversed(h.items())))),
                 "decryption_failed")
    for change in (lambda h: {**h, "zip": "DEF"}, lambda h: {**h, "enc": "A128GCM"},
                   lambda h: {**h, "alg": "dir"}, lambda h: {**h, "jti": 1},
                   lambda h: {k: v for k, v in h.items() if k != "jti"}):
        refused_open(rs256, retouch(rs256, rewrite(change)), "meta_data_malformed")


# -- IV and key uniqueness -----------------------------------------------------------------------


def test_sealer_never_repeats_an_iv_under_one_data_key(fresh: LocalSetup) -> None:
    """20,000 envelopes under ONE data key (reuse at its 100,000 cap): every 96-bit IV differs.
    A repeated (key, IV) pair in GCM leaks the XOR of plaintexts and the authentication key.

    Source: NIST SP 800-38D section 8 (IV uniqueness; 2^32 random IVs per key at most);
    Joux, "Authentication failures in NIST version of GCM" (2006); Bock et al., "Nonce-
    Disrespecting Adversaries" (USENIX WOOT 2016).
    """
    sealer = EnvelopeSealer(providers=fresh.providers, key_uri="local://main",
                            reuse=DataKeyReuse(max_uses=100_000, max_age=3600))
    count = 20_000
    ivs: set[str] = set()
    wrapped: set[str] = set()
    for i in range(count):
        parts = sealer.seal(b"{}", iss=ISSUER, aud=AUDIENCE, jti=f"jti-{i:016d}").split(".")
        wrapped.add(parts[1])
        ivs.add(parts[2])
    assert len(wrapped) == 1  # one data key for all of them: the IVs are what must differ
    assert len(ivs) == count
    assert fresh.providers.calls["generate_data_key"] == 1


def test_tokens_never_repeat_an_iv_or_a_jti(eddsa: LocalSetup) -> None:
    """2,000 complete tokens from one sealer: IVs, jtis and ciphertexts all distinct, every jti
    carrying at least 128 bits (22 base64url characters of 16 random bytes).

    Source: NIST SP 800-38D section 8; CONTRACT.md section 3 (jti: at least 128 bits of
    randomness); RFC 7519 section 4.1.7.
    """
    sealer = Sealer(signer=eddsa.signer, issuer=ISSUER, audience=AUDIENCE, kms_key="local://main",
                    providers=eddsa.providers, now=lambda: T)
    count = 2000
    card = Card.from_json(PLAINTEXT)
    ivs: set[str] = set()
    jtis: set[str] = set()
    ciphertexts: set[str] = set()
    for _ in range(count):
        claims = json.loads(b64url_decode(sealer.seal(card).split(".")[1]))
        parts = claims["meta_data"].split(".")
        ivs.add(parts[2])
        ciphertexts.add(parts[3])
        jti = claims["jti"]
        assert len(b64url_decode(jti)) >= 16
        jtis.add(jti)
    assert len(ivs) == len(jtis) == len(ciphertexts) == count
