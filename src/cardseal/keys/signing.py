"""Token signers: the ``Signer`` interface and ``PemSigner`` (a private key from a PEM file).

A signer knows its JOSE ``alg``, its ``kid`` (the RFC 7638 thumbprint of its public key) and
returns JOSE-form signatures (RSA bytes, ECDSA ``r || s``, Ed25519 bytes). The AWS KMS signer
(private key held by KMS) implements the same interface.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cardseal.errors import ConfigError
from cardseal.keys.jwk import PublicKey, VerificationKey, public_jwk, thumbprint

SIGNING_ALGORITHMS: Final = frozenset({"RS256", "PS256", "ES256", "EdDSA"})
_MIN_RSA_BITS: Final = 2048


class Signer(ABC):
    """Signs JWS signing inputs. ``alg`` and ``kid`` go into every token header."""

    alg: str
    kid: str

    @abstractmethod
    def sign(self, signing_input: bytes) -> bytes:
        """The JOSE signature of ``signing_input``."""

    @property
    @abstractmethod
    def public_key(self) -> PublicKey: ...

    def verification_key(self) -> VerificationKey:
        return VerificationKey(kid=self.kid, key=self.public_key, alg=self.alg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alg={self.alg!r}, kid={self.kid!r})"


def default_alg_for(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ConfigError("Signing keys are RSA (2048+ bits), EC P-256 or Ed25519.")


def check_alg_fits(key: PublicKey, alg: str) -> None:
    """Raise ``ConfigError`` unless ``alg`` is a signing algorithm for ``key``."""
    if alg not in SIGNING_ALGORITHMS:
        raise ConfigError(f"Signing algorithm must be one of {sorted(SIGNING_ALGORITHMS)}.")
    ok = (
        (alg in ("RS256", "PS256") and isinstance(key, rsa.RSAPublicKey)
         and key.key_size >= _MIN_RSA_BITS)
        or (alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey)
            and key.curve.name == "secp256r1")
        or (alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey))
    )
    if not ok:
        raise ConfigError(f"The signing key does not fit {alg}.")


def _sign_function(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, alg: str
) -> Callable[[bytes], bytes]:
    """The JOSE signing function of ``key`` for ``alg``, chosen once (not per token)."""
    sha256 = hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey):
        rsa_key = key
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(sha256), salt_length=32) if alg == "PS256"
            else padding.PKCS1v15())
        return lambda data: rsa_key.sign(data, pad, sha256)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ec_key, ecdsa = key, ec.ECDSA(sha256)

        def sign_ec(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_key.sign(data, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign_ec
    return key.sign


class PemSigner(Signer):
    """A private key loaded once (parsing a PEM per token is what makes the seed slow)."""

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
        *,
        alg: str | None = None,
    ) -> None:
        public = private_key.public_key()
        self.alg = alg if alg is not None else default_alg_for(public)
        check_alg_fits(public, self.alg)
        self._key = private_key
        self._public = public
        self.kid = thumbprint(public_jwk(public))
        self._sign = _sign_function(private_key, self.alg)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, alg: str | None = None) -> PemSigner:
        try:
            data = Path(path).read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"Cannot load the signing key {str(path)!r}.") from err
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                          | ed25519.Ed25519PrivateKey):
            raise ConfigError("Signing keys are RSA, EC P-256 or Ed25519.")
        return cls(key, alg=alg)

    @property
    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, signing_input: bytes) -> bytes:
        return self._sign(signing_input)


def generate_private_key_pem(alg: str = "RS256") -> bytes:
    """A new private key for ``alg`` as unencrypted PKCS#8 PEM (for ``cardseal init``)."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if alg in ("RS256", "PS256"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError(f"Signing algorithm must be one of {sorted(SIGNING_ALGORITHMS)}.")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
