"""CardOpener: a verified token's meta_data into a Card, and what that costs in KMS calls."""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pytest

from cardseal import jws
from cardseal.card import Card
from cardseal.envelope import (
    EnvelopeSealer,
    NeedsRemoteKms,
    decode_kms_direct,
    envelope_context,
    kms_direct_context,
    open_kms_direct,
    seal_kms_direct,
)
from cardseal.errors import CardError, DecryptionError
from cardseal.keys.base import DataKey, EncryptionContext, KeyProviders
from cardseal.keys.local import LocalKeyProvider
from cardseal.opener import CardOpener
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, LocalSetup, sample_card_json
from cardseal.tokens import IssuerPolicy, TokenVerifier, VerifiedToken

CARD = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))
MAIN, OTHER = "local://main", "local://other"
ISS, AUD, JTI = ISSUER, AUDIENCE, "jti-0123456789abcdef"
PLAINTEXT = CARD.to_json()


@pytest.fixture
def providers(setup: LocalSetup) -> KeyProviders:
    return setup.providers


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def sign(setup: LocalSetup, claims: dict[str, object], header: dict[str, object] | None = None,
         ) -> str:
    header = header or {"alg": setup.signer.alg, "kid": setup.signer.kid, "typ": "card+jwt"}
    return jws.encode_compact(header, json.dumps(claims).encode(), setup.signer.sign)


def claims_for(meta_data: str, jti: str | None) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60,
                                 "meta_data": meta_data}
    if jti is not None:
        claims["jti"] = jti
    return claims


def verified(setup: LocalSetup, n: int = 1) -> list[VerifiedToken]:
    return [setup.verifier.verify(setup.sealer.seal(CARD)) for _ in range(n)]


def open_code(opener: CardOpener, token: VerifiedToken) -> str:
    with pytest.raises(DecryptionError) as excinfo:
        opener.open_card(token)
    return excinfo.value.code


def test_open_card_round_trip(setup: LocalSetup) -> None:
    (token,) = verified(setup)
    card = setup.opener.open_card(token)
    assert (card.pan, card.cvv, card.brand) == (CARD.pan, CARD.cvv, "visa")
    assert "meta_data" not in token.public_claims()


def test_one_kms_decrypt_for_many_tokens_under_one_data_key(setup: LocalSetup) -> None:
    tokens = verified(setup, 100)
    assert setup.providers.calls["generate_data_key"] == 1
    for token in tokens:
        assert setup.opener.open_card(token).pan == CARD.pan
    assert setup.providers.calls["decrypt"] == 1
    assert setup.opener.envelope.cache_hits == 99
    assert setup.opener.envelope.cache_misses == 1


def test_cache_ttl_expiry_costs_a_new_decrypt(setup: LocalSetup) -> None:
    clock = FakeClock()
    opener = CardOpener(providers=setup.providers, issuers=[setup.policy], cache_ttl=60,
                        clock=clock)
    tokens = verified(setup, 4)
    opener.open_card(tokens[0])
    clock.now += 59
    opener.open_card(tokens[1])
    assert setup.providers.calls["decrypt"] == 1
    clock.now += 2
    opener.open_card(tokens[2])
    assert setup.providers.calls["decrypt"] == 2
    opener.open_card(tokens[3])
    assert setup.providers.calls["decrypt"] == 2


def test_cache_size_zero_disables_the_cache(setup: LocalSetup) -> None:
    opener = CardOpener(providers=setup.providers, issuers=[setup.policy], cache_size=0)
    for token in verified(setup, 5):
        opener.open_card(token)
    assert setup.providers.calls["decrypt"] == 5
    assert opener.envelope.cache_hits == 0


def test_cache_is_bounded(setup: LocalSetup) -> None:
    opener = CardOpener(providers=setup.providers, issuers=[setup.policy], cache_size=1)
    sealer_a = EnvelopeSealer(providers=setup.providers, key_uri="local://main")
    sealer_b = EnvelopeSealer(providers=setup.providers, key_uri="local://main")
    tokens = []
    for sealer in (sealer_a, sealer_b, sealer_a):
        jti = secrets.token_urlsafe(16)
        meta = sealer.seal(CARD.to_json(), iss=ISSUER, aud=AUDIENCE, jti=jti)
        tokens.append(setup.verifier.verify(sign(setup, claims_for(meta, jti))))
    for token in tokens:
        opener.open_card(token)
    assert setup.providers.calls["decrypt"] == 3


def test_card_validation_happens_after_decryption(setup: LocalSetup) -> None:
    (token,) = verified(setup)
    with pytest.raises(CardError) as excinfo:
        setup.opener.open_card(token, now=datetime(2100, 1, 1, tzinfo=UTC))
    assert excinfo.value.code == "card_expired"


def test_plaintext_that_is_not_a_card_is_malformed(setup: LocalSetup) -> None:
    sealer = EnvelopeSealer(providers=setup.providers, key_uri="local://main")
    for plaintext in (b"not json", b"[]", b'{"card_number": 1}'):
        jti = secrets.token_urlsafe(16)
        meta = sealer.seal(plaintext, iss=ISSUER, aud=AUDIENCE, jti=jti)
        token = setup.verifier.verify(sign(setup, claims_for(meta, jti)))
        assert open_code(setup.opener, token) == "meta_data_malformed"


def test_issuer_unknown_to_the_opener(setup: LocalSetup) -> None:
    other = IssuerPolicy(iss="someone-else", audience=AUDIENCE, keys=setup.policy.keys,
                         allowed_kms_keys=("local://main",))
    opener = CardOpener(providers=setup.providers, issuers=[other])
    (token,) = verified(setup)
    assert open_code(opener, token) == "kms_key_not_allowed"
    assert setup.providers.calls["decrypt"] == 0


def test_envelope_under_a_key_the_issuer_does_not_allow(setup: LocalSetup) -> None:
    sealer = EnvelopeSealer(providers=setup.providers, key_uri="local://other")
    jti = secrets.token_urlsafe(16)
    meta = sealer.seal(CARD.to_json(), iss=ISSUER, aud=AUDIENCE, jti=jti)
    token = setup.verifier.verify(sign(setup, claims_for(meta, jti)))
    assert open_code(setup.opener, token) == "kms_key_not_allowed"
    assert setup.providers.calls["decrypt"] == 0


def test_meta_data_moved_into_another_token(setup: LocalSetup) -> None:
    (original,) = verified(setup)
    token = setup.verifier.verify(
        sign(setup, claims_for(original.meta_data, secrets.token_urlsafe(16))))
    assert open_code(setup.opener, token) == "decryption_failed"


# -- kms-direct -------------------------------------------------------------------------------


def test_kms_direct_round_trip_with_jti_in_context(tmp_path: Path) -> None:
    setup = LocalSetup.create(tmp_path, format="kms-direct")
    (token,) = verified(setup)
    assert token.meta_data_format == "kms-direct"
    assert setup.opener.open_card(token).pan == CARD.pan
    blob = base64.b64decode(token.meta_data)
    context = kms_direct_context(ISSUER, AUDIENCE, token.jti or "")
    assert setup.providers.decrypt("local://main", blob, context) == CARD.to_json()
    with pytest.raises(DecryptionError) as excinfo:
        setup.providers.decrypt("local://main", blob, None)
    assert excinfo.value.code == "decryption_failed"
    assert setup.providers.calls["generate_data_key"] == 0


def test_kms_direct_moved_into_another_token(tmp_path: Path) -> None:
    setup = LocalSetup.create(tmp_path, format="kms-direct")
    (original,) = verified(setup)
    token = setup.verifier.verify(
        sign(setup, claims_for(original.meta_data, secrets.token_urlsafe(16))))
    assert open_code(setup.opener, token) == "decryption_failed"


def test_kms_direct_under_a_key_not_allowed(setup: LocalSetup) -> None:
    jti = secrets.token_urlsafe(16)
    blob = setup.providers.encrypt("local://other", CARD.to_json(),
                                   kms_direct_context(ISSUER, AUDIENCE, jti))
    token = setup.verifier.verify(sign(setup, claims_for(base64.b64encode(blob).decode(), jti)))
    assert open_code(setup.opener, token) == "kms_key_not_allowed"


def test_legacy_kms_direct_without_context_jti_or_kid(tmp_path: Path) -> None:
    setup = LocalSetup.create(tmp_path, legacy=True)
    blob = setup.providers.encrypt("local://main", CARD.to_json(), None)
    meta = base64.urlsafe_b64encode(blob).decode().rstrip("=")
    token = setup.verifier.verify(sign(setup, claims_for(meta, None),
                                       header={"alg": "RS256", "typ": "JWT"}))
    assert token.jti is None
    assert setup.opener.open_card(token).pan == CARD.pan
    # A non-legacy context does not open a legacy ciphertext, and vice versa.
    jti = secrets.token_urlsafe(16)
    blob = setup.providers.encrypt("local://main", CARD.to_json(),
                                   kms_direct_context(ISSUER, AUDIENCE, jti))
    token = setup.verifier.verify(sign(setup, claims_for(base64.b64encode(blob).decode(), jti),
                                       header={"alg": "RS256", "typ": "JWT"}))
    assert open_code(setup.opener, token) == "decryption_failed"


def test_open_plaintext_is_the_card_json(setup: LocalSetup) -> None:
    token = TokenVerifier(issuers=[setup.policy]).verify(setup.sealer.seal(CARD))
    assert setup.opener.open_plaintext(token) == CARD.to_json()


# -- kms-direct primitives ---------------------------------------------------------------------


def test_kms_direct_round_trip(providers: KeyProviders) -> None:
    context = kms_direct_context(ISS, AUD, JTI)
    assert context == {"purpose": "cardseal/meta_data", "iss": ISS, "aud": AUD, "jti": JTI}
    meta_data = seal_kms_direct(providers, MAIN, PLAINTEXT, context)
    blob = decode_kms_direct(meta_data)
    assert base64.b64encode(blob).decode() == meta_data
    assert open_kms_direct(providers, blob, allowed_keys=(MAIN,), context=context) == PLAINTEXT
    urlsafe = base64.urlsafe_b64encode(blob).decode().rstrip("=")
    assert decode_kms_direct(urlsafe) == blob


def test_kms_direct_context_binds_the_jti(providers: KeyProviders) -> None:
    blob = decode_kms_direct(seal_kms_direct(providers, MAIN, PLAINTEXT,
                                             kms_direct_context(ISS, AUD, JTI)))
    for context in (kms_direct_context(ISS, AUD, JTI + "x"), envelope_context(ISS, AUD), None):
        with pytest.raises(DecryptionError) as excinfo:
            open_kms_direct(providers, blob, allowed_keys=(MAIN,), context=context)
        assert excinfo.value.code == "decryption_failed"


def test_kms_direct_legacy_without_context(providers: KeyProviders) -> None:
    blob = decode_kms_direct(seal_kms_direct(providers, MAIN, PLAINTEXT, None))
    assert open_kms_direct(providers, blob, allowed_keys=(MAIN,), context=None) == PLAINTEXT


def test_kms_direct_tries_each_allowed_key(providers: KeyProviders) -> None:
    blob = decode_kms_direct(seal_kms_direct(providers, OTHER, PLAINTEXT, None))
    assert open_kms_direct(providers, blob, allowed_keys=(MAIN, OTHER), context=None) == PLAINTEXT
    assert providers.calls["decrypt"] == 2
    with pytest.raises(DecryptionError) as excinfo:
        open_kms_direct(providers, blob, allowed_keys=(MAIN,), context=None)
    assert excinfo.value.code == "kms_key_not_allowed"
    with pytest.raises(DecryptionError) as excinfo:
        open_kms_direct(providers, blob, allowed_keys=(MAIN, OTHER), context={"a": "b"})
    assert excinfo.value.code == "decryption_failed"
    with pytest.raises(DecryptionError) as excinfo:
        open_kms_direct(providers, b"\0" * 64, allowed_keys=(MAIN, OTHER), context=None)
    assert excinfo.value.code == "decryption_failed"


@pytest.mark.parametrize("meta_data", ["", "=", "QQ=", "+_8=", "QUJD\n", "Q", "A" * 9000, "é"])
def test_kms_direct_malformed(meta_data: str) -> None:
    with pytest.raises(DecryptionError) as excinfo:
        decode_kms_direct(meta_data)
    assert excinfo.value.code == "meta_data_malformed"


class _RemoteLocal(LocalKeyProvider):
    """The local keyring, posing as a network KMS."""

    remote: ClassVar[bool] = True


@pytest.mark.parametrize("format", ["envelope", "kms-direct"])
def test_without_remote_calls_a_remote_kms_is_left_to_the_caller(
    tmp_path: Path, format: str
) -> None:
    setup = LocalSetup.create(tmp_path, format=format)
    remote = KeyProviders(_RemoteLocal.from_file(tmp_path / "keyring.json"))
    opener = CardOpener(providers=remote, issuers=[setup.policy])
    verified = setup.verifier.verify(setup.sealer.seal(CARD))
    with pytest.raises(NeedsRemoteKms):
        opener.open_card(verified, allow_remote=False)
    assert remote.calls["decrypt"] == 0
    assert opener.open_card(verified).to_json() == PLAINTEXT  # off the loop: one KMS call
    again = setup.verifier.verify(setup.sealer.seal(CARD))  # same data key (envelope)
    if format == "envelope":
        assert opener.open_card(again, allow_remote=False).to_json() == PLAINTEXT
        assert remote.calls["decrypt"] == 1
    else:  # one KMS Decrypt per kms-direct token: never inline
        with pytest.raises(NeedsRemoteKms):
            opener.open_card(again, allow_remote=False)


ALIAS = "local://alias-of-main"


class _RemoteAliasing(_RemoteLocal):
    """A network KMS that also knows MAIN as ALIAS (as AWS knows a key by its alias and its
    ARN): resolving ALIAS is a call, counted in ``lookups``."""

    lookups = 0

    def canonical_uri(self, key_uri: str) -> str:
        if key_uri == ALIAS:
            type(self).lookups += 1
            return MAIN
        return super().canonical_uri(key_uri)

    def generate_data_key(self, key_uri: str, context: EncryptionContext | None) -> DataKey:
        return super().generate_data_key(MAIN if key_uri == ALIAS else key_uri, context)

    def known_canonical_uri(self, key_uri: str) -> str | None:  # cached once resolved
        return (MAIN if self.lookups else None) if key_uri == ALIAS else key_uri


def test_resolving_a_key_name_is_left_to_the_caller(tmp_path: Path) -> None:
    """A client that names the issuer's key by another name (an AWS alias where the gateway
    allows the ARN): resolving it is a KMS call (DescribeKey), which the gateway makes off its
    event loop, once per name."""
    setup = LocalSetup.create(tmp_path)
    _RemoteAliasing.lookups = 0
    remote = KeyProviders(_RemoteAliasing.from_file(tmp_path / "keyring.json"))
    sealer = EnvelopeSealer(providers=remote, key_uri=ALIAS)
    opener = CardOpener(providers=remote, issuers=[setup.policy])

    def token() -> VerifiedToken:
        jti = secrets.token_urlsafe(16)
        meta_data = sealer.seal(PLAINTEXT, iss=ISSUER, aud=AUDIENCE, jti=jti)
        assert json.loads(base64.urlsafe_b64decode(meta_data.split(".")[0] + "=="))["kid"] == ALIAS
        return setup.verifier.verify(sign(setup, claims_for(meta_data, jti)))

    first = token()
    with pytest.raises(NeedsRemoteKms):
        opener.open_card(first, allow_remote=False)
    assert (_RemoteAliasing.lookups, remote.calls["decrypt"]) == (0, 0)
    assert opener.open_card(first).to_json() == PLAINTEXT  # off the loop: resolve, Decrypt
    assert (_RemoteAliasing.lookups, remote.calls["decrypt"]) == (1, 1)
    for _ in range(3):  # the name and the data key are known now: opened inline
        assert opener.open_card(token(), allow_remote=False).to_json() == PLAINTEXT
    assert (_RemoteAliasing.lookups, remote.calls["decrypt"]) == (1, 1)


def test_a_local_kms_is_never_left_to_the_caller(setup: LocalSetup) -> None:
    verified = setup.verifier.verify(setup.sealer.seal(CARD))
    assert setup.opener.open_card(verified, allow_remote=False).to_json() == PLAINTEXT
