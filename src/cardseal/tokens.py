"""Card tokens: the claim rules of CONTRACT.md section 3, and ``TokenVerifier.verify``.

Only ``TokenVerifier.verify`` constructs a ``VerifiedToken`` (as Tink's ``VerifiedJwt``), or
its two halves, ``authenticate`` then ``check_claims``, which the gateway runs apart: code
holding one knows the signature, issuer, audience, lifetime and claim types were checked. The
token's single use is the gateway's job (``VerifiedToken.replay_key``).

Verification order: size and shape, claims parsed (not trusted) to find the issuer's policy,
algorithm allow-list, ``typ`` and ``crit``, the key by ``kid``, the signature, then the claims.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cardseal import jws
from cardseal._currencies import CURRENCIES
from cardseal._encoding import loads_strict
from cardseal.envelope import FORMATS, decode_kms_direct
from cardseal.errors import ConfigError, DecryptionError, TokenError
from cardseal.keys.jwk import KeySource, VerificationKey

TOKEN_TYPE: Final = "card+jwt"  # noqa: S105 - a media type, not a secret
DEFAULT_LEEWAY: Final = 30
MAX_LEEWAY: Final = 120
DEFAULT_MAX_LIFETIME: Final = 300
MAX_LIFETIME_CAP: Final = 3600
MIN_JTI_CHARS: Final = 16  # 128 bits as base64url is 22 characters; a UUID is 36
MAX_JTI_CHARS: Final = 255
MAX_REFERENCE_CHARS: Final = 255
_MAX_NUMERIC_DATE: Final = 2**53
_TYPES_NON_LEGACY: Final = frozenset({"card+jwt", "application/card+jwt"})
_TYPES_LEGACY: Final = _TYPES_NON_LEGACY | {"jwt", "application/jwt"}
# C0 and C1 controls, DEL, surrogates: PostgreSQL text holds no NUL, no encoder a lone surrogate,
# and a line break or terminal escape in a stored reference forges report and log lines.
_UNSTORABLE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def valid_reference(value: object) -> bool:
    """True for a payment ``reference`` the ledger may store: a string of at most
    ``MAX_REFERENCE_CHARS`` characters, none of them a control character or a surrogate."""
    return (isinstance(value, str) and len(value) <= MAX_REFERENCE_CHARS
            and _UNSTORABLE.search(value) is None)


@dataclass(frozen=True, slots=True)
class Payment:
    """The optional ``payment`` claim: exactly what the gateway must charge."""

    amount: int
    currency: str
    reference: str | None = None

    def __post_init__(self) -> None:
        if (
            type(self.amount) is not int
            or not 0 < self.amount <= 10**12
            or not isinstance(self.currency, str)  # a list or object is unhashable
            or self.currency not in CURRENCIES
            or (self.reference is not None and not valid_reference(self.reference))
        ):
            raise ValueError("invalid payment")

    @classmethod
    def from_claim(cls, value: object) -> Payment:
        if not isinstance(value, dict) or not value.keys() <= {"amount", "currency", "reference"}:
            raise ValueError("invalid payment")
        return cls(value.get("amount"), value.get("currency"), value.get("reference"))  # type: ignore[arg-type]

    def to_claim(self) -> dict[str, Any]:
        claim: dict[str, Any] = {"amount": self.amount, "currency": self.currency}
        if self.reference is not None:
            claim["reference"] = self.reference
        return claim


@dataclass(frozen=True, kw_only=True)
class IssuerPolicy:
    """What the gateway trusts from one issuer (one ``[[issuers]]`` table).

    ``allowed_kms_keys`` are the KMS key URIs whose ciphertexts this issuer may send;
    ``legacy`` admits the seed's tokens (``typ`` JWT or none, no ``kid``, no ``jti``,
    ``kms-direct`` without encryption context).
    """

    iss: str
    audience: str
    keys: KeySource
    allowed_kms_keys: tuple[str, ...]
    algorithms: frozenset[str] = frozenset({"RS256"})
    formats: frozenset[str] = frozenset({"envelope"})
    max_lifetime: int = DEFAULT_MAX_LIFETIME
    legacy: bool = False

    def __post_init__(self) -> None:
        if not self.iss or not self.audience:
            raise ConfigError("An issuer needs a non-empty iss and audience.")
        if not self.algorithms or not self.algorithms <= jws.ALGORITHMS:
            raise ConfigError(f"Issuer {self.iss!r}: algorithms must be among "
                              f"{sorted(jws.ALGORITHMS)}.")
        if not self.formats or not self.formats <= set(FORMATS):
            raise ConfigError(f"Issuer {self.iss!r}: formats must be among {list(FORMATS)}.")
        if not 1 <= self.max_lifetime <= MAX_LIFETIME_CAP:
            raise ConfigError(f"Issuer {self.iss!r}: max_lifetime must be 1..{MAX_LIFETIME_CAP}.")
        if not self.allowed_kms_keys:
            raise ConfigError(f"Issuer {self.iss!r}: allow at least one KMS key.")


_SEAL: Final = object()


class SignedToken:
    """A token whose signature was checked and whose claims were not: only
    ``TokenVerifier.authenticate`` makes one, and only ``check_claims`` turns it into a
    ``VerifiedToken``."""

    __slots__ = ("claims", "header", "issuer")

    def __init__(self, _seal: object, header: Mapping[str, Any], claims: dict[str, Any],
                 issuer: IssuerPolicy, /) -> None:
        if _seal is not _SEAL:
            raise TypeError("SignedToken is made by TokenVerifier.authenticate only")
        self.header = header
        self.claims = claims
        self.issuer = issuer

    def __repr__(self) -> str:
        return f"SignedToken(iss={self.issuer.iss!r})"


class VerifiedToken:
    """A token whose signature and claims were checked. Only ``verify()`` (or
    ``check_claims()`` on a ``SignedToken``) makes one."""

    __slots__ = ("claims", "header", "issuer", "meta_data_format", "payment", "replay_key")

    def __init__(  # positional: one is made per token, keywords cost a tenth of a microsecond
        self,
        _seal: object,
        header: Mapping[str, Any],
        claims: dict[str, Any],
        issuer: IssuerPolicy,
        meta_data_format: str,
        payment: Payment | None,
        replay_key: str,
        /,
    ) -> None:
        if _seal is not _SEAL:
            raise TypeError("VerifiedToken is made by TokenVerifier.verify only")
        self.header = header
        self.claims = claims
        self.issuer = issuer
        self.meta_data_format = meta_data_format
        self.payment = payment
        self.replay_key = replay_key

    @property
    def jti(self) -> str | None:
        jti = self.claims.get("jti")
        return jti if isinstance(jti, str) else None

    @property
    def meta_data(self) -> str:
        value: str = self.claims["meta_data"]
        return value

    @property
    def exp(self) -> int:
        value: int = self.claims["exp"]
        return value

    def public_claims(self) -> dict[str, Any]:
        """The claims without ``meta_data`` (safe to print or log)."""
        return {k: v for k, v in self.claims.items() if k != "meta_data"}

    def __repr__(self) -> str:
        return f"VerifiedToken(iss={self.issuer.iss!r}, format={self.meta_data_format!r})"


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    """The claim as an integer NumericDate; None when an optional one is absent. A present
    ``null`` is no date: missing where the claim is required, malformed where it is not."""
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError(f"The {name} claim is required.", code="token_claim_missing")
        if name in claims:
            raise TokenError(f"The {name} claim must be an integer NumericDate.")
        return None
    if type(value) is not int or not 0 <= value < _MAX_NUMERIC_DATE:
        raise TokenError(f"The {name} claim must be an integer NumericDate.")
    return value


def replay_key_of(jti: object, meta_data: str) -> str:
    """What makes a token single-use: its ``jti``; for a legacy ``kms-direct`` token without
    one, the hash of its ciphertext (random, so unique). ``DecryptionError`` when neither."""
    if isinstance(jti, str):
        return jti
    return "ct:" + hashlib.sha256(decode_kms_direct(meta_data)).hexdigest()


class TokenVerifier:
    """Verifies card tokens against the trusted issuers' policies."""

    def __init__(
        self,
        *,
        issuers: Iterable[IssuerPolicy],
        leeway: int = DEFAULT_LEEWAY,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ConfigError(f"Clock leeway must be 0..{MAX_LEEWAY} seconds.")
        self._issuers: dict[str, IssuerPolicy] = {}
        for policy in issuers:
            if policy.iss in self._issuers:
                raise ConfigError(f"Issuer {policy.iss!r} is configured twice.")
            self._issuers[policy.iss] = policy
        if not self._issuers:
            raise ConfigError("No issuers are configured.")
        self._leeway = leeway
        self._now = now

    @property
    def leeway(self) -> int:
        return self._leeway

    def verify(self, token: str | bytes) -> VerifiedToken:
        """Verify ``token``; raise ``TokenError`` (or ``DecryptionError`` for a ``meta_data``
        in a format the issuer does not accept) with the contract code."""
        parsed, claims, policy = self._authenticate(token)
        return self._check_claims(parsed.header, claims, policy)

    def authenticate(self, token: str | bytes) -> SignedToken:
        """``verify``'s first half: the token's header, key and signature checked, its claims
        not yet (``TokenError`` otherwise). An expired token still names who signed it, which
        is what scopes an ``Idempotency-Key``; ``check_claims`` finishes the verification."""
        parsed, claims, policy = self._authenticate(token)
        return SignedToken(_SEAL, parsed.header, claims, policy)

    def check_claims(self, signed: SignedToken) -> VerifiedToken:
        """``verify``'s second half, on what ``authenticate`` returned: the claims."""
        return self._check_claims(signed.header, signed.claims, signed.issuer)

    def _authenticate(
        self, token: str | bytes
    ) -> tuple[jws.ParsedJws, dict[str, Any], IssuerPolicy]:
        parsed = jws.parse_compact(token)
        try:
            claims = loads_strict(parsed.payload, max_bytes=jws.MAX_PAYLOAD_BYTES, max_depth=4)
        except ValueError:
            raise TokenError() from None
        if not isinstance(claims, dict):
            raise TokenError()
        iss = claims.get("iss")
        if iss is None:
            raise TokenError("The iss claim is required.", code="token_claim_missing")
        policy = self._issuers.get(iss) if isinstance(iss, str) else None
        if policy is None:
            raise TokenError(code="token_issuer_invalid")
        self._check_header(parsed.header, policy)
        if self._select_key(parsed, policy) is None:
            raise TokenError(code="token_signature_invalid")
        return parsed, claims, policy

    def _check_header(self, header: Mapping[str, Any], policy: IssuerPolicy) -> None:
        if header["alg"] not in policy.algorithms:
            raise TokenError(code="token_algorithm_not_allowed")
        if "crit" in header or "b64" in header:
            raise TokenError("The token uses a JWS extension cardseal does not accept.")
        typ = header.get("typ")
        if typ is None:
            if not policy.legacy:
                raise TokenError(code="token_type_invalid")
        elif not isinstance(typ, str) or typ.lower() not in (
            _TYPES_LEGACY if policy.legacy else _TYPES_NON_LEGACY
        ):
            raise TokenError(code="token_type_invalid")

    def _select_key(self, parsed: jws.ParsedJws, policy: IssuerPolicy) -> VerificationKey | None:
        """The key that verifies the signature, or None (``token_signature_invalid``)."""
        alg: str = parsed.header["alg"]
        kid = parsed.header.get("kid")
        if kid is not None:
            key: VerificationKey | None = policy.keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise TokenError(code="token_key_unknown")
            if (key.alg is not None and key.alg != alg) or not jws.key_supports(key.key, alg):
                raise TokenError(code="token_algorithm_not_allowed")
            return key if jws.verify_signature(parsed, key.key, alg) else None
        if not policy.legacy:
            raise TokenError("The token names no kid.", code="token_key_unknown")
        for key in policy.keys:
            if (key.alg in (None, alg) and jws.key_supports(key.key, alg)
                    and jws.verify_signature(parsed, key.key, alg)):
                return key
        return None

    def _check_claims(
        self, header: Mapping[str, Any], claims: dict[str, Any], policy: IssuerPolicy
    ) -> VerifiedToken:
        aud = claims.get("aud")
        if aud is None:
            raise TokenError("The aud claim is required.", code="token_claim_missing")
        if aud != policy.audience and aud != [policy.audience]:
            raise TokenError(code="token_audience_invalid")
        exp = claims.get("exp")
        iat = claims.get("iat")
        if not (type(exp) is type(iat) is int and 0 <= exp < _MAX_NUMERIC_DATE
                and 0 <= iat < _MAX_NUMERIC_DATE):  # the usual case checked in one go
            exp = _numeric_date(claims, "exp", required=True) or 0
            iat = _numeric_date(claims, "iat", required=True) or 0
        nbf = _numeric_date(claims, "nbf", required=False) if "nbf" in claims else None
        now = self._now()
        if exp <= now - self._leeway:
            raise TokenError(code="token_expired")
        if iat > now + self._leeway or (nbf is not None and nbf > now + self._leeway):
            raise TokenError(code="token_not_yet_valid")
        if exp <= iat:
            raise TokenError("The token expires before it was issued.")
        if exp - iat > policy.max_lifetime:
            raise TokenError(code="token_lifetime_too_long")
        jti = claims.get("jti")
        if jti is None and not policy.legacy:
            raise TokenError("The jti claim is required.", code="token_claim_missing")
        if jti is not None and (
            not isinstance(jti, str) or not MIN_JTI_CHARS <= len(jti) <= MAX_JTI_CHARS
            or not jti.isascii() or not jti.isprintable()
        ):
            raise TokenError("The jti claim must be 16-255 printable ASCII characters.")
        meta_data = claims.get("meta_data")
        if meta_data is None:
            raise TokenError("The meta_data claim is required.", code="token_claim_missing")
        if not isinstance(meta_data, str):
            raise DecryptionError(code="meta_data_malformed")
        fmt = "envelope" if meta_data.count(".") == 4 else "kms-direct"
        if fmt not in policy.formats:
            raise DecryptionError(code="meta_data_malformed")
        payment = None
        if "payment" in claims:
            try:
                payment = Payment.from_claim(claims["payment"])
            except ValueError:
                raise TokenError("The payment claim is invalid.") from None
        if not isinstance(jti, str) and fmt == "envelope":
            raise TokenError("The jti claim is required.", code="token_claim_missing")
        replay_key = replay_key_of(jti, meta_data)
        return VerifiedToken(_SEAL, header, claims, policy, fmt, payment, replay_key)

