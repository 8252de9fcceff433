"""``RemoteJwks``: an issuer's verification keys from a JWKS published at an https URL.

What PyJWT's ``PyJWKClient`` users keep asking for (pyjwt#1162, #1051, #929), as the rules here:

- the set is cached for ``lifetime`` seconds, then refetched on the next lookup (one thread
  fetches, the others keep using the cached set meanwhile);
- a ``kid`` not in the set triggers a refetch, at most once per ``cooldown`` seconds, so a
  storm of tokens with made-up ``kid`` values costs at most one fetch per cool-down;
- a failed refresh (unreachable, slow, non-200, too large, not a valid JWKS) keeps the last good
  set; attempts are rate-limited by the same cool-down.

Each fetch is bounded: https only, no redirects, no compression, at most
``keys.jwk.MAX_JWKS_BYTES`` bytes. In time: every network wait (connect with TLS, the headers,
each read) gives up after ``timeout`` seconds, and the fetch is abandoned at the first read that
ends more than ``timeout`` after it started; a server that stalls costs about ``timeout``, one
that answers each step just in time at most about three times that.
Thread-safe. The clock (``clock=``, monotonic seconds) and the CA bundle (``verify=``, a PEM
path) are injectable for tests. Nothing connects until the first lookup.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final
from urllib.parse import urlsplit

import httpx

from cardseal._encoding import loads_strict
from cardseal.errors import ConfigError
from cardseal.keys.jwk import MAX_JWKS_BYTES, VerificationKey, VerificationKeySet

DEFAULT_LIFETIME: Final = 300.0
DEFAULT_COOLDOWN: Final = 30.0
DEFAULT_TIMEOUT: Final = 5.0
MAX_LIFETIME: Final = 86_400.0
MAX_TIMEOUT: Final = 60.0

_log = logging.getLogger(__name__)


class _FetchError(Exception):
    """A fetch that did not yield a valid key set (reason for the server log only)."""


class RemoteJwks:
    """A ``KeySource`` that fetches and caches the JWKS at ``url`` (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        lifetime: float = DEFAULT_LIFETIME,
        cooldown: float = DEFAULT_COOLDOWN,
        timeout: float = DEFAULT_TIMEOUT,
        verify: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises ``ConfigError`` for a URL that is not https, limits out of range, or a CA
        bundle that cannot be read."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
            raise ConfigError("A JWKS URL must be https://host/path, without credentials.")
        if not 0 < lifetime <= MAX_LIFETIME:
            raise ConfigError(f"JWKS lifetime must be in (0, {MAX_LIFETIME}] seconds.")
        if not 0 < cooldown <= lifetime:
            raise ConfigError("JWKS cool-down must be positive and at most the lifetime.")
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ConfigError(f"JWKS fetch timeout must be in (0, {MAX_TIMEOUT}] seconds.")
        try:
            self._tls = ssl.create_default_context(
                cafile=os.fspath(verify) if verify is not None else None
            )
        except (OSError, ssl.SSLError) as err:
            raise ConfigError("Cannot load the CA bundle for the JWKS URL.") from err
        self.url = url
        self._lifetime = lifetime
        self._cooldown = cooldown
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: VerificationKeySet | None = None
        self._fetched_at = 0.0
        self._attempted_at: float | None = None
        self.fetches = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"RemoteJwks({self.url!r})"

    # -- KeySource ----------------------------------------------------------------------------

    def get(self, kid: str) -> VerificationKey | None:
        """The key with ``kid``; an unknown ``kid`` refetches first (once per cool-down)."""
        keys = self._current()
        key = keys.get(kid) if keys is not None else None
        if key is None:
            self._refresh(blocking=True)
            keys = self._keys
            key = keys.get(kid) if keys is not None else None
        return key

    def __iter__(self) -> Iterator[VerificationKey]:
        keys = self._current()
        return iter(keys) if keys is not None else iter(())

    # -- cache --------------------------------------------------------------------------------

    def _current(self) -> VerificationKeySet | None:
        """The cached set, refreshed first when older than the lifetime.

        With a set in hand, a thread that finds another one fetching does not wait for it.
        """
        keys = self._keys
        if keys is None or self._clock() - self._fetched_at >= self._lifetime:
            self._refresh(blocking=keys is None)
        return self._keys

    def _refresh(self, *, blocking: bool) -> None:
        """Fetch the set unless one was attempted within the cool-down; keep it on failure."""
        if not self._lock.acquire(blocking=blocking):
            return
        try:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._cooldown:
                return
            self._attempted_at = now
            self.fetches += 1
            try:
                keys = self._fetch()
            except _FetchError as err:
                self.failures += 1
                _log.warning("JWKS refresh from %s failed (%s); keeping the last good set.",
                             self.url, err)
                return
            self._keys, self._fetched_at = keys, self._clock()
        finally:
            self._lock.release()

    def _fetch(self) -> VerificationKeySet:
        deadline = time.monotonic() + self._timeout
        body = bytearray()
        try:
            with httpx.Client(
                verify=self._tls,
                timeout=self._timeout,
                follow_redirects=False,
                headers={"Accept": "application/jwk-set+json, application/json",
                         "Accept-Encoding": "identity"},
            ) as client, client.stream("GET", self.url) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP {response.status_code}")
                if response.headers.get("content-encoding", "identity") != "identity":
                    raise _FetchError("compressed response")
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _FetchError(f"larger than {MAX_JWKS_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _FetchError("too slow")
        except httpx.HTTPError as err:
            raise _FetchError(type(err).__name__) from err
        try:
            document = loads_strict(bytes(body), max_bytes=MAX_JWKS_BYTES, max_depth=4)
            return VerificationKeySet.from_jwks(document)
        except (ValueError, ConfigError) as err:
            raise _FetchError("not a valid JWKS") from err
