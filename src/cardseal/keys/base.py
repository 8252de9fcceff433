"""The key-provider interface (a KMS seen from cardseal) and the registry by URI scheme.

A provider implements the three KMS operations cardseal needs, always naming the key:
``encrypt``, ``decrypt`` and ``generate_data_key``, each with an optional encryption context
that the provider binds to the ciphertext (AWS KMS: EncryptionContext; local: AES-GCM AAD).

Errors every provider raises, and nothing else:
- ``DecryptionError("kms_key_not_allowed")``: the ciphertext is under another key than the one
  named (AWS ``IncorrectKeyException``); nothing was decrypted.
- ``DecryptionError("decryption_failed")``: wrong context, tampered or foreign ciphertext, a
  disabled or inaccessible key. One message for all of them.
- ``KeyProviderError("kms_unavailable")``: the KMS could not be reached in time; retry later.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from cardseal.errors import ConfigError

EncryptionContext = Mapping[str, str]


@dataclass(frozen=True, slots=True, repr=False)
class DataKey:
    """A fresh 256-bit data key and the same key wrapped by the KMS key."""

    plaintext: bytes
    wrapped: bytes

    def __repr__(self) -> str:
        return "DataKey(<redacted>)"


class KeyProvider(ABC):
    """A KMS. Subclasses set ``scheme`` (the URI scheme they serve, e.g. ``"local"``)."""

    scheme: ClassVar[str]
    remote: ClassVar[bool] = False
    """Whether a call leaves the process (a network KMS): the gateway then makes it off its
    event loop. A provider holding its keys in memory keeps False."""

    def canonical_uri(self, key_uri: str) -> str:
        """The one name of the key behind ``key_uri`` (AWS resolves aliases and ids to ARNs).

        Two URIs naming the same key have the same canonical URI.
        """
        return key_uri

    def known_canonical_uri(self, key_uri: str) -> str | None:
        """``canonical_uri`` where it needs no call to a remote KMS; None where it does (the
        caller then resolves the name off its event loop)."""
        return None if self.remote else self.canonical_uri(key_uri)

    def check(self, key_uri: str) -> None:
        """Raise ``KeyProviderError`` (kms_unavailable) unless the KMS answers for ``key_uri``
        now: one cheap call that decrypts nothing, for readiness probes.

        The default resolves the key, which is enough for a provider that holds its keys in
        memory; a remote KMS overrides it with a round trip.
        """
        self.canonical_uri(key_uri)

    @abstractmethod
    def encrypt(
        self, key_uri: str, plaintext: bytes, context: EncryptionContext | None
    ) -> bytes: ...

    @abstractmethod
    def decrypt(
        self, key_uri: str, ciphertext: bytes, context: EncryptionContext | None
    ) -> bytes: ...

    @abstractmethod
    def generate_data_key(self, key_uri: str, context: EncryptionContext | None) -> DataKey: ...


def scheme_of(key_uri: str) -> str:
    scheme, sep, rest = key_uri.partition("://")
    if not sep or not rest:
        raise ConfigError(f"A KMS key URI must look like scheme://name, not {key_uri!r}.")
    return scheme


class KeyProviders:
    """The providers in use, one per URI scheme; dispatches each call by the key's scheme.

    Counts calls per operation (``calls``) so that tests, benchmarks and metrics can see what
    a stream of tokens costs in KMS round trips. Registering a scheme twice raises.
    """

    def __init__(self, *providers: KeyProvider) -> None:
        self._by_scheme: dict[str, KeyProvider] = {}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.observers: list[Callable[[str], None]] = []  # e.g. a Prometheus counter
        for provider in providers:
            self.register(provider)

    def register(self, provider: KeyProvider) -> None:
        if provider.scheme in self._by_scheme:
            raise ConfigError(f"A key provider for {provider.scheme}:// is already registered.")
        self._by_scheme[provider.scheme] = provider

    def provider_for(self, key_uri: str) -> KeyProvider:
        scheme = scheme_of(key_uri)
        try:
            return self._by_scheme[scheme]
        except KeyError:
            raise ConfigError(f"No key provider is configured for {scheme}:// keys.") from None

    def _count(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] += 1
        for observe in self.observers:
            observe(operation)

    def is_remote(self, key_uri: str) -> bool:
        """Whether a call for ``key_uri`` leaves the process (see ``KeyProvider.remote``)."""
        return self.provider_for(key_uri).remote

    def canonical_uri(self, key_uri: str) -> str:
        return self.provider_for(key_uri).canonical_uri(key_uri)

    def known_canonical_uri(self, key_uri: str) -> str | None:
        return self.provider_for(key_uri).known_canonical_uri(key_uri)

    def check(self, key_uri: str) -> None:
        """``KeyProvider.check`` of the key's provider (not counted as a KMS call)."""
        self.provider_for(key_uri).check(key_uri)

    def encrypt(self, key_uri: str, plaintext: bytes, context: EncryptionContext | None) -> bytes:
        provider = self.provider_for(key_uri)
        self._count("encrypt")
        return provider.encrypt(key_uri, plaintext, context)

    def decrypt(self, key_uri: str, ciphertext: bytes, context: EncryptionContext | None) -> bytes:
        provider = self.provider_for(key_uri)
        self._count("decrypt")
        return provider.decrypt(key_uri, ciphertext, context)

    def generate_data_key(self, key_uri: str, context: EncryptionContext | None) -> DataKey:
        provider = self.provider_for(key_uri)
        self._count("generate_data_key")
        return provider.generate_data_key(key_uri, context)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())
