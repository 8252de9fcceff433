"""What a stream of tokens costs in KMS calls: cardseal's defaults against the seed's flow.

Both flows run against the emulator through the proxy, which counts every request it receives.
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path

import boto3
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cardseal.config import (
    build_issuer_policies,
    build_opener,
    build_providers,
    build_sealer,
    build_verifier,
    load_settings,
)
from cardseal.scaffold import init_dir
from cardseal.testing import sample_card
from tests.integration.conftest import REGION, KmsEmulator
from tests.integration.kms_proxy import KmsProxy

pytestmark = pytest.mark.integration

TOKENS = 1000


def test_a_thousand_tokens_cost_the_calls_the_reuse_limits_imply(
    kms: KmsEmulator, proxy: KmsProxy, tmp_path: Path
) -> None:
    """N tokens sealed and opened with the default settings, within ``data_key_max_age``:

        GenerateDataKey <= ceil(N / data_key_max_uses)          (one data key per max_uses tokens)
        Decrypt         <= ceil(N / data_key_max_uses)          (each unwrapped data key is cached
                                                                 data_key_cache_ttl s, 1024 kept)
        DescribeKey     =  0                                    (keys named by ARN)

    With N = 1,000 and the default data_key_max_uses = 1,000: 1 + 1 = 2 calls, against 2,000
    for the seed's flow (one Encrypt and one Decrypt per token).
    """
    key = kms.symmetric_key()
    config = init_dir(tmp_path)
    text = config.read_text().replace('"local://main"', f'"aws-kms://{key.arn}"')
    text = text.replace('endpoint_url = ""', f'endpoint_url = "{proxy.endpoint}"')
    config.write_text(text)
    settings = load_settings(config)
    assert settings.client.data_key_max_uses == 1000  # the defaults, as `cardseal init` writes
    providers = build_providers(settings)
    sealer = build_sealer(settings, providers)
    policies = build_issuer_policies(settings)
    verifier = build_verifier(settings, policies)
    opener = build_opener(settings, policies, providers)
    card = sample_card()
    proxy.reset()

    started = time.monotonic()
    tokens = [sealer.seal(card) for _ in range(TOKENS)]
    opened = [opener.open_card(verifier.verify(token)).pan for token in tokens]
    elapsed = time.monotonic() - started

    assert elapsed < settings.client.data_key_max_age  # the formula's premise
    assert opened == [card.pan] * TOKENS
    per_key = math.ceil(TOKENS / settings.client.data_key_max_uses)
    assert proxy.attempts["GenerateDataKey"] <= per_key
    assert proxy.attempts["Decrypt"] <= per_key
    assert sum(proxy.attempts.values()) == 2 * per_key == 2
    assert providers.calls == {"generate_data_key": 1, "decrypt": 1}


def test_the_seeds_flow_costs_two_calls_per_token(
    kms: KmsEmulator, proxy: KmsProxy
) -> None:
    """The seed's client and server (seed/000_20a51ebf4fec5c82.txt): one Encrypt per token on
    the client, one Decrypt per token on the server. Its PyJWT signing and verification run
    too, with the key loaded once (the seed re-reads the PEM per token; that costs time, not
    KMS calls)."""
    key = kms.symmetric_key()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kms_client = boto3.client("kms", region_name=REGION, endpoint_url=proxy.endpoint)
    card = {"card_number": "4111111111111111", "expiry_date": "12/99", "cvv": "123"}
    proxy.reset()
    try:
        for _ in range(TOKENS):
            blob = kms_client.encrypt(KeyId=key.key_id,
                                      Plaintext=json.dumps(card).encode("utf-8"))["CiphertextBlob"]
            now = int(time.time())
            token = jwt.encode({"iss": "payment-service", "aud": "payment-gateway", "iat": now,
                                "exp": now + 1800, "meta_data": base64.b64encode(blob).decode()},
                               private, algorithm="RS256")
            claims = jwt.decode(token, private.public_key(), algorithms=["RS256"],
                                audience="payment-gateway")
            plaintext = kms_client.decrypt(
                CiphertextBlob=base64.b64decode(claims["meta_data"]))["Plaintext"]
            assert json.loads(plaintext) == card
    finally:
        kms_client.close()
    assert proxy.attempts == {"Encrypt": TOKENS, "Decrypt": TOKENS}
    assert sum(proxy.attempts.values()) == 2 * TOKENS
