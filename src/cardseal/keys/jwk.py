"""Public signing keys: JWK (de)serialization through PyJWT, RFC 7638 thumbprints, key sets.

A ``VerificationKey`` is a public key, its ``kid`` and, when the JWK names one, the only
algorithm it may verify. A ``VerificationKeySet`` holds several (rotation: old and new key
published side by side) and is loaded from a JWKS file or document, or from PEM files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from cardseal._encoding import b64url_encode
from cardseal.errors import ConfigError

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

MAX_JWKS_BYTES: Final = 64 * 1024
MAX_JWKS_KEYS: Final = 32
_THUMBPRINT_MEMBERS: Final = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"),
                              "OKP": ("crv", "kty", "x")}


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The public JWK of ``key`` (members ``kty`` and the key's parameters only)."""
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    else:  # pragma: no cover - the type annotation rules it out
        raise ConfigError("Unsupported public key type.")
    return {k: str(v) for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): cardseal's ``kid`` for its own keys."""
    try:
        members = _THUMBPRINT_MEMBERS[jwk["kty"]]
        required = {m: jwk[m] for m in members}
    except KeyError as err:
        raise ConfigError("The JWK lacks the members its thumbprint needs.") from err
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    return b64url_encode(hashlib.sha256(canonical).digest())


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that verifies token signatures.

    ``alg`` is the only algorithm it may verify when set (from the JWK's ``alg``); ``None``
    lets the issuer's allow-list decide among the algorithms of the key's type.
    """

    kid: str
    key: PublicKey
    alg: str | None = None

    @classmethod
    def from_public_key(cls, key: PublicKey, *, alg: str | None = None) -> VerificationKey:
        return cls(kid=thumbprint(public_jwk(key)), key=key, alg=alg)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> VerificationKey:
        """Parse a public JWK. Raises ``ConfigError`` for private keys, symmetric keys, and
        keys whose ``use`` or ``key_ops`` do not allow verification."""
        if not isinstance(jwk, Mapping):
            raise ConfigError("A JWK must be a JSON object.")
        _refuse_secret(jwk)
        if jwk.get("use", "sig") != "sig":
            raise ConfigError("The JWK is not for signatures (use).")
        ops = jwk.get("key_ops")
        if "key_ops" in jwk and (not isinstance(ops, list) or "verify" not in ops):
            raise ConfigError("The JWK may not verify (key_ops).")
        alg = jwk.get("alg")
        if alg is not None and not isinstance(alg, str):
            raise ConfigError("The JWK's alg must be a string.")
        parser: Any = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}.get(
            str(jwk.get("kty"))
        )
        if parser is None:
            raise ConfigError("Unsupported JWK key type.")
        try:
            key = parser.from_jwk(dict(jwk))
        except (InvalidKeyError, ValueError, TypeError, KeyError):
            raise ConfigError("The JWK is not a valid public key.") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                          | ed25519.Ed25519PublicKey):
            raise ConfigError("Unsupported JWK key type.")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ConfigError("The JWK's kid must be a string.")
        return cls(kid=kid if kid is not None else thumbprint(jwk), key=key, alg=alg)

    def to_jwk(self) -> dict[str, str]:
        jwk = public_jwk(self.key)
        jwk["kid"] = self.kid
        jwk["use"] = "sig"
        if self.alg is not None:
            jwk["alg"] = self.alg
        return jwk


def _refuse_secret(jwk: Mapping[str, Any]) -> None:
    if "d" in jwk or "p" in jwk or jwk.get("kty") == "oct":
        raise ConfigError("A verification key set must hold public keys only.")


class KeySource(Protocol):
    """Where an issuer's verification keys come from: a fixed set, or a JWKS URL that
    refreshes (``cardseal.keys.jwks_url.RemoteJwks``)."""

    def get(self, kid: str) -> VerificationKey | None:
        """The key with this ``kid``; a remote source may refetch (rate-limited) first."""

    def __iter__(self) -> Iterator[VerificationKey]:
        """Every key known now (legacy tokens without ``kid`` try each)."""


class VerificationKeySet:
    """Keys by ``kid``; iteration order is the order they were given."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self._keys: dict[str, VerificationKey] = {}
        for key in keys:
            if key.kid in self._keys:
                raise ConfigError(f"Two verification keys share the kid {key.kid!r}.")
            self._keys[key.kid] = key
        if len(self._keys) > MAX_JWKS_KEYS:
            raise ConfigError(f"A key set holds at most {MAX_JWKS_KEYS} keys.")

    def get(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    def __iter__(self) -> Iterator[VerificationKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> VerificationKeySet:
        """Parse a JWKS document. Keys for other uses (encryption) are skipped, as RFC 7517
        lets a set hold them; private or malformed keys make the whole set invalid."""
        keys = document.get("keys") if isinstance(document, Mapping) else None
        if not isinstance(keys, list) or len(keys) > MAX_JWKS_KEYS:
            raise ConfigError(f"A JWKS needs a 'keys' list of at most {MAX_JWKS_KEYS} keys.")
        usable = []
        for jwk in keys:
            if isinstance(jwk, Mapping):
                _refuse_secret(jwk)  # before skipping: a private key of any use spoils the set
                ops = jwk.get("key_ops")
                other_use = isinstance(ops, list) and "verify" not in ops
                if jwk.get("use", "sig") != "sig" or other_use:
                    continue  # a key for other uses; a key_ops that is no list is malformed
            usable.append(VerificationKey.from_jwk(jwk))
        return cls(usable)

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.to_jwk() for key in self]}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VerificationKeySet:
        """Load a JWKS file (``.json``) or a PEM public key file."""
        source = Path(path)
        try:
            data = source.read_bytes()
        except OSError as err:
            raise ConfigError(f"Cannot read verification keys from {str(source)!r}.") from err
        if len(data) > MAX_JWKS_BYTES:
            raise ConfigError(f"{str(source)!r} is larger than {MAX_JWKS_BYTES} bytes.")
        if data.lstrip().startswith(b"-----BEGIN"):
            return cls([VerificationKey.from_public_key(load_public_pem(data))])
        try:
            document = json.loads(data)
        except ValueError as err:
            raise ConfigError(f"{str(source)!r} is neither a JWKS nor a PEM file.") from err
        return cls.from_jwks(document)


def load_public_pem(data: bytes) -> PublicKey:
    """A public key from PEM (a public key, or the public half of a private key)."""
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            key: object = private.public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError("Not a usable PEM key.") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                      | ed25519.Ed25519PublicKey):
        raise ConfigError("Unsupported PEM key type.")
    return key
