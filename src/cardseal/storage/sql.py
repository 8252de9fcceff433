"""The gateway's state on SQL (SQLite by default, PostgreSQL by URL), through SQLAlchemy async.

``SqlStore`` keeps the ledger, the single-use record of tokens (``SqlReplayStore`` semantics:
reserve, release, spend, and done inside the payment's own transaction), idempotency keys and
API keys. Every database failure becomes ``StorageError`` (storage_unavailable): the gateway
fails closed. When the connection breaks while a reservation or a payment commits, the store
first looks (on a fresh connection) whether the commit landed, so that a payment the ledger holds
is not answered with a 503 (nor its token refused) just because the answer to COMMIT was lost.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, delete, event, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cardseal.errors import RequestError, StorageError, TokenError
from cardseal.storage.migrate import async_url
from cardseal.storage.models import api_keys, idempotency_keys, payments, used_tokens


def new_payment_id() -> str:
    return "pay_" + secrets.token_hex(12)


def replay_id(issuer: str, replay_key: str) -> str:
    """The stored name of a used token: a hash of (issuer, jti), never the token itself."""
    return hashlib.sha256(issuer.encode() + b"\x00" + replay_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class IdempotentReplay:
    """A finished request stored under an idempotency key: replay it byte for byte."""

    status_code: int
    body: str


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a ledger: a 201 survives power loss
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class SqlStore:
    """Ledger, replay, idempotency and API keys on one database."""

    def __init__(self, *, url: str, pool_size: int = 10, engine: AsyncEngine | None = None) -> None:
        url = async_url(url)
        if engine is None:
            options: dict[str, Any] = {"pool_pre_ping": True}
            if not url.startswith("sqlite"):
                options.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=5.0,
                               connect_args={"connect_timeout": 5})
            engine = create_async_engine(url, **options)
            if url.startswith("sqlite"):
                sync_engine: Engine = engine.sync_engine
                event.listen(sync_engine, "connect", _sqlite_pragmas)
        self.engine = engine

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.begin() as conn:
                yield conn
        except (IntegrityError, TokenError, RequestError):
            raise
        except (SQLAlchemyError, OSError, TimeoutError) as err:
            raise StorageError() from err

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(text("SELECT 1"))

    async def _landed(self, query: Select[Any]) -> bool:
        """Whether a transaction that failed with ``StorageError`` committed all the same (its
        answer was lost with the connection): ``query`` finds a row only it could have written.
        Raises ``StorageError`` when the database still cannot answer."""
        async with self._tx() as conn:
            return (await conn.execute(query)).first() is not None

    # -- single use ---------------------------------------------------------------------------

    async def reserve_token(self, rid: str, expires_at: int) -> str:
        """Reserve a token for one charge; return the payment id to charge under.

        A token given back after a retryable failure (``release_token``) is reserved again
        with the same payment id, so the processor sees the same idempotency key. Raises
        ``TokenError(token_replayed)`` if the token is spent, done or being charged.
        """
        payment_id = new_payment_id()
        try:
            async with self._tx() as conn:
                await conn.execute(insert(used_tokens).values(
                    replay_id=rid, payment_id=payment_id, state="pending", expires_at=expires_at))
            return payment_id
        except IntegrityError:
            pass
        except StorageError:
            if not await self._landed(select(used_tokens.c.replay_id).where(
                    used_tokens.c.replay_id == rid, used_tokens.c.payment_id == payment_id)):
                raise
            return payment_id  # the id is new: the reservation is this request's
        async with self._tx() as conn:
            row = (await conn.execute(
                update(used_tokens)
                .where(used_tokens.c.replay_id == rid, used_tokens.c.state == "released")
                .values(state="pending")
                .returning(used_tokens.c.payment_id)
            )).first()
        if row is None:
            raise TokenError(code="token_replayed")
        return str(row.payment_id)

    async def release_token(self, rid: str) -> None:
        """Give a reserved token back after a failure worth retrying (KMS, processor down)."""
        async with self._tx() as conn:
            await conn.execute(update(used_tokens).where(
                used_tokens.c.replay_id == rid, used_tokens.c.state == "pending"
            ).values(state="released"))

    async def spend_token(self, rid: str) -> None:
        """Mark a reserved token used for good without a payment (its card was refused)."""
        async with self._tx() as conn:
            await conn.execute(update(used_tokens).where(
                used_tokens.c.replay_id == rid).values(state="spent"))

    # -- ledger -------------------------------------------------------------------------------

    async def record_payment(self, row: dict[str, Any]) -> None:
        """Insert the payment and mark its token done, in one transaction.

        Raises ``TokenError(token_replayed)`` when the ledger already holds a payment for this
        token (a replay store outside this database lost its record of it).
        """
        try:
            async with self._tx() as conn:
                await conn.execute(insert(payments).values(**row))
                await conn.execute(update(used_tokens).where(
                    used_tokens.c.replay_id == row["replay_id"]).values(state="done"))
        except IntegrityError:
            raise TokenError(code="token_replayed") from None
        except StorageError:
            # Only this request holds the reservation that carries this payment id.
            if not await self._landed(select(payments.c.id).where(payments.c.id == row["id"])):
                raise

    async def get_payment(self, payment_id: str, issuer: str) -> dict[str, Any] | None:
        async with self._tx() as conn:
            row = (await conn.execute(select(payments).where(
                payments.c.id == payment_id, payments.c.issuer == issuer))).first()
        return dict(row._mapping) if row is not None else None

    # -- idempotency --------------------------------------------------------------------------

    async def begin_idempotent(
        self, issuer: str, key: str, request_hash: str
    ) -> IdempotentReplay | None:
        """Claim ``key`` for this request, or return the stored response to replay.

        Raises ``RequestError(idempotency_conflict)`` when the key is in flight or was used
        with another request body, ``StorageError`` on database trouble.
        """
        try:
            async with self._tx() as conn:
                await conn.execute(insert(idempotency_keys).values(
                    issuer=issuer, key=key, request_hash=request_hash, state="in_flight",
                    created_at=datetime.now(UTC)))
            return None
        except IntegrityError:
            pass
        async with self._tx() as conn:
            row = (await conn.execute(select(idempotency_keys).where(
                idempotency_keys.c.issuer == issuer, idempotency_keys.c.key == key))).first()
        if (
            row is None  # abandoned between our insert and select: the caller may retry
            or not hmac.compare_digest(row.request_hash, request_hash)
            or row.state != "done"
        ):
            raise RequestError(code="idempotency_conflict")
        return IdempotentReplay(int(row.status_code), str(row.response))

    async def finish_idempotent(self, issuer: str, key: str, status_code: int, body: str) -> None:
        async with self._tx() as conn:
            await conn.execute(update(idempotency_keys).where(
                idempotency_keys.c.issuer == issuer, idempotency_keys.c.key == key
            ).values(state="done", status_code=status_code, response=body))

    async def abandon_idempotent(self, issuer: str, key: str) -> None:
        """Forget an in-flight key whose request failed in a retryable way (5xx)."""
        async with self._tx() as conn:
            await conn.execute(delete(idempotency_keys).where(
                idempotency_keys.c.issuer == issuer, idempotency_keys.c.key == key,
                idempotency_keys.c.state == "in_flight"))

    # -- API keys -----------------------------------------------------------------------------

    async def create_api_key(self, issuer: str) -> str:
        """A new API key for ``issuer``: returned once, stored as a SHA-256 hash only."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        async with self._tx() as conn:
            await conn.execute(insert(api_keys).values(
                id=key_id, issuer=issuer, created_at=datetime.now(UTC),
                secret_hash=hashlib.sha256(secret.encode()).hexdigest()))
        return f"csk_{key_id}_{secret}"

    async def issuer_for_api_key(self, api_key: str) -> str | None:
        """The issuer an API key belongs to, or None. The hash is compared in constant time."""
        prefix, _, rest = api_key.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != "csk" or len(key_id) != 16 or not secret or len(api_key) > 128:
            return None
        async with self._tx() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        presented = hashlib.sha256(secret.encode()).hexdigest()
        expected = row.secret_hash if row is not None else "0" * 64
        if hmac.compare_digest(presented, expected) and row is not None:
            return str(row.issuer)
        return None

    async def purge_expired_tokens(self, before: int) -> int:
        """Delete single-use records of tokens that expired before ``before`` (epoch s)."""
        async with self._tx() as conn:
            result = await conn.execute(
                delete(used_tokens).where(used_tokens.c.expires_at < before))
        return int(result.rowcount or 0)
