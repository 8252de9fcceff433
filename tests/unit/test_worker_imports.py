"""A gateway worker on the defaults (SQLite, used tokens in it) loads no PostgreSQL driver, no
asyncio SQLAlchemy and no Redis client: together ~20 MiB of every worker's memory (issue 7's
150 MB a worker), which only a deployment that names them should carry. No worker loads Alembic
(or Mako): it checks the schema without it (``storage.schema``), ~8 MiB less."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cardseal.cli import app as cli_app

_PROBE = """
import asyncio, json, sys
from cardseal.config import load_settings
from cardseal.gateway.app import create_app

app = create_app(load_settings(sys.argv[1]))

async def main():
    async with app.router.lifespan_context(app):
        pass

asyncio.run(main())
heavy = ("psycopg", "redis", "sqlalchemy.ext.asyncio", "alembic", "mako")
print(json.dumps([m for m in heavy if m in sys.modules]))
"""


def test_a_sqlite_worker_loads_no_postgresql_redis_or_migration_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["init", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "cardseal.toml")],
                           capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == []
