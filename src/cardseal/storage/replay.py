"""Single-use records of tokens: ``SqlReplayStore`` (the default, on the ledger's database) and
``RedisReplayStore`` (``SET NX`` with the token's expiry, for several gateway instances).

A record moves ``pending`` -> ``done`` (payment recorded), ``spent`` (refused for good) or
``released`` (a retryable failure gave the token back; the next try reuses the payment id).
Both stores fail closed: when they cannot answer, the request gets ``storage_unavailable``.

A Redis replay store is named by a redis-py URL whose fragment, if any, is the key prefix:
``redis://host:6379/0#payments-eu:`` keeps records under ``payments-eu:<hash>`` (default
``cardseal:used:``). The fragment never reaches Redis, so the same URL works in redis-py tools.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from cardseal.errors import ConfigError, StorageError, TokenError
from cardseal.storage.sql import ReservationInDoubtError, SqlStore, new_payment_id

if TYPE_CHECKING:  # imported where a Redis replay store is configured: ~6 MiB a worker
    import redis.asyncio as aioredis

DEFAULT_REDIS_PREFIX: Final = "cardseal:used:"
_MAX_PREFIX: Final = 100


class ReplayStore(ABC):
    @abstractmethod
    async def reserve(self, rid: str, expires_at: int) -> str:
        """Reserve the token; return the payment id to charge under, or raise
        ``TokenError(token_replayed)``."""

    @abstractmethod
    async def release(self, rid: str) -> None: ...

    @abstractmethod
    async def spend(self, rid: str) -> None: ...

    @abstractmethod
    async def done(self, rid: str) -> None:
        """The payment is recorded (the SQL store did this inside the payment's transaction)."""

    @abstractmethod
    async def ping(self) -> None: ...

    async def close(self) -> None:
        return None


class SqlReplayStore(ReplayStore):
    """Used tokens in the ledger's database: marked done atomically with the payment row."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    async def reserve(self, rid: str, expires_at: int) -> str:
        return await self._store.reserve_token(rid, expires_at)

    async def release(self, rid: str) -> None:
        await self._store.release_token(rid)

    async def spend(self, rid: str) -> None:
        await self._store.spend_token(rid)

    async def done(self, rid: str) -> None:
        return None

    async def ping(self) -> None:
        await self._store.ping()


# KEYS[1] = record; ARGV[1] = from state, ARGV[2] = to state. Returns the payment id or nil.
_TRANSITION: Final = """
local value = redis.call('GET', KEYS[1])
if not value then return nil end
local sep = string.find(value, ':', 1, true)
if ARGV[1] ~= '*' and string.sub(value, 1, sep - 1) ~= ARGV[1] then return nil end
local pid = string.sub(value, sep + 1)
redis.call('SET', KEYS[1], ARGV[2] .. ':' .. pid, 'KEEPTTL')
return pid
"""


# KEYS[1] = record; ARGV[1] = the payment id a reservation in doubt was made under. Deletes
# it while it is still that reservation: nothing was charged under it (its request answered
# 503), and the client's retry reserves the token afresh under a new payment id, which a
# repeated undo (its own answer lost) never matches.
_UNDO: Final = """
if redis.call('GET', KEYS[1]) == 'pending:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"""


class RedisReplayStore(ReplayStore):
    """Used tokens in Redis: key = prefix + hash(issuer, jti), expiring at the token's ``exp``
    plus leeway (``SET NX EXAT``); state changes are atomic Lua scripts."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_REDIS_PREFIX, timeout: float = 2.0,
                 client: aioredis.Redis | None = None) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._failures = (RedisError, OSError, TimeoutError)
        # Sent and not answered: applied or not, nobody knows (a refused connection sent
        # nothing, and leaves nothing to give back).
        self._unanswered = (RedisTimeoutError, TimeoutError)
        self._client: aioredis.Redis = client or aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=30, retry_on_timeout=False)
        self._prefix = prefix
        self._transition: Any = self._client.register_script(_TRANSITION)
        self._undo: Any = self._client.register_script(_UNDO)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except self._failures as err:
            raise StorageError() from err

    async def reserve(self, rid: str, expires_at: int) -> str:
        key = self._prefix + rid
        payment_id = new_payment_id()
        try:
            landed = await self._client.set(key, "pending:" + payment_id, nx=True,
                                            exat=expires_at)
        except self._unanswered as err:  # sent, perhaps applied, its answer lost
            async def undo() -> None:
                await self._call(self._undo(keys=[key], args=[payment_id]))

            raise ReservationInDoubtError(undo) from err
        except self._failures as err:
            raise StorageError() from err
        if landed:
            return payment_id
        reused = await self._call(self._transition(keys=[key], args=["released", "pending"]))
        if reused is None:
            raise TokenError(code="token_replayed")
        return reused.decode() if isinstance(reused, bytes) else str(reused)

    async def release(self, rid: str) -> None:
        await self._call(self._transition(keys=[self._prefix + rid], args=["pending", "released"]))

    async def spend(self, rid: str) -> None:
        await self._call(self._transition(keys=[self._prefix + rid], args=["*", "spent"]))

    async def done(self, rid: str) -> None:
        await self._call(self._transition(keys=[self._prefix + rid], args=["*", "done"]))

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()


def split_redis_spec(spec: str) -> tuple[str, str]:
    """``(URL for redis-py, key prefix)`` of a ``redis://...#prefix`` replay store setting.

    Raises ``ConfigError`` for a prefix that is empty after ``#``, too long or not printable.
    """
    url, hash_sign, fragment = spec.partition("#")  # where urllib starts the fragment too
    if not hash_sign:
        return url, DEFAULT_REDIS_PREFIX
    prefix = unquote(fragment)
    if not 0 < len(prefix) <= _MAX_PREFIX or not prefix.isprintable() or " " in prefix:
        raise ConfigError("The key prefix after '#' in gateway.replay_store must be 1-100 "
                          "printable characters without spaces.")
    return url, prefix


def build_replay_store(spec: str, store: SqlStore) -> ReplayStore:
    """``database`` (the default) or a ``redis://`` / ``rediss://`` / ``unix://`` URL, with an
    optional ``#prefix`` for the keys."""
    if spec == "database":
        return SqlReplayStore(store)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        url, prefix = split_redis_spec(spec)
        return RedisReplayStore(url, prefix=prefix)
    raise ConfigError("gateway.replay_store must be 'database' or a redis:// URL.")
