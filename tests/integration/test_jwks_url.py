"""JWKS by URL against a local HTTPS server: rotation, unknown-kid storms, outages.

The server's certificate comes from ``cardseal.scaffold.self_signed_cert`` and is the only CA
``RemoteJwks`` trusts here (``verify=``). Time is a fake clock, so lifetimes and cool-downs are
exact; only the slow-server case waits for real.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cardseal.config import Settings, build_issuer_policies
from cardseal.errors import ConfigError, TokenError
from cardseal.keys.jwk import MAX_JWKS_BYTES, VerificationKeySet
from cardseal.keys.jwks_url import RemoteJwks
from cardseal.keys.signing import PemSigner
from cardseal.scaffold import self_signed_cert
from cardseal.testing import AUDIENCE, ISSUER
from cardseal.tokens import IssuerPolicy, TokenVerifier
from tests.integration.conftest import pem_signer, signed_token

pytestmark = pytest.mark.integration

LIFETIME, COOLDOWN, TIMEOUT = 300.0, 30.0, 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    jwks: JwksServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client refusing the certificate, or giving up on a slow answer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        site = self.server.jwks
        site.hits += 1
        time.sleep(site.delay)
        try:
            self.send_response(site.status)
            if site.status in (301, 302):
                self.send_header("Location", "https://127.0.0.1:1/elsewhere.json")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(site.body)))
            self.end_headers()
            self.wfile.write(site.body)
        except OSError:
            pass


class JwksServer:
    """An HTTPS server publishing ``body`` at ``/.well-known/jwks.json``."""

    def __init__(self, directory: Path) -> None:
        cert, key = self_signed_cert(("127.0.0.1",))
        self.cert = directory / "jwks-cert.pem"
        self.cert.write_bytes(cert)
        (directory / "jwks-key.pem").write_bytes(key)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(self.cert, directory / "jwks-key.pem")
        self.body = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.port = 0
        self._server: _Server | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/.well-known/jwks.json"

    def publish(self, *signers: PemSigner) -> None:
        self.body = json.dumps(
            VerificationKeySet([s.verification_key() for s in signers]).to_jwks()).encode()

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.socket = self._tls.wrap_socket(server.socket, server_side=True,
                                              do_handshake_on_connect=False)
        server.jwks = self
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def site(tmp_path: Path) -> Iterator[JwksServer]:
    server = JwksServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def remote(site: JwksServer, clock: Clock) -> RemoteJwks:
    return RemoteJwks(site.url, lifetime=LIFETIME, cooldown=COOLDOWN, timeout=TIMEOUT,
                      verify=site.cert, clock=clock)


def verifier(keys: RemoteJwks) -> TokenVerifier:
    return TokenVerifier(issuers=[IssuerPolicy(
        iss=ISSUER, audience=AUDIENCE, keys=keys, allowed_kms_keys=("local://main",),
        algorithms=frozenset({"ES256"}))])


def token(signer: PemSigner) -> str:
    return signed_token(signer, "a.b.c.d.e", secrets.token_urlsafe(16))


def key_unknown(check: TokenVerifier, signed: str) -> bool:
    try:
        check.verify(signed)
    except TokenError as err:
        return err.code == "token_key_unknown"
    return False


def test_rotation_is_picked_up(site: JwksServer, clock: Clock) -> None:
    old, new = pem_signer("ES256"), pem_signer("ES256")
    site.publish(old)
    keys = remote(site, clock)
    check = verifier(keys)
    assert check.verify(token(old)).header["kid"] == old.kid
    assert keys.fetches == 1

    site.publish(old, new)  # step 1 of a rotation: the new key is published before it signs
    assert key_unknown(check, token(new))  # fetched just now: the cool-down holds
    clock.now += COOLDOWN
    assert check.verify(token(new)).header["kid"] == new.kid  # unknown kid: one refetch
    assert check.verify(token(old)).header["kid"] == old.kid  # old tokens still verify
    assert keys.fetches == 2

    site.publish(new)  # retired: after one lifetime the old key is gone
    clock.now += LIFETIME - 1
    assert check.verify(token(old))
    clock.now += 1
    assert key_unknown(check, token(old))
    assert check.verify(token(new))
    assert (keys.fetches, site.hits, keys.failures) == (3, 3, 0)


def test_unknown_kid_storms_are_rate_limited(site: JwksServer, clock: Clock) -> None:
    signer = pem_signer("ES256")
    site.publish(signer)
    keys = remote(site, clock)

    def storm() -> None:
        for _ in range(25):
            assert keys.get(secrets.token_urlsafe(32)) is None

    def run_storm() -> None:
        threads = [threading.Thread(target=storm) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run_storm()  # from a cold cache: 400 lookups, 16 threads at once
    assert (keys.fetches, site.hits) == (1, 1)
    assert keys.get(signer.kid) is not None
    clock.now += COOLDOWN / 2
    run_storm()
    assert site.hits == 1
    clock.now += COOLDOWN / 2
    run_storm()
    assert (keys.fetches, site.hits) == (2, 2)


def _outage(site: JwksServer, kind: str) -> None:
    if kind == "down":
        site.stop()
    elif kind == "slow":
        site.delay = TIMEOUT * 3
    elif kind == "http-500":
        site.status = 500
    elif kind == "redirect":
        site.status = 302
    elif kind == "too-large":
        site.body = b'{"keys": [], "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}'
    elif kind == "not-a-jwks":
        site.body = b"<html>maintenance</html>"
    elif kind == "private-key":
        site.body = json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode()
    elif kind == "key-ops-not-a-list":
        published = json.loads(site.body)
        published["keys"][0]["key_ops"] = 5
        site.body = json.dumps(published).encode()


def _recover(site: JwksServer, kind: str) -> None:
    site.status, site.delay = 200, 0.0
    if kind == "down":
        site.start()


@pytest.mark.parametrize("kind", ["down", "slow", "http-500", "redirect", "too-large",
                                  "not-a-jwks", "private-key", "key-ops-not-a-list"])
def test_the_last_good_set_is_kept_through_an_outage(
    site: JwksServer, clock: Clock, kind: str
) -> None:
    signer, successor = pem_signer("ES256"), pem_signer("ES256")
    site.publish(signer)
    keys = remote(site, clock)
    check = verifier(keys)
    assert check.verify(token(signer))

    _outage(site, kind)
    clock.now += LIFETIME  # the set is stale: the next lookup refreshes, and fails
    started = time.monotonic()
    assert check.verify(token(signer))  # served from the last good set
    assert time.monotonic() - started < 2 * TIMEOUT + 0.5  # a fetch is bounded in time
    assert (keys.fetches, keys.failures) == (2, 1)
    for _ in range(50):  # within the cool-down nothing is fetched again
        assert check.verify(token(signer))
        assert keys.get("unknown-kid") is None
    assert keys.fetches == 2
    clock.now += COOLDOWN
    assert check.verify(token(signer))
    assert (keys.fetches, keys.failures) == (3, 2)
    assert [k.kid for k in keys] == [signer.kid]

    _recover(site, kind)
    site.publish(signer, successor)
    clock.now += COOLDOWN
    assert check.verify(token(successor))  # back as soon as the source is
    assert (keys.fetches, keys.failures) == (4, 2)


def test_nothing_fetched_yet_and_the_source_down_is_an_unknown_key(
    site: JwksServer, clock: Clock
) -> None:
    signer = pem_signer("ES256")
    site.publish(signer)
    site.status = 503
    keys = remote(site, clock)
    assert key_unknown(verifier(keys), token(signer))
    assert list(keys) == []
    assert (keys.fetches, keys.failures) == (1, 1)


def test_the_server_certificate_is_verified(site: JwksServer, clock: Clock) -> None:
    signer = pem_signer("ES256")
    site.publish(signer)
    keys = RemoteJwks(site.url, clock=clock)  # the system CAs do not know this certificate
    assert keys.get(signer.kid) is None
    assert keys.failures == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1/jwks.json", "ftp://example.com/jwks.json",
                                 "https://user:secret@example.com/jwks.json", "https:///jwks",
                                 "/etc/jwks.json"])
def test_only_https_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        RemoteJwks(url)


@pytest.mark.parametrize("limits", [{"lifetime": 0}, {"cooldown": 0},
                                    {"lifetime": 10, "cooldown": 20}, {"timeout": 0},
                                    {"timeout": 61}, {"verify": "/no/such/ca.pem"}])
def test_limits_are_checked_when_made(limits: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RemoteJwks("https://example.com/jwks.json", **limits)


def test_an_issuer_configured_with_a_jwks_url(
    site: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = pem_signer("ES256")
    site.publish(signer)
    monkeypatch.setenv("SSL_CERT_FILE", str(site.cert))  # the CA bundle, as an operator sets it
    settings = Settings.model_validate({"issuers": [{
        "iss": ISSUER, "verification_keys": [site.url], "algorithms": ["ES256"],
        "allowed_kms_keys": ["local://main"]}]})
    (issuer,) = build_issuer_policies(settings)
    assert isinstance(issuer.keys, RemoteJwks)
    assert site.hits == 0  # nothing connects until the first token
    assert TokenVerifier(issuers=[issuer]).verify(token(signer)).header["kid"] == signer.kid
    assert site.hits == 1
