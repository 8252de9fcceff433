"""Sealing and opening ``meta_data`` in the contract's two formats (CONTRACT.md section 3).

``envelope`` (default) is a JWE compact serialization, five base64url parts::

    B64(protected) . B64(wrapped data key) . B64(iv) . B64(ciphertext) . B64(tag)

    protected = {"alg": "kms", "enc": "A256GCM", "jti": <token jti>, "kid": <KMS key URI>}
    wrapped   = KMS-encrypted 256-bit data key, under context
                {"purpose": "cardseal/meta_data", "iss": <iss>, "aud": <aud>}
    iv        = 12 random bytes;  tag = 16 bytes
    AES-256-GCM(data key, iv, plaintext = card JSON, aad = ASCII of BASE64URL(protected))

Because the context holds no per-token value, the sealer reuses one data key for a bounded
number of tokens and seconds (``DataKeyReuse``) and the opener caches unwrapped data keys by
(key, wrapped key, context) with a bounded size and lifetime: one KMS call per data key on each
side instead of one per token. The ``jti`` in the protected header binds the ciphertext to its
token, so a ``meta_data`` moved into another token fails.

``kms-direct`` (the seed's format) is the standard base64 of a KMS ciphertext of the card JSON.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Final, Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cardseal._encoding import (
    b64_decode_lenient_alphabet,
    b64url_decode,
    b64url_encode,
    loads_strict,
)
from cardseal.errors import ConfigError, DecryptionError
from cardseal.keys.base import KeyProviders

_K = TypeVar("_K")
_V = TypeVar("_V")

PURPOSE: Final = "cardseal/meta_data"
FORMATS: Final = ("envelope", "kms-direct")

MAX_META_DATA_CHARS: Final = 8 * 1024
_MAX_PROTECTED_BYTES: Final = 512
_MAX_WRAPPED_KEY_BYTES: Final = 1024
_MAX_CIPHERTEXT_BYTES: Final = 2048
_IV_BYTES: Final = 12
_TAG_BYTES: Final = 16
_HEADER_MEMBERS: Final = frozenset({"alg", "enc", "kid", "jti"})
_PROTECTED_HEAD: Final = b'{"alg":"kms","enc":"A256GCM","jti":'
_MAX_WRAPPED_TEXTS: Final = 1024

# Data-key reuse on the sealing side. Defaults: 1,000 tokens or 5 minutes, whichever first:
# KMS cost falls to 1/1,000 per token while one data key never protects more than 1,000 cards
# or outlives the default 300 s token lifetime. Caps: 100,000 uses (far under the 2^32
# random-IV limit of AES-GCM that NIST SP 800-38D sets) and one hour.
DEFAULT_REUSE_MAX_USES: Final = 1000
DEFAULT_REUSE_MAX_AGE: Final = 300.0
MAX_REUSE_USES: Final = 100_000
MAX_REUSE_AGE: Final = 3600.0
# Unwrapped data keys on the opening side.
DEFAULT_CACHE_SIZE: Final = 1024
DEFAULT_CACHE_TTL: Final = 300.0
MAX_CACHE_SIZE: Final = 100_000
MAX_CACHE_TTL: Final = 3600.0


def envelope_context(iss: str, aud: str) -> dict[str, str]:
    return {"purpose": PURPOSE, "iss": iss, "aud": aud}


def kms_direct_context(iss: str, aud: str, jti: str) -> dict[str, str]:
    return {"purpose": PURPOSE, "iss": iss, "aud": aud, "jti": jti}


@dataclass(frozen=True, slots=True)
class DataKeyReuse:
    """How long the sealing side keeps one data key: ``max_uses`` tokens, ``max_age`` s."""

    max_uses: int = DEFAULT_REUSE_MAX_USES
    max_age: float = DEFAULT_REUSE_MAX_AGE

    def __post_init__(self) -> None:
        if not 1 <= self.max_uses <= MAX_REUSE_USES:
            raise ConfigError(f"data key max_uses must be 1..{MAX_REUSE_USES}.")
        if not 0 < self.max_age <= MAX_REUSE_AGE:
            raise ConfigError(f"data key max_age must be in (0, {MAX_REUSE_AGE}] seconds.")


@dataclass(slots=True)
class _LiveDataKey:
    aead: AESGCM = field(repr=False)
    wrapped_b64: str
    born: float
    uses: int = 0


class NeedsRemoteKms(Exception):  # noqa: N818 - a signal, not an error
    """Opening would call a remote KMS, and the caller asked not to (``allow_remote=False``):
    it retries off its event loop. Never raised otherwise; not a contract error.

    ``data_key`` names the data key that was missing (``None`` for ``kms-direct``, where each
    token is its own KMS call): requests that miss the same one at once can wait for the first
    of them to fetch it, then open from the cache."""

    def __init__(self, data_key: Hashable | None = None) -> None:
        super().__init__()
        self.data_key = data_key


class EnvelopeSealer:
    """Seals card JSON into ``envelope`` ``meta_data`` under one KMS key, reusing data keys."""

    def __init__(
        self,
        *,
        providers: KeyProviders,
        key_uri: str,
        reuse: DataKeyReuse | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        providers.provider_for(key_uri)  # fail now, not at the first token
        self._providers = providers
        self._key_uri = key_uri
        self._reuse = reuse or DataKeyReuse()
        self._clock = clock
        self._live: dict[tuple[tuple[str, str], ...], _LiveDataKey] = {}
        self._lock = threading.Lock()
        self._header_head = _PROTECTED_HEAD.decode()
        self._header_tail = _kid_tail(key_uri).decode()

    def _data_key(self, context: Mapping[str, str]) -> _LiveDataKey:
        slot = tuple(sorted(context.items()))
        now = self._clock()
        with self._lock:
            live = self._live.get(slot)
            if (
                live is None
                or live.uses >= self._reuse.max_uses
                or now - live.born >= self._reuse.max_age
            ):
                data_key = self._providers.generate_data_key(self._key_uri, context)
                live = _LiveDataKey(
                    AESGCM(data_key.plaintext), b64url_encode(data_key.wrapped), now)
                self._live[slot] = live
            live.uses += 1
            return live

    def seal(self, plaintext: bytes, *, iss: str, aud: str, jti: str) -> str:
        live = self._data_key(envelope_context(iss, aud))
        # dumps_compact of {"alg": "kms", "enc": "A256GCM", "kid": key_uri, "jti": jti}, with
        # the parts that never change prepared once.
        protected = b64url_encode(
            (self._header_head + encode_basestring(jti) + self._header_tail).encode())
        iv = os.urandom(_IV_BYTES)
        sealed = live.aead.encrypt(iv, plaintext, protected.encode("ascii"))
        return ".".join(
            (
                protected,
                live.wrapped_b64,
                b64url_encode(iv),
                b64url_encode(sealed[:-_TAG_BYTES]),
                b64url_encode(sealed[-_TAG_BYTES:]),
            )
        )


class EnvelopeOpener:
    """Opens ``envelope`` ``meta_data``, caching unwrapped data keys (thread-safe)."""

    def __init__(
        self,
        *,
        providers: KeyProviders,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= cache_size <= MAX_CACHE_SIZE:
            raise ConfigError(f"data key cache size must be 0..{MAX_CACHE_SIZE}.")
        if not 0 < cache_ttl <= MAX_CACHE_TTL:
            raise ConfigError(f"data key cache ttl must be in (0, {MAX_CACHE_TTL}] seconds.")
        self._providers = providers
        self._cache: _TtlCache[tuple[str, bytes, str, str], AESGCM] | None = (
            _TtlCache(cache_size, cache_ttl, clock) if cache_size else None
        )
        self.cache_hits = 0
        self.cache_misses = 0
        self.observers: list[Callable[[bool], None]] = []  # called with hit=True/False
        # Single flight: the requests that miss the same data key at once wait for the one
        # Decrypt the first of them makes, and share its outcome (key or error).
        self._flights: dict[tuple[str, bytes, str, str], Future[AESGCM]] = {}
        self._flights_lock = threading.Lock()
        # Wrapped data keys by their base64url text: tokens of one data key share it, and
        # the canonical decoding makes the text a faithful key. Cleared when full.
        self._wrapped: dict[str, bytes] = {}

    def open(
        self, meta_data: str, *, allowed_keys: Sequence[str], iss: str, aud: str, jti: str,
        allow_remote: bool = True,
    ) -> bytes:
        """Decrypt ``meta_data``; return the card JSON bytes.

        ``allowed_keys`` are canonical key URIs (``KeyProviders.canonical_uri``). Raises
        ``DecryptionError`` (meta_data_malformed, kms_key_not_allowed, decryption_failed) or
        ``KeyProviderError`` (kms_unavailable); with ``allow_remote=False``, ``NeedsRemoteKms``
        instead of calling a remote KMS for a data key the cache does not hold.
        """
        if len(meta_data) > MAX_META_DATA_CHARS:
            raise DecryptionError(code="meta_data_malformed")
        parts = meta_data.split(".")
        if len(parts) != 5:
            raise DecryptionError(code="meta_data_malformed")
        try:
            protected = b64url_decode(parts[0])
            wrapped = self._wrapped.get(parts[1])
            if wrapped is None:
                wrapped = b64url_decode(parts[1])
            iv = b64url_decode(parts[2])
            ciphertext = b64url_decode(parts[3])
            tag = b64url_decode(parts[4])
        except ValueError:
            raise DecryptionError(code="meta_data_malformed") from None
        if (
            not 0 < len(wrapped) <= _MAX_WRAPPED_KEY_BYTES
            or len(iv) != _IV_BYTES
            or len(tag) != _TAG_BYTES
            or len(ciphertext) > _MAX_CIPHERTEXT_BYTES
        ):
            raise DecryptionError(code="meta_data_malformed")
        kid = _canonical_kid(protected, jti, allowed_keys)
        if kid is None:  # not in our own serialization: the strict parser decides
            kid = _parsed_kid(self._providers, protected, jti, allowed_keys, allow_remote)
        aead = self._unwrap(kid, wrapped, iss, aud, allow_remote)
        if len(self._wrapped) >= _MAX_WRAPPED_TEXTS:
            self._wrapped.clear()
        self._wrapped[parts[1]] = wrapped  # decoded and checked: the next token skips that
        try:
            return aead.decrypt(iv, ciphertext + tag, parts[0].encode("ascii"))
        except InvalidTag:
            raise DecryptionError(code="decryption_failed") from None

    def _unwrap(self, kid: str, wrapped: bytes, iss: str, aud: str, allow_remote: bool) -> AESGCM:
        slot = (kid, wrapped, iss, aud)
        aead = self._cache.get(slot) if self._cache is not None else None
        if aead is None and not allow_remote and self._providers.is_remote(kid):
            raise NeedsRemoteKms(slot)  # not counted: the retry counts its lookup
        if self._cache is not None:
            hit = aead is not None
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1
            for observe in self.observers:
                observe(hit)
            if aead is not None:
                return aead
        with self._flights_lock:
            flight = self._flights.get(slot)
            leader = flight is None
            if flight is None:
                flight = self._flights[slot] = Future()
        if not leader:
            return flight.result()  # bounded: the leader's KMS call has its timeouts
        try:
            data_key = self._providers.decrypt(kid, wrapped, envelope_context(iss, aud))
            if len(data_key) != 32:
                raise DecryptionError(code="decryption_failed")
            aead = AESGCM(data_key)
            if self._cache is not None:
                self._cache.put(slot, aead)
        except BaseException as err:
            flight.set_exception(err)
            raise
        else:
            flight.set_result(aead)
            return aead
        finally:
            with self._flights_lock:
                del self._flights[slot]


class _TtlCache(Generic[_K, _V]):
    """A bounded cache whose entries expire ``ttl`` seconds after insertion.

    Lean on purpose: a hit is one dict lookup and a clock read, no lock (a dict read is atomic
    in CPython), where ``cachetools.TTLCache`` under a lock costs about 2 us per hit on the
    open path. Inserts take a lock; a full cache drops expired entries, then the oldest.
    """

    def __init__(self, maxsize: int, ttl: float, clock: Callable[[], float]) -> None:
        self._maxsize = maxsize
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[_K, tuple[_V, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: _K) -> _V | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            now = self._clock()
            entries = self._entries
            entries.pop(key, None)
            if len(entries) >= self._maxsize:
                for stale in [k for k, (_, dies) in entries.items() if dies <= now]:
                    del entries[stale]
                while len(entries) >= self._maxsize:
                    del entries[next(iter(entries))]
            entries[key] = (value, now + self._ttl)

    def __len__(self) -> int:
        return len(self._entries)


# The end of a protected header for each key URI (a handful: the issuers' allowed keys).
_KID_TAILS: dict[str, bytes] = {}
_MAX_KID_TAILS: Final = 256


def _kid_tail(key_uri: str) -> bytes:
    """The end of a protected header naming ``key_uri``, as ``EnvelopeSealer`` writes it."""
    tail = _KID_TAILS.get(key_uri)
    if tail is None:
        if len(_KID_TAILS) >= _MAX_KID_TAILS:
            _KID_TAILS.clear()
        tail = _KID_TAILS[key_uri] = (',"kid":' + encode_basestring(key_uri) + "}").encode()
    return tail


def _canonical_kid(protected: bytes, jti: str, allowed_keys: Sequence[str]) -> str | None:
    """The allowed key ``protected`` names if it is byte for byte the header ``EnvelopeSealer``
    writes for this ``jti`` and that key (``dumps_compact``: sorted keys, no spaces); else
    None, and the strict parser decides (``_parsed_kid``).

    Such bytes, within ``_MAX_PROTECTED_BYTES``, are JSON with exactly the four members,
    ``alg`` kms, ``enc`` A256GCM, this ``jti`` and an allowed ``kid``: what ``_parsed_kid``
    would accept and return. This only spares the parse.
    """
    if len(protected) > _MAX_PROTECTED_BYTES:
        return None
    try:
        head = _PROTECTED_HEAD + encode_basestring(jti).encode()
    except UnicodeEncodeError:  # a lone surrogate: in no header; the parser refuses it
        return None
    if protected.startswith(head):
        tail = protected[len(head):]
        for key_uri in allowed_keys:
            if tail == _kid_tail(key_uri):
                return key_uri
    return None


def _parsed_kid(
    providers: KeyProviders, protected: bytes, jti: str, allowed_keys: Sequence[str],
    allow_remote: bool,
) -> str:
    """The canonical URI of the allowed key a protected header names, by the strict parser;
    ``meta_data_malformed`` for any other header, ``kms_key_not_allowed`` for a key the issuer
    does not allow, ``decryption_failed`` for another token's ``jti`` (and ``NeedsRemoteKms``,
    see ``_allowed``)."""
    try:
        header = loads_strict(protected, max_bytes=_MAX_PROTECTED_BYTES, max_depth=1)
    except ValueError:
        raise DecryptionError(code="meta_data_malformed") from None
    if (
        not isinstance(header, dict)
        or header.keys() != _HEADER_MEMBERS
        or header["alg"] != "kms"
        or header["enc"] != "A256GCM"
        or not isinstance(header["kid"], str)
        or not isinstance(header["jti"], str)
    ):
        raise DecryptionError(code="meta_data_malformed")
    kid = _allowed(providers, header["kid"], allowed_keys, allow_remote)
    if header["jti"] != jti:  # moved from another token
        raise DecryptionError(code="decryption_failed")
    return kid


def _allowed(
    providers: KeyProviders, kid: str, allowed_keys: Sequence[str], allow_remote: bool
) -> str:
    """The canonical URI of ``kid`` if the issuer allows it; else ``kms_key_not_allowed``.

    A ``kid`` that names a key otherwise than the issuer's policy (an AWS alias or key id)
    may take a DescribeKey to resolve: without ``allow_remote`` that raises
    ``NeedsRemoteKms`` instead, so the gateway resolves it off its event loop."""
    if kid in allowed_keys:
        return kid
    try:
        canonical = (providers.canonical_uri(kid) if allow_remote
                     else providers.known_canonical_uri(kid))
    except ConfigError:
        raise DecryptionError(code="kms_key_not_allowed") from None
    if canonical is None:
        raise NeedsRemoteKms
    if canonical not in allowed_keys:
        raise DecryptionError(code="kms_key_not_allowed")
    return canonical


# -- kms-direct -------------------------------------------------------------------------------


def seal_kms_direct(
    providers: KeyProviders, key_uri: str, plaintext: bytes, context: Mapping[str, str] | None
) -> str:
    """One KMS Encrypt of the card JSON; standard base64 of the ciphertext."""
    return base64.b64encode(providers.encrypt(key_uri, plaintext, context)).decode("ascii")


def decode_kms_direct(meta_data: str) -> bytes:
    """The KMS ciphertext inside ``kms-direct`` ``meta_data`` (``meta_data_malformed``)."""
    if len(meta_data) > MAX_META_DATA_CHARS:
        raise DecryptionError(code="meta_data_malformed")
    try:
        blob = b64_decode_lenient_alphabet(meta_data)
    except ValueError:
        raise DecryptionError(code="meta_data_malformed") from None
    if not blob:
        raise DecryptionError(code="meta_data_malformed")
    return blob


def open_kms_direct(
    providers: KeyProviders,
    blob: bytes,
    *,
    allowed_keys: Sequence[str],
    context: Mapping[str, str] | None,
) -> bytes:
    """Decrypt a KMS ciphertext, naming each allowed key in turn.

    ``kms_key_not_allowed`` when every allowed key says the ciphertext is not under it;
    ``decryption_failed`` when the right key refuses it (wrong context, tampering).
    """
    failure: DecryptionError | None = None
    for key_uri in allowed_keys:
        try:
            return providers.decrypt(key_uri, blob, context)
        except DecryptionError as err:
            if err.code != "kms_key_not_allowed":
                failure = err
    if failure is not None:
        raise DecryptionError(code="decryption_failed")
    raise DecryptionError(code="kms_key_not_allowed")
