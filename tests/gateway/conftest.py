"""The gateway suite's fixtures: a real ``cardseal serve`` over HTTPS, and token helpers.

``gateway`` (one per session and database) runs ``cardseal init`` into a temporary folder, adds
what the error table needs (a second keyring key ``local://other`` that no issuer allows, a
second issuer ``other-service`` signing with ES256), then starts ``cardseal serve`` as a
subprocess on a free port and waits for ``/healthz``. Its stderr (the JSON log) goes to a file
that the leak test scans.

The backend is a fixture parameter: every gateway test runs once per entry of ``BACKENDS``,
``sqlite-database`` (the SQLite file ``init`` writes, used tokens in it), ``postgresql-database``
(a fresh PostgreSQL database of this run, used tokens in it) and ``postgresql-redis`` (another
fresh database, used tokens in Redis under a fresh key prefix); see ``tests/conftest.py`` for the
servers, which are required. A PostgreSQL database is migrated with ``cardseal db upgrade``
first. Suites that import these fixtures elsewhere (``tests/security``) get ``sqlite-database``
only: ``pytest_generate_tests`` below applies to this folder.

``TokenForge`` seals real tokens with the same configuration and forges broken ones, changing
one thing at a time. ``LeakRegistry`` remembers every PAN, CVV, token and ``meta_data`` the
suite made and every response body it received, for ``test_leaks.py``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from cardseal import jws
from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.card import Card
from cardseal.config import (
    Settings,
    build_providers,
    build_sealer,
    build_signer,
    load_settings,
)
from cardseal.config import (
    database_url as settings_database_url,
)
from cardseal.envelope import EnvelopeSealer, kms_direct_context, seal_kms_direct
from cardseal.errors import TokenError
from cardseal.keys.jwk import VerificationKeySet
from cardseal.keys.local import add_key_version
from cardseal.keys.signing import PemSigner, Signer, generate_private_key_pem
from cardseal.storage.replay import split_redis_spec
from cardseal.storage.schema import sync_url
from cardseal.storage.sql import replay_id
from cardseal.tokens import Payment
from tests.conftest import PostgresServer, RedisServer

ISSUER = "payment-service"
OTHER_ISSUER = "other-service"
AUDIENCE = "payment-gateway"
MAIN_KEY = "local://main"
OTHER_KEY = "local://other"  # in the keyring, allowed for no issuer
EXPIRY = "12/2030"

# Card data the suite uses. CVVs are distinctive so that the leak scan can look for them.
PAN_VISA = "4242424242424242"
PAN_MASTERCARD = "5555555555554444"
PAN_AMEX = "378282246310005"
CVV = "739"
CVV_AMEX = "4826"
PAN_LUHN_INVALID = "4242424242424241"
PAN_NO_BRAND = "1000000000000008"  # Luhn-valid, no known IIN range

_CARDSEAL = Path(sys.executable).with_name("cardseal")
_START_TIMEOUT = 30.0

_OTHER_ISSUER_TOML = """
[[issuers]]
iss = "other-service"
audience = "payment-gateway"
verification_keys = ["keys/other-jwks.json"]
algorithms = ["ES256"]
allowed_kms_keys = ["local://main"]
formats = ["envelope"]
max_lifetime = 300
legacy = false
"""


def cardseal_command(*args: str) -> list[str]:
    """The ``cardseal`` console script of this interpreter's environment."""
    if _CARDSEAL.is_file():
        return [str(_CARDSEAL), *args]
    return [sys.executable, "-c", "from cardseal.cli import main; main()", *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


BACKENDS = [("sqlite", "database"), ("postgresql", "database"), ("postgresql", "redis")]
"""(database, replay store) pairs the gateway suite runs on."""


# -- what the leak test scans for ------------------------------------------------------------


@dataclass
class LeakRegistry:
    """Every secret the suite made, every response body it got, every gateway folder."""

    pans: set[str] = field(default_factory=set)
    cvvs: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    meta_data: set[str] = field(default_factory=set)
    responses: list[bytes] = field(default_factory=list)
    homes: list[GatewayHome] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def card(self, card: dict[str, Any] | bytes) -> None:
        """Remember the PAN and CVV of a card (JSON), or every long digit run of other bytes."""
        try:
            value = json.loads(card) if isinstance(card, bytes) else card
        except ValueError:
            assert isinstance(card, bytes)
            with self._lock:
                self.pans.update(re.findall(r"\d{12,19}", card.decode(errors="replace")))
            return
        with self._lock:
            if isinstance(value, dict):
                if isinstance(value.get("card_number"), str):
                    self.pans.add(value["card_number"])
                if isinstance(value.get("cvv"), str):
                    self.cvvs.add(value["cvv"])

    def token(self, token: str) -> None:
        with self._lock:
            self.tokens.add(token)
            try:
                claims = json.loads(jws.parse_compact(token).payload)
            except (ValueError, TokenError):
                return
            meta = claims.get("meta_data") if isinstance(claims, dict) else None
            if isinstance(meta, str) and meta:
                self.meta_data.add(meta)

    def response(self, response: httpx.Response) -> None:
        response.read()
        with self._lock:
            self.responses.append(response.content)


# -- a gateway's folder and its server ---------------------------------------------------------


@dataclass
class GatewayHome:
    """A folder made by ``cardseal init``, extended for the error table."""

    directory: Path
    config: Path
    cacert: Path
    database_url: str
    env: dict[str, str]
    settings: Settings

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def engine(self) -> Engine:
        return create_engine(sync_url(self.database_url))

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(text(sql), params)]
        finally:
            engine.dispose()

    def reserved(self, rid: str) -> bool:
        """Whether the replay store holds a record of the token ``rid`` (any state)."""
        store = self.settings.gateway.replay_store
        if store == "database":
            return bool(self.query("SELECT 1 FROM used_tokens WHERE replay_id = :rid", rid=rid))
        url, prefix = split_redis_spec(store)
        client = redis.Redis.from_url(url)
        try:
            return bool(client.exists(prefix + rid))
        finally:
            client.close()

    def cli(self, *args: str, stdin: bytes | None = None) -> dict[str, Any]:
        """Run ``cardseal --config CONFIG ARGS`` and return its JSON output."""
        done = subprocess.run(
            cardseal_command("--config", str(self.config), *args),
            input=stdin, capture_output=True, env=self.env, timeout=60, check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"cardseal {args[0]} failed ({done.returncode}): "
                                 f"{done.stderr.decode(errors='replace')}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cacert))


def make_home(directory: Path, database_url: str, replay_store: str) -> GatewayHome:
    """``cardseal init`` into ``directory``, plus the extras; migrate a non-SQLite database."""
    done = subprocess.run(cardseal_command("init", "--dir", str(directory)),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    config = directory / "cardseal.toml"
    add_key_version(directory / "keys" / "keyring.json", "other")
    other_pem = generate_private_key_pem("ES256")
    (directory / "keys" / "other-signing.pem").write_bytes(other_pem)
    (directory / "keys" / "other-signing.pem").chmod(0o600)
    other = PemSigner(serialization.load_pem_private_key(other_pem, None),  # type: ignore[arg-type]
                      alg="ES256")
    jwks = VerificationKeySet([other.verification_key()]).to_jwks()
    (directory / "keys" / "other-jwks.json").write_text(json.dumps(jwks))
    with config.open("a") as handle:
        handle.write(_OTHER_ISSUER_TOML)

    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDSEAL_")}
    env["PYTHONUNBUFFERED"] = "1"
    if database_url != "sqlite":
        env["CARDSEAL_GATEWAY__DATABASE_URL"] = database_url
    if replay_store != "database":
        env["CARDSEAL_GATEWAY__REPLAY_STORE"] = replay_store
    with pytest.MonkeyPatch.context() as patch:  # the server's environment, not the shell's
        for name in os.environ:
            if name.startswith("CARDSEAL_"):
                patch.delenv(name)
        settings = load_settings(config)
    gateway = settings.gateway.model_copy(update={
        "database_url": database_url if database_url != "sqlite" else settings.gateway.database_url,
        "replay_store": replay_store,
    })
    settings = settings.model_copy(update={"gateway": gateway})
    home = GatewayHome(directory, config, directory / "tls" / "cert.pem",
                       settings_database_url(settings), env, settings)
    if database_url != "sqlite":
        home.cli("db", "upgrade")
    return home


class ServerProcess:
    """``cardseal serve`` as a subprocess; stderr (the JSON log) appended to ``log_path``."""

    def __init__(self, home: GatewayHome, port: int, log_path: Path) -> None:
        self.home = home
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log, (self.log_path.with_suffix(".out")).open("ab") as out:
            self.proc = subprocess.Popen(
                cardseal_command("--config", str(self.home.config), "serve", "--port",
                                 str(self.port)),
                stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=self.home.env,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        with httpx.Client(verify=self.home.ssl_context(), timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"cardseal serve exited {self.proc.returncode}:\n"
                                       + self.log_path.read_text(errors="replace")[-4000:])
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("cardseal serve did not answer /healthz in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, like a power cut of the process."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# -- tokens ------------------------------------------------------------------------------------


def card_json(pan: str = PAN_VISA, cvv: str = CVV, expiry: str = EXPIRY, **extra: Any) -> bytes:
    return json.dumps({"card_number": pan, "expiry_date": expiry, "cvv": cvv, **extra}).encode()


def tamper_signature(token: str) -> str:
    """The same token with one bit of its signature flipped (length unchanged)."""
    head, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url_encode(bytes(raw))}"


class TokenForge:
    """Seals tokens with the home's client configuration; forges broken ones on purpose."""

    def __init__(self, home: GatewayHome, registry: LeakRegistry) -> None:
        self.home = home
        self.registry = registry
        self.providers = build_providers(home.settings)
        self.signer: Signer = build_signer(home.settings)
        self.sealer = build_sealer(home.settings, self.providers)
        self.other_signer = PemSigner.from_file(home.directory / "keys" / "other-signing.pem",
                                                alg="ES256")
        self._envelopes = {
            uri: EnvelopeSealer(providers=self.providers, key_uri=uri)
            for uri in (MAIN_KEY, OTHER_KEY)
        }

    def seal(self, pan: str = PAN_VISA, cvv: str = CVV, *, expiry: str = EXPIRY,
             payment: Payment | None = None) -> str:
        """A genuine token, exactly as ``cardseal seal`` makes it."""
        card = Card(card_number=pan, expiry_date=expiry, cvv=cvv)
        self.registry.card({"card_number": pan, "cvv": cvv})
        token = self.sealer.seal(card, payment=payment)
        self.registry.token(token)
        return token

    def envelope(self, plaintext: bytes, *, jti: str, key_uri: str = MAIN_KEY,
                 iss: str = ISSUER, aud: str = AUDIENCE) -> str:
        """``envelope`` meta_data around any plaintext (no card validation)."""
        return self._envelopes[key_uri].seal(plaintext, iss=iss, aud=aud, jti=jti)

    def kms_direct(self, plaintext: bytes, *, jti: str, key_uri: str = MAIN_KEY) -> str:
        """``kms-direct`` meta_data (one KMS Encrypt) around any plaintext."""
        return seal_kms_direct(self.providers, key_uri, plaintext,
                               kms_direct_context(ISSUER, AUDIENCE, jti))

    def forge(
        self,
        *,
        card: bytes | None = None,
        iss: str = ISSUER,
        claims: dict[str, Any] | None = None,
        drop: Iterable[str] = (),
        header: dict[str, Any] | None = None,
        drop_header: Iterable[str] = (),
        signer: Signer | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        meta_data: Callable[[str], str] | None = None,
        lifetime: int = 120,
    ) -> str:
        """A token that is valid except for what the arguments change.

        ``card`` is the plaintext sealed into ``meta_data`` (a valid card by default) for
        issuer ``iss`` (the token's ``iss`` and the envelope's encryption context);
        ``meta_data(jti)`` replaces the whole claim; ``claims``/``header`` override members,
        ``drop``/``drop_header`` remove them; ``sign`` replaces the signature function.
        """
        plaintext = card if card is not None else card_json()
        self.registry.card(plaintext)
        signer = signer or self.signer
        jti = secrets.token_urlsafe(16)
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": iss, "aud": AUDIENCE, "iat": now, "exp": now + lifetime, "jti": jti,
            "meta_data": meta_data(jti) if meta_data else self.envelope(plaintext, jti=jti,
                                                                        iss=iss),
        }
        body.update(claims or {})
        for name in drop:
            body.pop(name, None)
        head: dict[str, Any] = {"alg": signer.alg, "kid": signer.kid, "typ": "card+jwt"}
        head.update(header or {})
        for name in drop_header:
            head.pop(name, None)
        token = jws.encode_compact(head, json.dumps(body).encode(), sign or signer.sign)
        self.registry.token(token)
        return token

    def replay_id_of(self, token: str) -> str:
        claims = json.loads(jws.parse_compact(token).payload)
        return replay_id(claims["iss"], claims["jti"])


# -- a running gateway, as the tests see it ----------------------------------------------------


@dataclass
class Gateway:
    home: GatewayHome
    server: ServerProcess
    forge: TokenForge
    registry: LeakRegistry
    api_keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def client(self, **options: Any) -> httpx.Client:
        """An HTTPS client trusting the gateway's certificate; every response is recorded."""
        options.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, verify=self.home.ssl_context(),
                            event_hooks={"response": [self.registry.response]}, **options)

    def api_key(self, issuer: str = ISSUER) -> str:
        if issuer not in self.api_keys:
            self.api_keys[issuer] = str(self.home.cli("apikey", "create", "--issuer",
                                                      issuer)["api_key"])
        return self.api_keys[issuer]


@pytest.fixture(scope="session")
def leak_registry() -> LeakRegistry:
    return LeakRegistry()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test of this folder that runs a gateway runs once per entry of ``BACKENDS``."""
    if {"database_url", "replay_store"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("database_url", "replay_store"), BACKENDS, indirect=True,
                             scope="session", ids=[f"{d}-{r}" for d, r in BACKENDS])


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest) -> str:
    """``"sqlite"`` (the file ``cardseal init`` writes) or the URL of a fresh PostgreSQL
    database (parameter ``"postgresql"``)."""
    kind: str = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        return kind
    assert kind == "postgresql", kind
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.create_database("gateway")


@pytest.fixture(scope="session")
def replay_store(request: pytest.FixtureRequest) -> str:
    """``"database"`` (the default) or a Redis URL with a fresh key prefix (``"redis"``)."""
    kind: str = getattr(request, "param", "database")
    if kind == "database":
        return kind
    assert kind == "redis", kind
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.replay_store()


def start_gateway(base: Path, database_url: str, replay_store: str,
                  registry: LeakRegistry) -> Gateway:
    home = make_home(base, database_url, replay_store)
    registry.homes.append(home)
    server = ServerProcess(home, free_port(), base / "server.log")
    server.start()
    return Gateway(home, server, TokenForge(home, registry), registry)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, database_url: str, replay_store: str,
            leak_registry: LeakRegistry) -> Iterator[Gateway]:
    """The session's gateway: ``cardseal serve`` in a subprocess, HTTPS on a free port."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), database_url, replay_store,
                       leak_registry)
    try:
        yield gw
    finally:
        gw.server.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


# -- in-process servers, for fault injection ---------------------------------------------------


@contextmanager
def serve_in_thread(app: FastAPI, home: GatewayHome) -> Iterator[str]:
    """Serve ``app`` with uvicorn (HTTPS, the home's certificate) on a free port in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, ws="none",
        lifespan="on", ssl_certfile=str(home.cacert),
        ssl_keyfile=str(home.directory / "tls" / "key.pem"), timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process gateway did not start")
            time.sleep(0.02)
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
