"""Material for the fuzz tests: genuine tokens and ``meta_data`` to mutate, and a signer to
re-sign mutated claims, on a ``LocalSetup`` with a fixed clock (so nothing expires mid-run).

The profile ``FUZZ`` bounds each test to a few seconds: ``make test`` runs them all in well
under a minute. ``make fuzz`` runs the long, million-input version (``fuzz/run.py``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from cardseal import jws
from cardseal.card import Card
from cardseal.envelope import EnvelopeSealer, kms_direct_context, seal_kms_direct
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, LocalSetup, sample_card_json

T = 1_750_000_000
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Material:
    """A local gateway side plus genuine inputs of every kind to start mutations from."""

    setup: LocalSetup
    sealer: EnvelopeSealer  # envelope meta_data around any plaintext (no card validation)
    tokens: list[str]  # envelope and kms-direct tokens, each with a payment claim or not
    envelopes: list[tuple[str, str]]  # (meta_data, its jti)
    kms_direct: list[tuple[str, str]]  # (meta_data, its jti)

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """A correctly signed token around any claims (and header)."""
        signer = self.setup.signer
        head = header if header is not None else {"alg": signer.alg, "kid": signer.kid,
                                                   "typ": "card+jwt"}
        payload = json.dumps(claims, allow_nan=True).encode()
        return jws.encode_compact(head, payload, signer.sign)

    def claims(self, meta_data: str, jti: str) -> dict[str, Any]:
        return {"iss": ISSUER, "aud": AUDIENCE, "iat": T, "exp": T + 120, "jti": jti,
                "meta_data": meta_data}

    def envelope(self, plaintext: bytes, jti: str) -> str:
        return self.sealer.seal(plaintext, iss=ISSUER, aud=AUDIENCE, jti=jti)


def build_material(directory: Path) -> Material:
    setup = LocalSetup.create(directory, format="envelope", now=lambda: T)
    card = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))
    envelopes: list[tuple[str, str]] = []
    directs: list[tuple[str, str]] = []
    tokens: list[str] = []
    sealer = EnvelopeSealer(providers=setup.providers, key_uri="local://main")
    material = Material(setup, sealer, tokens, envelopes, directs)
    for pan in (SAMPLE_PANS["visa"], SAMPLE_PANS["amex"]):
        jti = secrets.token_urlsafe(16)
        plaintext = sample_card_json(pan)
        envelopes.append((material.envelope(plaintext, jti), jti))
        direct = seal_kms_direct(setup.providers, "local://main", plaintext,
                                 kms_direct_context(ISSUER, AUDIENCE, jti))
        directs.append((direct, jti))
    tokens.append(setup.sealer.seal(card))
    for meta_data, jti in (envelopes[1], directs[0]):
        claims = material.claims(meta_data, jti)
        claims["payment"] = {"amount": 1999, "currency": "USD", "reference": "order-1"}
        tokens.append(material.sign(claims))
    return material


@pytest.fixture(scope="session")
def material(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Material]:
    yield build_material(tmp_path_factory.mktemp("fuzz"))
