"""The sealing side: ``Sealer`` turns a card into a signed, encrypted, single-use token."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Final

from cardseal import jws
from cardseal._encoding import b64url_encode, dumps_compact
from cardseal.card import Card
from cardseal.envelope import (
    FORMATS,
    DataKeyReuse,
    EnvelopeSealer,
    kms_direct_context,
    seal_kms_direct,
)
from cardseal.errors import ConfigError
from cardseal.keys.base import KeyProviders
from cardseal.keys.signing import Signer
from cardseal.tokens import DEFAULT_MAX_LIFETIME, MAX_LIFETIME_CAP, TOKEN_TYPE, Payment

_JTI_BYTES: Final = 16  # 128 bits of randomness, as the contract asks
_CLAIMS_JSON: Final = json.JSONEncoder(separators=(",", ":"))


class Sealer:
    """Seals cards into tokens for one issuer and audience.

    Keyword-only and validated at construction. ``lifetime`` is ``exp - iat`` in seconds;
    ``reuse`` bounds how many tokens and seconds one data key serves (``envelope`` only;
    ``kms-direct`` costs one KMS Encrypt per token, as the seed's flow does).
    """

    def __init__(
        self,
        *,
        signer: Signer,
        issuer: str,
        audience: str,
        kms_key: str,
        providers: KeyProviders,
        format: str = "envelope",
        lifetime: int = DEFAULT_MAX_LIFETIME,
        reuse: DataKeyReuse | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if format not in FORMATS:
            raise ConfigError(f"format must be one of {list(FORMATS)}.")
        if not 1 <= lifetime <= MAX_LIFETIME_CAP:
            raise ConfigError(f"Token lifetime must be 1..{MAX_LIFETIME_CAP} seconds.")
        if not issuer or not audience:
            raise ConfigError("The sealer needs an issuer and an audience.")
        self._signer = signer
        self._issuer = issuer
        self._audience = audience
        self._kms_key = kms_key
        self._providers = providers
        self._format = format
        self._lifetime = lifetime
        self._now = now
        self._claims_head = (f'{{"iss":{encode_basestring_ascii(issuer)},'
                             f'"aud":{encode_basestring_ascii(audience)},"iat":')
        self._header_b64 = b64url_encode(
            dumps_compact({"alg": signer.alg, "kid": signer.kid, "typ": TOKEN_TYPE}))
        self._envelope = (
            EnvelopeSealer(providers=providers, key_uri=kms_key, reuse=reuse)
            if format == "envelope"
            else None
        )
        providers.provider_for(kms_key)

    @property
    def format(self) -> str:
        return self._format

    def seal(self, card: Card, *, payment: Payment | None = None) -> str:
        """A compact JWS carrying ``card`` in ``meta_data``. Raises ``KeyProviderError`` when
        the KMS is unavailable; the card itself is validated when the ``Card`` is built."""
        jti = secrets.token_urlsafe(_JTI_BYTES)
        plaintext = card.to_json()
        if self._envelope is not None:
            meta_data = self._envelope.seal(
                plaintext, iss=self._issuer, aud=self._audience, jti=jti
            )
        else:
            meta_data = seal_kms_direct(
                self._providers,
                self._kms_key,
                plaintext,
                kms_direct_context(self._issuer, self._audience, jti),
            )
        iat = int(self._now())
        # The claim set as json.dumps(..., separators=(",", ":")) writes it, the constant head
        # prepared once.
        payment_json = "" if payment is None else (
            ',"payment":' + _CLAIMS_JSON.encode(payment.to_claim()))
        payload = (f'{self._claims_head}{iat},"exp":{iat + self._lifetime},'
                   f'"jti":{encode_basestring_ascii(jti)},'
                   f'"meta_data":{encode_basestring_ascii(meta_data)}{payment_json}}}').encode()
        return jws.encode_compact_b64(self._header_b64, payload, self._signer.sign)
