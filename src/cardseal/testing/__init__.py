"""Test helpers that tests and users can import: sample cards and a complete local setup.

Nothing here touches a network; ``LocalSetup`` builds every core object on a temporary folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization

from cardseal.card import Card
from cardseal.client import Sealer
from cardseal.envelope import DataKeyReuse
from cardseal.keys.base import KeyProviders
from cardseal.keys.jwk import VerificationKeySet
from cardseal.keys.local import LocalKeyProvider, create_keyring
from cardseal.keys.signing import PemSigner, generate_private_key_pem
from cardseal.opener import CardOpener
from cardseal.tokens import IssuerPolicy, TokenVerifier

ISSUER: Final = "payment-service"
AUDIENCE: Final = "payment-gateway"

# One valid test number per brand (public test numbers from the card networks / Stripe).
SAMPLE_PANS: Final[dict[str, str]] = {
    "visa": "4242424242424242",
    "mastercard": "5555555555554444",
    "mastercard_2series": "2223003122003222",
    "amex": "378282246310005",
    "discover": "6011111111111117",
    "jcb": "3566002020360505",
    "diners": "36227206271667",
    "unionpay": "6200000000000005",
    "maestro": "6759649826438453",
}

# CONTRACT.md section 6: the sandbox processor's decline numbers.
SANDBOX_DECLINES: Final[dict[str, str]] = {
    "4000000000000002": "generic_decline",
    "4000000000009995": "insufficient_funds",
    "4000000000009987": "lost_card",
    "4000000000009979": "stolen_card",
    "4000000000000069": "expired_card",
    "4000000000000127": "incorrect_cvc",
    "4000000000000119": "processing_error",
}


def sample_card_json(pan: str = "4111111111111111", *, cvv: str | None = None,
                     expiry: str = "12/2099") -> bytes:
    """The contract's card JSON for ``pan`` (CVV length fitted to the brand by default)."""
    if cvv is None:
        cvv = "1234" if pan.startswith(("34", "37")) else "123"
    return (
        b'{"card_number": "' + pan.encode() + b'", "expiry_date": "' + expiry.encode()
        + b'", "cvv": "' + cvv.encode() + b'"}'
    )


def sample_card(pan: str = "4111111111111111") -> Card:
    return Card.from_json(sample_card_json(pan))


@dataclass
class LocalSetup:
    """A client and a gateway side wired to one local keyring, for tests and examples."""

    directory: Path
    providers: KeyProviders
    signer: PemSigner
    policy: IssuerPolicy
    sealer: Sealer
    verifier: TokenVerifier
    opener: CardOpener

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        alg: str = "RS256",
        format: str = "envelope",
        legacy: bool = False,
        max_lifetime: int = 300,
        now: Callable[[], float] | None = None,
        reuse: DataKeyReuse | None = None,
    ) -> LocalSetup:
        base = Path(directory)
        create_keyring(base / "keyring.json", ["main", "other"])
        providers = KeyProviders(LocalKeyProvider.from_file(base / "keyring.json"))
        private = serialization.load_pem_private_key(generate_private_key_pem(alg), None)
        signer = PemSigner(private, alg=alg)  # type: ignore[arg-type]
        policy = IssuerPolicy(
            iss=ISSUER,
            audience=AUDIENCE,
            keys=VerificationKeySet([signer.verification_key()]),
            allowed_kms_keys=("local://main",),
            algorithms=frozenset({alg}),
            formats=frozenset({"envelope", "kms-direct"}),
            max_lifetime=max_lifetime,
            legacy=legacy,
        )
        clock = now if now is not None else time.time
        sealer = Sealer(signer=signer, issuer=ISSUER, audience=AUDIENCE, kms_key="local://main",
                        providers=providers, format=format, reuse=reuse, now=clock)
        verifier = TokenVerifier(issuers=[policy], now=clock)
        opener = CardOpener(providers=providers, issuers=[policy])
        return cls(base, providers, signer, policy, sealer, verifier, opener)
