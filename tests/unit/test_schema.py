"""The schema check a gateway worker makes at start-up, without Alembic (``storage.schema``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cardseal.config import load_settings
from cardseal.errors import ConfigError, StorageError
from cardseal.gateway.app import create_app
from cardseal.scaffold import init_dir
from cardseal.storage.migrate import head_revision, upgrade
from cardseal.storage.schema import (
    SCHEMA_HEAD,
    async_url,
    check_schema,
    current_revision,
    sync_url,
)
from tests.conftest import PostgresServer


def test_the_schema_head_is_the_newest_migration() -> None:
    assert SCHEMA_HEAD == head_revision()


def test_a_database_alembic_never_migrated_is_at_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert current_revision(url) is None
    with pytest.raises(ConfigError, match=r"at nothing, cardseal needs .*cardseal db upgrade"):
        check_schema(url)


def test_a_migrated_database_passes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ok.db'}"
    assert upgrade(url) == SCHEMA_HEAD
    assert current_revision(url) == SCHEMA_HEAD
    check_schema(url)


def _set_revisions(path: Path, *revisions: str) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM alembic_version")
        connection.executemany("INSERT INTO alembic_version (version_num) VALUES (?)",
                               [(r,) for r in revisions])
    connection.close()


def test_another_revision_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    upgrade(f"sqlite:///{path}")
    _set_revisions(path, "0000")
    with pytest.raises(ConfigError, match="at 0000, cardseal needs"):
        check_schema(f"sqlite:///{path}")


def test_several_revisions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "branches.db"
    upgrade(f"sqlite:///{path}")
    _set_revisions(path, SCHEMA_HEAD, "0002")
    with pytest.raises(ConfigError, match="several schema revisions"):
        check_schema(f"sqlite:///{path}")


@pytest.mark.integration
def test_postgresql_before_and_after_its_migration(postgres: PostgresServer) -> None:
    url = postgres.create_database("schema")
    assert current_revision(url) is None
    with pytest.raises(ConfigError, match="at nothing"):
        check_schema(url)
    upgrade(url)
    assert current_revision(url) == SCHEMA_HEAD
    check_schema(url)


def test_an_unreadable_database_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="unreachable"):
        current_revision(f"sqlite:///{tmp_path / 'no-such-folder' / 'x.db'}")


def test_urls_name_the_blocking_and_asyncio_drivers() -> None:
    assert sync_url("sqlite:////data/cardseal.db") == "sqlite:////data/cardseal.db"
    assert sync_url("postgresql://u:p@db/cs") == "postgresql+psycopg://u:p@db/cs"
    assert async_url("postgresql+psycopg2://db/cs") == "postgresql+psycopg://db/cs"
    with pytest.raises(ConfigError):
        sync_url("mysql://db/cs")
    with pytest.raises(ConfigError):
        async_url("sqlite:///x.db")


def test_the_gateway_does_not_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    config = init_dir(tmp_path)
    app = create_app(load_settings(config))

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the gateway started")

    with pytest.raises(ConfigError, match="cardseal db upgrade"):
        asyncio.run(start())
