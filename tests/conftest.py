"""Shared fixtures: a complete local setup on a temporary folder, the vectors folder, and the
real PostgreSQL and Redis servers.

``postgres`` makes fresh databases (``cardseal_test_<run>_<label>_<n>``, ``CREATE DATABASE``) on
the server at ``$CARDSEAL_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, a role allowed to create databases) and drops
them (``WITH (FORCE)``) when the session ends. ``redis_server`` hands
out replay-store URLs for ``$CARDSEAL_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), each
with a fresh key prefix (``#cardseal_test_<run>_<n>:``) whose keys are deleted at the end. Both
servers are required: when one does not answer, the tests that need it fail (never skip).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from cardseal.storage.replay import split_redis_spec
from cardseal.testing import LocalSetup
from tests import WYCHEPROOF


@pytest.fixture
def setup(tmp_path: Path) -> LocalSetup:
    return LocalSetup.create(tmp_path)


@pytest.fixture(scope="session")
def wycheproof_dir() -> Path:
    if not WYCHEPROOF.is_dir():
        raise RuntimeError(
            f"Wycheproof vectors not found at {WYCHEPROOF}: check out ../shared"
            " next to this repository, or set CARDSEAL_WYCHEPROOF"
        )
    return WYCHEPROOF


# -- PostgreSQL and Redis: required services, fresh namespaces per run -------------------------

POSTGRES_URL = os.environ.get("CARDSEAL_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CARDSEAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)
"""Names this test run: its databases and key prefixes, so that parallel runs never meet."""


class PostgresServer:
    """Creates databases on the test server and drops every one of them at ``close``."""

    def __init__(self, admin_url: str) -> None:
        self._admin = make_url(admin_url).set(drivername="postgresql")
        self._created: list[str] = []
        try:
            with self.admin() as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as err:
            pytest.fail(f"PostgreSQL is required and does not answer at "
                        f"{self._admin.render_as_string(hide_password=True)} "
                        f"(set CARDSEAL_TEST_POSTGRES_URL): {err}", pytrace=False)

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """A new autocommit connection to the admin database (a context manager)."""
        return psycopg.connect(self._admin.render_as_string(hide_password=False),
                               autocommit=True, connect_timeout=5)

    def create_database(self, label: str) -> str:
        """A new empty database; returns its ``postgresql://`` URL."""
        name = f"cardseal_test_{RUN_ID}_{label}_{len(self._created)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.append(name)
        return self._admin.set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        with self.admin() as conn:
            for name in self._created:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
        self._created.clear()


class RedisServer:
    """Hands out replay-store URLs with fresh key prefixes; deletes their keys at ``close``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._prefixes: list[str] = []
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as err:
            self.client.close()
            where = urlsplit(url)._replace(netloc=urlsplit(url).netloc.rpartition("@")[2])
            pytest.fail(f"Redis is required and does not answer at {urlunsplit(where)} "
                        f"(set CARDSEAL_TEST_REDIS_URL): {err}", pytrace=False)

    def replay_store(self, *, port: int | None = None) -> str:
        """``gateway.replay_store`` for a fresh key prefix on this server (reached through
        ``127.0.0.1:port`` instead, e.g. a proxy, when ``port`` is given)."""
        prefix = f"cardseal_test_{RUN_ID}_{len(self._prefixes)}:"
        self._prefixes.append(prefix)
        url = self.url
        if port is not None:
            parts = urlsplit(url)
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
            url = urlunsplit(parts._replace(netloc=netloc))
        return f"{url}#{prefix}"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the server."""
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 6379

    def keys(self, spec: str) -> list[bytes]:
        """Every key under the prefix of the replay store ``spec``."""
        _, prefix = split_redis_spec(spec)
        return list(self.client.scan_iter(match=prefix + "*", count=1000))

    def close(self) -> None:
        try:
            for prefix in self._prefixes:
                keys = list(self.client.scan_iter(match=prefix + "*", count=1000))
                for start in range(0, len(keys), 500):
                    self.client.unlink(*keys[start:start + 500])
        finally:
            self.client.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(POSTGRES_URL)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(REDIS_URL)
    try:
        yield server
    finally:
        server.close()
