"""What a gateway worker knows of the schema, without Alembic: the URLs its drivers take, the
newest revision, and the check it makes when it starts.

Alembic (and Mako under it) lives in ``storage.migrate``, which only ``cardseal init`` and
``cardseal db upgrade`` import: kept out of the workers, it saves each of them about 8 MiB of
resident memory (issue 7 allows 150 MB a worker; see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cardseal.errors import ConfigError, StorageError

SCHEMA_HEAD: Final = "0001"
"""The newest migration's revision (``migrations/versions``); a test holds it equal to the head
Alembic finds there, so a new migration cannot ship without it."""

VERSION_TABLE: Final = "alembic_version"
"""Where Alembic records the revision a database is at (one row, column ``version_num``)."""


def sync_url(url: str) -> str:
    """The URL for a blocking driver: pysqlite or psycopg 3."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError("database_url must be sqlite:///FILE or postgresql://...")


def async_url(url: str) -> str:
    """The URL for psycopg 3's asyncio driver. PostgreSQL only: SQLite needs none, the
    gateway's SQLite writes run in a thread of their own (``storage.sqlite_writer``)."""
    parsed = make_url(sync_url(url))
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("An asyncio driver is used for PostgreSQL only.")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def current_revision(url: str) -> str | None:
    """The revision Alembic recorded in the database at ``url``; None for a database it never
    migrated. ``StorageError`` when the database cannot be read."""
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table(VERSION_TABLE):
                return None
            query = text(f"SELECT version_num FROM {VERSION_TABLE}")  # noqa: S608 - a constant
            revisions = list(connection.execute(query).scalars())
    except SQLAlchemyError as err:
        raise StorageError("The database is unreachable.") from err
    finally:
        engine.dispose()
    if len(revisions) > 1:  # Alembic's branches: cardseal's migrations are one line
        raise ConfigError("The database records several schema revisions; cardseal has one.")
    return str(revisions[0]) if revisions else None


def check_schema(url: str) -> None:
    """Raise ``ConfigError`` unless the database is at the newest schema."""
    current = current_revision(url)
    if current != SCHEMA_HEAD:
        raise ConfigError(
            f"The database schema is at {current or 'nothing'}, cardseal needs {SCHEMA_HEAD}: "
            "run 'cardseal db upgrade' first."
        )
