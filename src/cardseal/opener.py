"""The opening side: decrypt a verified token's ``meta_data`` into a ``Card``, at the last moment.

``CardOpener.open_card`` is what the gateway calls inside its charge step; it never caches
plaintext, only unwrapped data keys (see ``EnvelopeOpener``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime

from cardseal.card import Card
from cardseal.envelope import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_CACHE_TTL,
    EnvelopeOpener,
    NeedsRemoteKms,
    decode_kms_direct,
    kms_direct_context,
    open_kms_direct,
)
from cardseal.errors import DecryptionError, RequestError
from cardseal.keys.base import KeyProviders
from cardseal.tokens import IssuerPolicy, VerifiedToken


class CardOpener:
    """Decrypts ``meta_data`` for the configured issuers through the key providers."""

    def __init__(
        self,
        *,
        providers: KeyProviders,
        issuers: Iterable[IssuerPolicy],
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._providers = providers
        self._envelope = EnvelopeOpener(
            providers=providers, cache_size=cache_size, cache_ttl=cache_ttl, clock=clock
        )
        # Allowed keys resolved once, so alias/x and its ARN are the same key.
        self._allowed: dict[str, tuple[str, ...]] = {
            policy.iss: tuple(providers.canonical_uri(k) for k in policy.allowed_kms_keys)
            for policy in issuers
        }

    @property
    def envelope(self) -> EnvelopeOpener:
        return self._envelope

    def open_plaintext(self, token: VerifiedToken, *, allow_remote: bool = True) -> bytes:
        """The card JSON inside ``token``'s ``meta_data``. With ``allow_remote=False``, raises
        ``NeedsRemoteKms`` where it would call a remote KMS (the gateway keeps such calls off
        its event loop)."""
        policy = token.issuer
        allowed = self._allowed.get(policy.iss)
        if allowed is None:
            raise DecryptionError(code="kms_key_not_allowed")
        if token.meta_data_format == "envelope":
            jti = token.jti
            if jti is None:
                raise DecryptionError(code="meta_data_malformed")
            return self._envelope.open(
                token.meta_data, allowed_keys=allowed, iss=policy.iss, aud=policy.audience,
                jti=jti, allow_remote=allow_remote,
            )
        if not allow_remote and any(self._providers.is_remote(key) for key in allowed):
            raise NeedsRemoteKms
        context = None
        if not policy.legacy:
            jti = token.jti
            if jti is None:
                raise DecryptionError(code="meta_data_malformed")
            context = kms_direct_context(policy.iss, policy.audience, jti)
        return open_kms_direct(
            self._providers, decode_kms_direct(token.meta_data), allowed_keys=allowed,
            context=context,
        )

    def open_card(
        self, token: VerifiedToken, *, now: datetime | None = None, allow_remote: bool = True
    ) -> Card:
        """Decrypt and validate the card. Raises ``DecryptionError``, ``KeyProviderError`` or
        ``CardError`` with the contract code (and ``NeedsRemoteKms``, see
        ``open_plaintext``)."""
        plaintext = self.open_plaintext(token, allow_remote=allow_remote)
        try:
            return Card.from_json(plaintext, now=now)
        except RequestError:
            raise DecryptionError(code="meta_data_malformed") from None
