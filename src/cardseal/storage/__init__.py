"""Where the gateway keeps state: the ledger, used tokens, idempotency keys, API keys."""

from cardseal.storage.sql import IdempotentReplay, SqlStore, new_payment_id, replay_id

__all__ = ["IdempotentReplay", "SqlStore", "new_payment_id", "replay_id"]
