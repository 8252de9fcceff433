"""Fault-injection fixtures: a gateway home made by ``cardseal init``, the app run in-process.

Each test builds ``create_app(settings, ...)`` on a fresh home and drives it in-process
(``tests/faults/asgi.py``: lifespan included, so background tasks run as under uvicorn; an
exception escaping the app fails the test instead of becoming a 500). Faults come from real
components where that is cheap: moto's KMS server behind the fault-injecting proxy of
``tests/integration/kms_proxy.py``, a second SQLite connection holding an exclusive lock, a
full tmpfs, a closed TCP port in front of PostgreSQL.

Every fault test checks the same four things: the contract's code and status (503s with
``Retry-After``), nothing half-done in the ledger, the token given back (or refused where the
contract says so), and recovery on the same app once the fault is gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from fastapi import FastAPI
from moto.server import ThreadedMotoServer
from sqlalchemy import create_engine, text

from cardseal import jws
from cardseal.card import Card
from cardseal.client import Sealer
from cardseal.config import Settings, build_sealer, database_url, load_settings
from cardseal.scaffold import init_dir
from cardseal.storage.migrate import upgrade
from cardseal.storage.schema import sync_url
from cardseal.storage.sql import replay_id
from tests.faults.asgi import InProcessGateway

PAN = "4242424242424242"
EXPIRY = "12/2030"
AMOUNT = 1999
REGION = "us-east-1"
ERROR_EXTRAS = {"decline_code", "payment_id"}
PAYMENT_ID = re.compile(r"pay_[0-9a-f]{36}")


# -- a gateway home ----------------------------------------------------------------------------


@dataclass
class Home:
    """A folder made by ``cardseal init`` (database migrated) and its settings."""

    directory: Path
    settings: Settings

    @property
    def db_url(self) -> str:
        return database_url(self.settings)

    def with_settings(self, **sections: dict[str, Any]) -> Home:
        """The same home with some settings changed: ``gateway={"database_url": ...}``."""
        update = {name: getattr(self.settings, name).model_copy(update=values)
                  for name, values in sections.items()}
        return Home(self.directory, self.settings.model_copy(update=update))

    def sealer(self) -> Sealer:
        """The client side of this home, one data key per token (each open calls the KMS)."""
        client = self.settings.client.model_copy(update={"data_key_max_uses": 1})
        return build_sealer(self.settings.model_copy(update={"client": client}))

    def seal(self, sealer: Sealer | None = None) -> str:
        card = Card(card_number=PAN, expiry_date=EXPIRY, cvv="739")
        return (sealer or self.sealer()).seal(card)

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        engine = create_engine(sync_url(self.db_url))
        try:
            with engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(text(sql), params)]
        finally:
            engine.dispose()

    def ledger(self) -> list[dict[str, Any]]:
        return self.query("SELECT id, replay_id, processor_ref FROM payments ORDER BY id")

    def token_state(self, token: str) -> str | None:
        """The single-use record of ``token``: pending, released, spent, done, or None."""
        rows = self.query("SELECT state FROM used_tokens WHERE replay_id = :rid",
                          rid=rid_of(token))
        return str(rows[0]["state"]) if rows else None

    def idempotency_state(self, key: str) -> str | None:
        rows = self.query('SELECT state FROM idempotency_keys WHERE "key" = :key', key=key)
        return str(rows[0]["state"]) if rows else None


def rid_of(token: str) -> str:
    claims = json.loads(jws.parse_compact(token).payload)
    return replay_id(claims["iss"], claims["jti"])


def make_home(directory: Path, *, db_url: str | None = None) -> Home:
    """``cardseal init`` into ``directory`` and migrate its database (or ``db_url``)."""
    config = init_dir(directory)
    with pytest.MonkeyPatch.context() as patch:  # settings from the file only
        for name in os.environ:
            if name.startswith("CARDSEAL_"):
                patch.delenv(name)
        settings = load_settings(config)
    home = Home(directory, settings)
    if db_url is not None:
        home = home.with_settings(gateway={"database_url": db_url})
    upgrade(home.db_url)
    return home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path / "gateway")


@contextmanager
def running(app: FastAPI) -> Iterator[InProcessGateway]:
    """The app with its lifespan running; requests go to it in-process."""
    with InProcessGateway(app) as client:
        yield client


def pay(client: InProcessGateway, token: str, *, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/payments", json={"token": token, "amount": AMOUNT, "currency": "USD"},
                       headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Exactly the contract's error body; a 503 carries ``Retry-After``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, response.text
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) - {"code", "message"} <= ERROR_EXTRAS
    if status == 503:
        assert response.headers["retry-after"].isdigit()
    else:
        assert "retry-after" not in response.headers
    return error


def assert_paid(response: httpx.Response) -> dict[str, Any]:
    """A 201 with the contract's ``PAYMENT`` for the suite's card and amount."""
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert PAYMENT_ID.fullmatch(body["id"])
    assert (body["status"], body["amount"], body["currency"]) == ("authorized", AMOUNT, "USD")
    assert body["card"]["last4"] == PAN[-4:]
    return body


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.05)


# -- a TCP port that can be closed and opened again ------------------------------------------------


class TcpGate:
    """A TCP forwarder on a fixed local port: ``close()`` refuses connections (and cuts open
    ones), ``open()`` forwards them to ``upstream`` again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._pairs: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); a close alone would not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._pairs:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # a close alone would not wake recv()
                except OSError:
                    pass
                sock.close()
            self._pairs.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- moto's KMS server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KmsServer:
    endpoint: str
    client: Any  # mypy_boto3_kms.KMSClient

    def new_key_arn(self) -> str:
        arn: str = self.client.create_key()["KeyMetadata"]["Arn"]
        return arn


@pytest.fixture(scope="session")
def kms_server() -> Iterator[KmsServer]:
    """moto's KMS on a free port, with fake credentials and every host ``AWS_*`` hidden."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        werkzeug = logging.getLogger("werkzeug")
        level = werkzeug.level
        werkzeug.setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.session.Session().client("kms", region_name=REGION, endpoint_url=endpoint)
        try:
            yield KmsServer(endpoint, client)
        finally:
            client.close()
            server.stop()
            werkzeug.setLevel(level)
