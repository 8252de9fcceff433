"""One error hierarchy; every error carries a stable contract code.

The HTTP status and the CLI exit code of every code live in one table (``_CODES``) so that the
gateway and the CLI cannot disagree. Messages are fixed per code unless a caller passes one, and no
caller ever puts request data, card data, tokens or keys in a message: foreign errors are chained
with ``raise ... from err`` for the server log only.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class _CodeInfo(NamedTuple):
    http_status: int
    exit_code: int
    message: str


# code -> (HTTP status, CLI exit code, default message). CONTRACT.md sections 4 and 5.
_CODES: Final[dict[str, _CodeInfo]] = {
    "request_invalid": _CodeInfo(400, 2, "The request is invalid."),
    "request_too_large": _CodeInfo(413, 2, "The request body is too large."),
    "config_invalid": _CodeInfo(500, 2, "The configuration is invalid."),
    "token_malformed": _CodeInfo(401, 3, "The token is malformed."),
    "token_algorithm_not_allowed": _CodeInfo(401, 3, "The token's algorithm is not allowed."),
    "token_signature_invalid": _CodeInfo(401, 3, "The token's signature is invalid."),
    "token_key_unknown": _CodeInfo(401, 3, "The token's signing key is unknown."),
    "token_expired": _CodeInfo(401, 3, "The token has expired."),
    "token_not_yet_valid": _CodeInfo(401, 3, "The token is not yet valid."),
    "token_lifetime_too_long": _CodeInfo(401, 3, "The token's lifetime is too long."),
    "token_issuer_invalid": _CodeInfo(401, 3, "The token's issuer is not trusted."),
    "token_audience_invalid": _CodeInfo(401, 3, "The token's audience is invalid."),
    "token_claim_missing": _CodeInfo(401, 3, "A required claim is missing."),
    "token_type_invalid": _CodeInfo(401, 3, "The token's type is invalid."),
    "token_replayed": _CodeInfo(409, 3, "The token has already been used."),
    "meta_data_malformed": _CodeInfo(400, 5, "The meta_data claim is malformed."),
    "decryption_failed": _CodeInfo(400, 5, "The card data could not be decrypted."),
    "kms_key_not_allowed": _CodeInfo(400, 5, "The card data is under a key not allowed."),
    "kms_unavailable": _CodeInfo(503, 5, "The key management service is unavailable."),
    "amount_mismatch": _CodeInfo(400, 2, "The amount or currency does not match the token."),
    "card_number_invalid": _CodeInfo(422, 4, "The card number is invalid."),
    "card_expired": _CodeInfo(422, 4, "The card has expired."),
    "card_cvv_invalid": _CodeInfo(422, 4, "The card verification code is invalid."),
    "card_brand_unsupported": _CodeInfo(422, 4, "The card brand is not supported."),
    "payment_declined": _CodeInfo(402, 6, "The payment was declined."),
    "idempotency_conflict": _CodeInfo(409, 2, "The idempotency key was used with another request."),
    "unauthorized": _CodeInfo(401, 2, "Authentication is required."),
    "not_found": _CodeInfo(404, 2, "Not found."),
    "processor_unavailable": _CodeInfo(503, 7, "The payment processor is unavailable."),
    "storage_unavailable": _CodeInfo(503, 7, "The payment store is unavailable."),
}

ALL_CODES: Final[frozenset[str]] = frozenset(_CODES)


class CardsealError(Exception):
    """Base of every error cardseal raises on purpose.

    ``code`` is the contract's error code; ``http_status`` and ``exit_code`` derive from it.
    """

    code: str = "request_invalid"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        if code is not None:
            if code not in _CODES:
                raise ValueError(f"unknown error code {code!r}")
            self.code = code
        self.message = message if message is not None else _CODES[self.code].message
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        return _CODES[self.code].http_status

    @property
    def exit_code(self) -> int:
        return _CODES[self.code].exit_code

    def to_dict(self) -> dict[str, object]:
        """The contract's error body: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r})"


class RequestError(CardsealError):
    code = "request_invalid"


class ConfigError(CardsealError):
    code = "config_invalid"


class TokenError(CardsealError):
    code = "token_malformed"


class DecryptionError(CardsealError):
    """``meta_data_malformed``, ``decryption_failed`` or ``kms_key_not_allowed``."""

    code = "decryption_failed"


class KeyProviderError(CardsealError):
    """The KMS could not be reached or refused for a reason that retrying may cure."""

    code = "kms_unavailable"


class CardError(CardsealError):
    code = "card_number_invalid"


class PaymentError(CardsealError):
    code = "payment_declined"


class ProcessorError(CardsealError):
    code = "processor_unavailable"


class StorageError(CardsealError):
    code = "storage_unavailable"


class NothingSentError(StorageError):
    """``storage_unavailable`` before anything reached the database (no connection could be
    had): there is no answer that was lost, nothing to look for and nothing to undo."""


def http_status_for(code: str) -> int:
    return _CODES[code].http_status


def exit_code_for(code: str) -> int:
    return _CODES[code].exit_code
