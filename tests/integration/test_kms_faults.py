"""KMS trouble is a bounded, recoverable ``kms_unavailable``: never a hang, never half-done.

Every fault goes through the proxy in front of the emulator (tests/integration/kms_proxy.py).
The provider runs with ``connect_timeout = read_timeout = 0.5`` s and ``max_attempts = 3``.

The stated bound on one failing KMS call (botocore ``standard`` retries)::

    BOUND = max_attempts * (connect_timeout + read_timeout)      # every attempt times out
          + sum(min(2 ** i, 20) for i in range(max_attempts - 1))  # largest jittered backoffs
          = 3 * (0.5 + 0.5) + (1 + 2) = 6.0 s

(botocore sleeps ``rand(0, 1) * min(scale * 2 ** i, 20)`` before retry ``i + 1``, with
``scale`` = 1 s for throttling and 0.05 s otherwise; the bound takes 1 s for all.) With the
defaults of ``[kms.aws]`` (2 s, 3 s, 3 attempts) the same formula gives 18 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from cardseal.client import Sealer
from cardseal.config import AwsKmsSettings
from cardseal.errors import DecryptionError, KeyProviderError
from cardseal.keys.aws_kms import AwsKmsKeyProvider
from cardseal.keys.base import KeyProviders
from cardseal.keys.jwk import VerificationKeySet
from cardseal.opener import CardOpener
from cardseal.testing import AUDIENCE, ISSUER, sample_card
from cardseal.tokens import IssuerPolicy, TokenVerifier, VerifiedToken
from tests.integration.conftest import KmsEmulator, SymmetricKey, aws_settings, pem_signer
from tests.integration.kms_proxy import KmsProxy, error_reply

pytestmark = pytest.mark.integration

SETTINGS = AwsKmsSettings(connect_timeout=0.5, read_timeout=0.5, max_attempts=3)
BOUND = SETTINGS.max_attempts * (SETTINGS.connect_timeout + SETTINGS.read_timeout) + sum(
    min(2**i, 20) for i in range(SETTINGS.max_attempts - 1)
)
assert BOUND == 6.0


class Sent:
    """HTTP attempts the client sent, per operation (botocore's ``before-send``: retries
    included), for the case where the proxy is down and cannot count them."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    def __call__(self, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self.attempts[operation] = self.attempts.get(operation, 0) + 1


class Gateway:
    """A sealing side and an opening side sharing one provider behind the proxy."""

    def __init__(self, proxy: KmsProxy, key: SymmetricKey) -> None:
        settings = aws_settings(proxy.endpoint, **SETTINGS.model_dump(
            include={"connect_timeout", "read_timeout", "max_attempts"}))
        self.provider = AwsKmsKeyProvider.from_settings(settings)
        self.sent = Sent()
        self.provider.client.meta.events.register("before-send.kms", self.sent)
        self.providers = KeyProviders(self.provider)
        self.signer = pem_signer()
        self.key = key
        issuer = IssuerPolicy(iss=ISSUER, audience=AUDIENCE, allowed_kms_keys=(key.uri("arn"),),
                              keys=VerificationKeySet([self.signer.verification_key()]),
                              formats=frozenset({"envelope", "kms-direct"}))
        self.verifier = TokenVerifier(issuers=[issuer])
        self.opener = CardOpener(providers=self.providers, issuers=[issuer])

    def sealer(self, fmt: str = "envelope") -> Sealer:
        return Sealer(signer=self.signer, issuer=ISSUER, audience=AUDIENCE,
                      kms_key=self.key.uri("arn"), providers=self.providers, format=fmt)

    def open(self, token: str) -> str:
        return self.opener.open_card(self.verifier.verify(token)).pan


@pytest.fixture
def gw(kms: KmsEmulator, proxy: KmsProxy) -> Iterator[Gateway]:
    gateway = Gateway(proxy, kms.symmetric_key())  # a fresh client: a full retry quota
    try:
        yield gateway
    finally:
        gateway.provider.client.close()


def unavailable_within_bound(call: Any) -> float:
    start = time.monotonic()
    with pytest.raises(KeyProviderError) as caught:
        call()
    elapsed = time.monotonic() - start
    assert caught.value.code == "kms_unavailable"
    assert caught.value.message == "The key management service is unavailable."
    assert elapsed < BOUND, f"{elapsed:.2f} s, bound {BOUND} s"
    return elapsed


def inject(proxy: KmsProxy, fault: str) -> None:
    if fault == "down":
        proxy.down()
    else:
        proxy.fault = fault
        proxy.delay = SETTINGS.read_timeout + 1.0


@pytest.mark.parametrize("fault", ["down", "slow", "throttle", "error500"])
@pytest.mark.parametrize("fmt", ["envelope", "kms-direct"])
def test_kms_trouble_is_kms_unavailable_within_the_bound_then_recovers(
    gw: Gateway, proxy: KmsProxy, fault: str, fmt: str
) -> None:
    card = sample_card()
    token = gw.sealer(fmt).seal(card)  # sealed while KMS was fine
    seal_op = "GenerateDataKey" if fmt == "envelope" else "Encrypt"
    fresh = gw.sealer(fmt)  # holds no data key yet
    proxy.reset()
    gw.sent.attempts.clear()
    inject(proxy, fault)

    opening = unavailable_within_bound(lambda: gw.open(token))
    sealing = unavailable_within_bound(lambda: fresh.seal(card))

    # Exactly max_attempts tries of each call, as sent and (when it listens) as received.
    assert gw.sent.attempts == {"Decrypt": 3, seal_op: 3}
    if fault != "down":
        assert proxy.attempts == {"Decrypt": 3, seal_op: 3}
    # Nothing half-done: no data key cached on either side.
    assert gw.opener.envelope.cache_hits == 0
    print(f"{fault}/{fmt}: open failed after {opening:.2f} s, seal after {sealing:.2f} s, "
          f"3 attempts each, bound {BOUND} s")

    proxy.heal()
    proxy.reset()
    start = time.monotonic()
    assert gw.open(token) == card.pan  # the same token opens as soon as KMS is back
    assert gw.open(fresh.seal(card)) == card.pan
    assert time.monotonic() - start < 1.0
    # One call per step: the failed attempts left nothing behind to reuse or to retry.
    assert proxy.attempts == {"Decrypt": 2, seal_op: 1}


def test_slow_kms_answering_within_the_read_timeout_is_not_a_failure(
    gw: Gateway, proxy: KmsProxy
) -> None:
    token = gw.sealer().seal(sample_card())
    proxy.reset()
    proxy.fault, proxy.delay = "slow", SETTINGS.read_timeout / 4
    assert gw.open(token) == sample_card().pan
    assert proxy.attempts == {"Decrypt": 1}


@pytest.mark.parametrize("code", ["DisabledException", "KMSInvalidStateException",
                                  "AccessDeniedException", "NotFoundException",
                                  "InvalidCiphertextException"])
def test_refusals_are_decryption_failed_and_never_retried(
    gw: Gateway, proxy: KmsProxy, code: str
) -> None:
    """moto does not raise DisabledException for a disabled key: the proxy answers as KMS."""
    token = gw.sealer().seal(sample_card())
    verified: VerifiedToken = gw.verifier.verify(token)
    proxy.reset()
    proxy.responders["Decrypt"] = lambda request: error_reply(400, code)
    with pytest.raises(DecryptionError) as caught:
        gw.opener.open_card(verified)
    assert caught.value.code == "decryption_failed"
    assert caught.value.message == "The card data could not be decrypted."
    assert proxy.attempts == {"Decrypt": 1}


def test_refused_credentials_are_kms_unavailable_not_the_tokens_fault(
    gw: Gateway, proxy: KmsProxy
) -> None:
    token = gw.sealer().seal(sample_card())
    proxy.responders["Decrypt"] = lambda request: error_reply(400, "ExpiredTokenException")
    unavailable_within_bound(lambda: gw.open(token))
