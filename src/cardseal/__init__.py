"""cardseal: signed, encrypted, single-use card tokens from a payment service to its gateway."""

from cardseal.card import Card, CardView
from cardseal.client import Sealer
from cardseal.envelope import DataKeyReuse
from cardseal.errors import (
    CardError,
    CardsealError,
    ConfigError,
    DecryptionError,
    KeyProviderError,
    PaymentError,
    ProcessorError,
    RequestError,
    StorageError,
    TokenError,
)
from cardseal.keys.base import DataKey, KeyProvider, KeyProviders
from cardseal.keys.jwk import VerificationKey, VerificationKeySet
from cardseal.keys.local import LocalKeyProvider
from cardseal.keys.signing import PemSigner, Signer
from cardseal.opener import CardOpener
from cardseal.tokens import IssuerPolicy, Payment, TokenVerifier, VerifiedToken

__version__ = "0.1.0"

__all__ = [
    "Card",
    "CardError",
    "CardOpener",
    "CardView",
    "CardsealError",
    "ConfigError",
    "DataKey",
    "DataKeyReuse",
    "DecryptionError",
    "IssuerPolicy",
    "KeyProvider",
    "KeyProviderError",
    "KeyProviders",
    "LocalKeyProvider",
    "Payment",
    "PaymentError",
    "PemSigner",
    "ProcessorError",
    "RequestError",
    "Sealer",
    "Signer",
    "StorageError",
    "TokenError",
    "TokenVerifier",
    "VerificationKey",
    "VerificationKeySet",
    "VerifiedToken",
    "__version__",
]
