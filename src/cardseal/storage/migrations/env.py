"""Alembic environment: runs on the connection that ``cardseal.storage.migrate`` hands it."""

from alembic import context

from cardseal.storage.models import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
