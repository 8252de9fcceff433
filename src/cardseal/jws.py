"""Compact JWS (RFC 7515) signing and verification, directly on ``cryptography``.

This is the token hot path. PyJWT's decode costs 3.4x the bare RSA verify on a token this
size; this module keeps the per-token work to one strict split, three base64url decodes, two
bounded JSON parses and the signature check. The Wycheproof JWS vectors and the security suite
(tests/vectors, tests/security) hold it to the RFCs; PyJWT still serves for JWK handling.

Accepted algorithms: RS256/384/512, PS256/384/512 (salt length = hash length), ES256/384/512
(IEEE P1363 ``r || s`` of exactly twice the coordinate size), EdDSA (Ed25519). Never HS*,
never ``none``: a verifier here only ever holds public keys. RSA keys under 2048 bits or with
the ROCA fingerprint (CVE-2017-15361) verify nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cardseal._encoding import b64url_decode, b64url_encode, dumps_compact, loads_strict
from cardseal.errors import TokenError
from cardseal.keys.jwk import PublicKey

MAX_TOKEN_BYTES: Final = 16 * 1024
MAX_HEADER_BYTES: Final = 1024
MAX_PAYLOAD_BYTES: Final = 12 * 1024

_HASHES: Final[dict[str, hashes.HashAlgorithm]] = {
    "256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()
}
_EC_CURVES: Final = {"ES256": ("secp256r1", 32), "ES384": ("secp384r1", 48),
                     "ES512": ("secp521r1", 66)}
ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MIN_RSA_BITS: Final = 2048

# ROCA (CVE-2017-15361): an Infineon-generated modulus is, modulo each of these small primes, in
# the subgroup that 65537 generates. Bit r of a mask is set when r is in that subgroup. A random
# modulus passes every test with probability about 2^-28 (the ROCA authors' own fingerprint).
_ROCA_PRIMES: Final = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71,
                       73, 79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149,
                       151, 157, 163, 167)
_ROCA_MASKS: Final = tuple(
    sum(1 << r for r in {pow(65537, k, p) for k in range(p)}) for p in _ROCA_PRIMES
)


def _rsa_modulus_weak(n: int) -> bool:
    """True for a modulus under ``MIN_RSA_BITS`` or with the ROCA fingerprint."""
    if n.bit_length() < MIN_RSA_BITS:
        return True
    return all((1 << (n % p)) & mask for p, mask in zip(_ROCA_PRIMES, _ROCA_MASKS, strict=True))


# RSA key objects already found strong, by id, with their signature length; the entry holds
# the object itself, so that its id cannot be reused by another key while the entry lives
# (checked with ``is``).
_STRONG_RSA_KEYS: dict[int, tuple[rsa.RSAPublicKey, int]] = {}
_MAX_STRONG_RSA_KEYS: Final = 256


def _check_rsa_key(key: PublicKey, signature: bytes) -> rsa.RSAPublicKey:
    """``key`` when it may verify an RSA signature of this length; else ``InvalidSignature``."""
    entry = _STRONG_RSA_KEYS.get(id(key))
    if entry is None or entry[0] is not key:  # first sight: type, size and ROCA checks
        if not isinstance(key, rsa.RSAPublicKey) or _rsa_modulus_weak(key.public_numbers().n):
            raise InvalidSignature
        if len(_STRONG_RSA_KEYS) >= _MAX_STRONG_RSA_KEYS:
            _STRONG_RSA_KEYS.clear()
        entry = _STRONG_RSA_KEYS[id(key)] = (key, (key.key_size + 7) // 8)
    if len(signature) != entry[1]:
        raise InvalidSignature
    return entry[0]


def _verify_rsa_pkcs1(alg: str) -> Callable[[PublicKey, bytes, bytes], None]:
    pad = padding.PKCS1v15()
    digest = _HASHES[alg[2:]]

    def verify(key: PublicKey, signature: bytes, data: bytes) -> None:
        _check_rsa_key(key, signature).verify(signature, data, pad, digest)

    return verify


def _verify_rsa_pss(alg: str) -> Callable[[PublicKey, bytes, bytes], None]:
    digest = _HASHES[alg[2:]]
    pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)

    def verify(key: PublicKey, signature: bytes, data: bytes) -> None:
        _check_rsa_key(key, signature).verify(signature, data, pad, digest)

    return verify


def _verify_ecdsa(alg: str) -> Callable[[PublicKey, bytes, bytes], None]:
    curve_name, size = _EC_CURVES[alg]
    scheme = ec.ECDSA(_HASHES[alg[2:]])

    def verify(key: PublicKey, signature: bytes, data: bytes) -> None:
        if (
            not isinstance(key, ec.EllipticCurvePublicKey)
            or key.curve.name != curve_name
            or len(signature) != 2 * size
        ):
            raise InvalidSignature
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        if r == 0 or s == 0:  # CVE-2022-21449; OpenSSL refuses too, this says it plainly
            raise InvalidSignature
        key.verify(encode_dss_signature(r, s), data, scheme)

    return verify


def _verify_eddsa(key: PublicKey, signature: bytes, data: bytes) -> None:
    if not isinstance(key, ed25519.Ed25519PublicKey) or len(signature) != 64:
        raise InvalidSignature
    key.verify(signature, data)


_VERIFIERS: Final[dict[str, Callable[[PublicKey, bytes, bytes], None]]] = {
    **{a: _verify_rsa_pkcs1(a) for a in ("RS256", "RS384", "RS512")},
    **{a: _verify_rsa_pss(a) for a in ("PS256", "PS384", "PS512")},
    **{a: _verify_ecdsa(a) for a in ("ES256", "ES384", "ES512")},
    "EdDSA": _verify_eddsa,
}


def _key_kind(key: PublicKey) -> str:
    """ "RSA", the curve name of an EC key, "Ed25519", or "" for anything else."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return ""


# The algorithms each kind of key takes.
_ALGS_BY_KIND: Final = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "Ed25519": frozenset({"EdDSA"}),
    **{curve: frozenset({alg}) for alg, (curve, _) in _EC_CURVES.items()},
}
# Key classes are few; remembering each one's algorithms saves the ABC ``isinstance`` checks
# (about 1 us each) on every token. Keyed by (class, curve) since an EC class covers all curves.
_ALGS_BY_CLASS: dict[tuple[type, str], frozenset[str]] = {}


def key_supports(key: PublicKey, alg: str) -> bool:
    """True when ``alg`` is an algorithm of ``key``'s type (and curve)."""
    curve = getattr(getattr(key, "curve", None), "name", "")
    algs = _ALGS_BY_CLASS.get((type(key), curve))
    if algs is None:
        algs = _ALGS_BY_KIND.get(_key_kind(key), frozenset())
        _ALGS_BY_CLASS[(type(key), curve)] = algs
    return alg in algs


class ParsedJws(NamedTuple):
    """A compact JWS split and decoded, its signature NOT yet verified. (A named tuple: built
    once per token, it costs a third of a frozen dataclass.)"""

    header: Mapping[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


# Parsed protected headers by their base64url text. One issuer's tokens share one header, so a
# small cache saves a decode and a JSON parse per token; the values are read-only mappings.
_HEADERS: dict[str, Mapping[str, Any]] = {}
_MAX_CACHED_HEADERS: Final = 256


def _parse_header(header_b64: str) -> Mapping[str, Any]:
    """The protected header: a JSON object with a string ``alg`` (``ValueError`` otherwise)."""
    header = _HEADERS.get(header_b64)
    if header is None:
        value = loads_strict(b64url_decode(header_b64), max_bytes=MAX_HEADER_BYTES, max_depth=2)
        if not isinstance(value, dict) or not isinstance(value.get("alg"), str):
            raise ValueError("not a JWS header")
        header = MappingProxyType(value)
        if len(_HEADERS) >= _MAX_CACHED_HEADERS:
            _HEADERS.clear()
        _HEADERS[header_b64] = header
    return header


def parse_compact(token: str | bytes, *, max_bytes: int = MAX_TOKEN_BYTES) -> ParsedJws:
    """Split and decode a compact JWS strictly; raise ``TokenError`` (token_malformed).

    Checks, in order: size cap, ASCII, exactly three parts, canonical unpadded base64url in
    each, a header that is a JSON object of at most ``MAX_HEADER_BYTES`` with a string ``alg``.
    An empty signature parses (an unsecured JWS, ``alg: none``), so that the caller's algorithm
    allow-list names the refusal; no algorithm here verifies an empty signature.
    """
    if isinstance(token, bytes):
        if len(token) > max_bytes:
            raise TokenError("The token is too large.")
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError() from None
    if len(token) > max_bytes:
        raise TokenError("The token is too large.")
    first = token.find(".")
    second = token.find(".", first + 1)
    if first <= 0 or second < 0 or token.find(".", second + 1) >= 0:  # three parts, a header
        raise TokenError()
    try:
        header = _parse_header(token[:first])
        payload = b64url_decode(token[first + 1:second])
        signature = b64url_decode(token[second + 1:])
    except ValueError:
        raise TokenError() from None
    return ParsedJws(header, payload, token[:second].encode("ascii"), signature)


def verify_signature(parsed: ParsedJws, key: PublicKey, alg: str) -> bool:
    """True when ``parsed`` carries a valid ``alg`` signature by ``key``.

    ``alg`` must already be checked against the caller's allow-list; an algorithm this module
    does not implement, or one that does not fit the key, is simply False.
    """
    verify = _VERIFIERS.get(alg)
    if verify is None:
        return False
    try:
        verify(key, parsed.signature, parsed.signing_input)
    except (InvalidSignature, ValueError):
        return False
    return True


def encode_compact(
    header: dict[str, Any], payload: bytes, sign: Callable[[bytes], bytes]
) -> str:
    """Build a compact JWS: ``sign`` gets the ASCII signing input, returns the JOSE signature."""
    return encode_compact_b64(b64url_encode(dumps_compact(header)), payload, sign)


def encode_compact_b64(
    header_b64: str, payload: bytes, sign: Callable[[bytes], bytes]
) -> str:
    """``encode_compact`` with the header already encoded (a sealer's header never changes)."""
    signing_input = header_b64 + "." + b64url_encode(payload)
    return signing_input + "." + b64url_encode(sign(signing_input.encode("ascii")))
