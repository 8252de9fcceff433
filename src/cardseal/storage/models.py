"""The gateway's tables (SQLAlchemy Core). Migrations in ``migrations/`` create exactly these.

No column ever holds a PAN, a CVV, a token, ``meta_data`` or a key: a payment keeps the card's
masked view and keyed fingerprint; a used token is known by a hash of (issuer, jti).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

metadata = MetaData()

payments = Table(
    "payments",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("issuer", String(255), nullable=False),
    Column("status", String(16), nullable=False),  # authorized | declined
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("reference", String(255)),
    Column("card_brand", String(16), nullable=False),
    Column("card_last4", String(4), nullable=False),
    Column("card_masked", String(19), nullable=False),
    Column("card_exp_month", SmallInteger, nullable=False),
    Column("card_exp_year", SmallInteger, nullable=False),
    Column("card_fingerprint", String(64), nullable=False),
    Column("decline_code", String(64)),
    Column("processor_ref", String(64)),
    Column("replay_id", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_payments_issuer_created", "issuer", "created_at"),
)

# The single-use record of each token. state: pending (being charged), released (a retryable
# failure gave the token back), spent (rejected for good: bad card), done (payment recorded).
used_tokens = Table(
    "used_tokens",
    metadata,
    Column("replay_id", String(64), primary_key=True),
    Column("payment_id", String(40), nullable=False),
    Column("state", String(16), nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("issuer", String(255), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # in_flight | done
    Column("status_code", Integer),
    Column("response", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("issuer", String(255), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
