"""Alembic migrations, run programmatically (``cardseal init``, ``cardseal db upgrade``).

Only those commands import this module (and so Alembic); the gateway's workers check the schema
through ``storage.schema``, which needs none of it.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError

from cardseal.errors import ConfigError, StorageError
from cardseal.storage.schema import sync_url

_MIGRATIONS = Path(__file__).with_name("migrations")


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
