"""Database URLs and Alembic migrations, run programmatically (``cardseal db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cardseal.errors import ConfigError, StorageError

_MIGRATIONS = Path(__file__).with_name("migrations")


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


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def upgrade(url: str) -> str:
    """Migrate the database at ``url`` to the newest schema; return that revision."""
    config = _alembic_config()
    engine = create_engine(sync_url(url))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as err:
        raise StorageError("The database could not be migrated.") from err
    finally:
        engine.dispose()
    return head_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise ConfigError("No migrations found.")
    return head


def current_revision(url: str) -> str | None:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as err:
        raise StorageError("The database is unreachable.") from err
    finally:
        engine.dispose()


def check_schema(url: str) -> None:
    """Raise ``ConfigError`` unless the database is at the newest schema."""
    current, head = current_revision(url), head_revision()
    if current != head:
        raise ConfigError(
            f"The database schema is at {current or 'nothing'}, cardseal needs {head}: "
            "run 'cardseal db upgrade' first."
        )
