"""The first schema: payments, used tokens, idempotency keys, API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payments",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("issuer", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reference", sa.String(255)),
        sa.Column("card_brand", sa.String(16), nullable=False),
        sa.Column("card_last4", sa.String(4), nullable=False),
        sa.Column("card_masked", sa.String(19), nullable=False),
        sa.Column("card_exp_month", sa.SmallInteger, nullable=False),
        sa.Column("card_exp_year", sa.SmallInteger, nullable=False),
        sa.Column("card_fingerprint", sa.String(64), nullable=False),
        sa.Column("decline_code", sa.String(64)),
        sa.Column("processor_ref", sa.String(64)),
        sa.Column("replay_id", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_payments_issuer_created", "payments", ["issuer", "created_at"])
    op.create_table(
        "used_tokens",
        sa.Column("replay_id", sa.String(64), primary_key=True),
        sa.Column("payment_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_used_tokens_expires_at", "used_tokens", ["expires_at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("issuer", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("response", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("issuer", sa.String(255), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_used_tokens_expires_at", "used_tokens")
    op.drop_table("used_tokens")
    op.drop_index("ix_payments_issuer_created", "payments")
    op.drop_table("payments")
