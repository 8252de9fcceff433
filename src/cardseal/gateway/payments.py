"""``POST /v1/payments`` as a service: verify, reserve, decrypt at the last moment, charge,
record, forget.

Order of work for one request (each step's failure is the contract code in brackets):
1. body size and strict JSON [request_too_large, request_invalid];
2. with an ``Idempotency-Key``: claim it under the issuer whose key signed the token, or
   replay the stored response [idempotency_conflict]; a token no issuer signed never reaches
   the key (it learns nothing of it and writes nothing);
3. verify the token [token_*]; resolve amount and currency [amount_mismatch];
4. reserve the token for one charge [token_replayed];
5. decrypt ``meta_data`` and validate the card [meta_data_*, decryption_failed, kms_*, card_*],
   then charge it [processor_unavailable]; the card lives in that one call's frame. It runs in
   a worker thread when it blocks (a remote KMS call, a processor over the network); on the
   event loop when it cannot (data key cached or local, the sandbox processor): a thread
   hop costs more than the decryption;
6. record the payment and mark the token done in one transaction [storage_unavailable].
Retryable failures (KMS, processor, storage) give the token back and forget the idempotency key,
so the client's retry is charged under the same payment id (the processor's idempotency key).
Requests refused before the token was verified and reserved (token_*, request_invalid,
amount_mismatch) forget the key too: a refused request saves no result (as Stripe).

The processor gets ``processor_timeout`` seconds; a late, failed or crashed processor call is
``processor_unavailable`` (its outcome is unknown: the retry reuses the payment id). When the
database fails after the token was reserved, giving the token (or the idempotency key) back
fails too: that repair is retried in the background until the database answers, so the client's
retry is charged once the database is back (fail closed meanwhile: the token is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import structlog
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from cardseal._currencies import CURRENCIES
from cardseal._encoding import loads_strict
from cardseal.card import CardView
from cardseal.envelope import NeedsRemoteKms
from cardseal.errors import (
    CardsealError,
    ConfigError,
    ProcessorError,
    RequestError,
    StorageError,
    TokenError,
)
from cardseal.gateway.schemas import PaymentRequest
from cardseal.opener import CardOpener
from cardseal.processor.base import ChargeRequest, ChargeResult, PaymentProcessor
from cardseal.storage.replay import ReplayStore
from cardseal.storage.sql import (
    IdempotentReplay,
    IdempotentTakeover,
    ReservationInDoubtError,
    SqlStore,
    replay_id,
)
from cardseal.tokens import (
    SignedToken,
    TokenVerifier,
    VerifiedToken,
    replay_key_of,
    valid_reference,
)

_RETRYABLE = frozenset({"kms_unavailable", "processor_unavailable", "storage_unavailable"})
# Refused before the token was verified and reserved. As Stripe, such a request saves no
# idempotent result: the key is forgotten (a token whose claims are refused, expired say, is
# signed by its issuer but may be the wrong one for the key: its 401 is not the key's answer).
_NOT_SAVED = _RETRYABLE | {"request_invalid", "amount_mismatch"}
DEFAULT_PROCESSOR_TIMEOUT: Final = 10.0
MAX_PROCESSOR_TIMEOUT: Final = 300.0
# An Idempotency-Key still in flight after this long was left by a gateway that died in the
# middle of its request (a request takes at most the processor's timeout, the KMS's bounded
# retries and the database's): the same request again takes it over. See ``create``.
DEFAULT_IN_FLIGHT_TIMEOUT: Final = 900.0
MAX_IN_FLIGHT_TIMEOUT: Final = 24 * 3600.0
_IN_FLIGHT_MARGIN: Final = 120.0  # the KMS's bounded retries and the database's, and more
_PROCESSOR_THREADS: Final = 64  # processor calls in flight; more wait (within the timeout)
_REPAIR_DELAYS: Final = (0.1, 0.2, 0.5, 1.0)  # then every second, until the deadline
_MAX_REPAIRS: Final = 10_000  # pending background repairs; past that, fail closed
_IDEMPOTENCY_REPAIR_SECONDS: Final = 24 * 3600
_log = structlog.get_logger("cardseal.gateway")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to send: the status, the exact body bytes, and the outcome code for metrics."""

    status: int
    body: bytes
    code: str


def _dumps(value: Any) -> bytes:
    """A response body: compact JSON in UTF-8 (``orjson``: a tenth of ``json.dumps``'s time,
    two responses' worth per payment)."""
    return orjson.dumps(value)


def error_outcome(err: CardsealError) -> Outcome:
    return Outcome(err.http_status, _dumps(err.to_dict()), err.code)


def _payment_outcome(row: dict[str, Any]) -> Outcome:
    """The answer to the request that recorded the payment ``row``: 201 PAYMENT, or 402."""
    if row["status"] == "declined":
        error = {"error": {"code": "payment_declined", "message": "The payment was declined.",
                           "decline_code": row["decline_code"], "payment_id": row["id"]}}
        return Outcome(402, _dumps(error), "payment_declined")
    return Outcome(201, _dumps(payment_json(row)), "authorized")


def payment_json(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``PAYMENT`` from a ledger row."""
    created: datetime = row["created_at"]
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    body: dict[str, Any] = {
        "id": row["id"],
        "status": row["status"],
        "amount": row["amount"],
        "currency": row["currency"],
        "reference": row["reference"],
        "card": {
            "brand": row["card_brand"],
            "last4": row["card_last4"],
            "masked": row["card_masked"],
            "exp_month": row["card_exp_month"],
            "exp_year": row["card_exp_year"],
            "fingerprint": row["card_fingerprint"],
        },
        "issuer": row["issuer"],
        "created_at": created.astimezone(UTC).replace(tzinfo=None).isoformat("T", "seconds")
        + "Z",
    }
    if row.get("decline_code"):
        body["decline_code"] = row["decline_code"]
    return body


class PaymentService:
    def __init__(
        self,
        *,
        store: SqlStore,
        replay: ReplayStore,
        verifier: TokenVerifier,
        opener: CardOpener,
        processor: PaymentProcessor,
        fingerprint_secret: bytes,
        processor_timeout: float = DEFAULT_PROCESSOR_TIMEOUT,
        idempotency_in_flight_timeout: float = DEFAULT_IN_FLIGHT_TIMEOUT,
    ) -> None:
        if not 0 < processor_timeout <= MAX_PROCESSOR_TIMEOUT:
            raise ConfigError(f"processor.timeout must be in (0, {MAX_PROCESSOR_TIMEOUT}] s.")
        if not processor_timeout + _IN_FLIGHT_MARGIN < idempotency_in_flight_timeout <= (
                MAX_IN_FLIGHT_TIMEOUT):
            # Shorter, a retry could take over a request still running and answer for it.
            raise ConfigError(
                "gateway.idempotency_in_flight_timeout must be longer than processor.timeout "
                f"+ {_IN_FLIGHT_MARGIN:g} s and at most {MAX_IN_FLIGHT_TIMEOUT:g} s.")
        self._in_flight_timeout = idempotency_in_flight_timeout
        self._store = store
        self._replay = replay
        self._verifier = verifier
        self._opener = opener
        self._processor = processor
        self._fingerprint_secret = fingerprint_secret
        self._processor_timeout = processor_timeout
        self._processor_pool = ThreadPoolExecutor(
            max_workers=_PROCESSOR_THREADS, thread_name_prefix="cardseal-processor")
        self._repairs: set[asyncio.Task[None]] = set()
        # Tokens held ``pending`` only until a repair here gives them back (their replay ids,
        # with how many such repairs are on their way): a retry that meets one is told to
        # retry again (503), not that the token was used (409, which an Idempotency-Key keeps).
        self._giving_back: dict[str, int] = {}
        # Data keys being fetched from the KMS, by name: the charge that fetches each one.
        self._fetches: dict[Hashable, asyncio.Future[tuple[ChargeResult, CardView]]] = {}

    async def close(self) -> None:
        """Stop background repairs (their records stay as they are: fail closed) and let go
        of the processor threads."""
        for task in self._repairs:
            task.cancel()
        if self._repairs:
            await asyncio.gather(*self._repairs, return_exceptions=True)
        self._processor_pool.shutdown(wait=False, cancel_futures=True)

    async def create(self, body: bytes, idempotency_key: str | None) -> Outcome:
        try:
            # The token's JSON rules for the body too: pydantic keeps the last of duplicate
            # members, so a proxy keeping the first would see another amount than is charged.
            request = PaymentRequest.model_validate(loads_strict(body, max_bytes=len(body)))
        except ValidationError:
            return error_outcome(RequestError("The request body does not match the schema."))
        except ValueError:
            return error_outcome(RequestError("The request body is not valid JSON."))
        if request.currency is not None and request.currency.upper() not in CURRENCIES:
            return error_outcome(RequestError("Unknown currency."))
        if request.reference is not None and not valid_reference(request.reference):
            return error_outcome(RequestError("The reference holds a control character."))
        if idempotency_key is None:
            return await self._create(request)
        if not 1 <= len(idempotency_key) <= 255 or not idempotency_key.isprintable():
            return error_outcome(RequestError("Idempotency-Key must be 1-255 characters."))
        # The key is the signing issuer's: a token none of them signed is refused without
        # touching it, or anyone could tell a merchant's used keys (order-42: 409, order-43:
        # 401) and make the store write and delete a row per forged request.
        try:
            signed = self._verifier.authenticate(request.token)
        except TokenError as err:  # what verification would answer first anyway
            return error_outcome(err)
        issuer = signed.issuer.iss
        request_hash = hashlib.sha256(_dumps(request.model_dump())).hexdigest()
        try:
            stored = await self._store.begin_idempotent(
                issuer, idempotency_key, request_hash, stale_after=self._in_flight_timeout)
        except CardsealError as err:
            return error_outcome(err)
        if isinstance(stored, IdempotentReplay):
            return Outcome(stored.status_code, stored.body.encode(), "idempotent_replay")
        recorded = None
        if isinstance(stored, IdempotentTakeover):
            try:
                recorded = await self._recorded_payment(signed)
            except CardsealError as err:  # the database again: the next retry takes it over
                with contextlib.suppress(CardsealError):
                    await self._store.reopen_idempotent(issuer, idempotency_key)
                return error_outcome(err)
        if recorded is not None:  # the answer that run never gave: a replay, not a payment
            answer = _payment_outcome(recorded)
            outcome = Outcome(answer.status, answer.body, "idempotent_replay")
        else:
            outcome = await self._create(request, signed)
        if outcome.code in _NOT_SAVED or outcome.status == 401:  # 401: token_* refused
            def settle() -> Awaitable[None]:
                return self._store.abandon_idempotent(issuer, idempotency_key)
        else:
            def settle() -> Awaitable[None]:
                return self._store.finish_idempotent(
                    issuer, idempotency_key, outcome.status, outcome.body.decode())
        try:
            await settle()
        except CardsealError:
            # The request's own answer stands; the key stays in flight (a retry with it gets
            # idempotency_conflict) until the database answers again and the repair lands.
            self._repair_later(settle, time.time() + _IDEMPOTENCY_REPAIR_SECONDS)
        return outcome

    async def _recorded_payment(self, signed: SignedToken) -> dict[str, Any] | None:
        """The payment a run of this very request recorded before its gateway died, if any.

        Only for a key taken over (``IdempotentTakeover``): its stored hash proves this body,
        token included, is the one that run had, and that run verified the token before it
        could record anything; its signature is checked (``signed``), its claims are not: the
        token may have expired since. A run that died after reserving the token but before
        recording the payment leaves it refused (``token_replayed``: whether the processor
        charged is unknown)."""
        claims, issuer = signed.claims, signed.issuer.iss
        meta_data = claims.get("meta_data")
        if not isinstance(meta_data, str):
            return None
        try:
            rid = replay_id(issuer, replay_key_of(claims.get("jti"), meta_data))
        except CardsealError:  # neither a jti nor a kms-direct ciphertext
            return None
        return await self._store.payment_of_token(rid, issuer)

    async def _create(self, request: PaymentRequest, signed: SignedToken | None = None,
                      ) -> Outcome:
        """The payment, the token verified here or, ``signed`` already, its claims checked."""
        try:
            verified = (self._verifier.verify(request.token) if signed is None
                        else self._verifier.check_claims(signed))
            amount, currency, reference = self._charge_terms(verified, request)
        except CardsealError as err:
            return error_outcome(err)
        rid = replay_id(verified.issuer.iss, verified.replay_key)
        expires_at = verified.exp + self._verifier.leeway
        try:
            payment_id = await self._replay.reserve(rid, expires_at)
        except ReservationInDoubtError as err:  # give it back once the store answers again
            self._repair_later(err.undo, expires_at, giving_back=rid)
            return error_outcome(err)
        except TokenError as err:
            if err.code == "token_replayed" and rid in self._giving_back:
                return error_outcome(StorageError())  # its own reservation, not yet given back
            return error_outcome(err)
        except CardsealError as err:
            return error_outcome(err)
        try:
            if self._processor.blocking:
                result, view = await run_in_threadpool(
                    self._charge, verified, payment_id, amount, currency, reference)
            else:
                try:
                    result, view = self._charge(
                        verified, payment_id, amount, currency, reference, allow_remote=False)
                except NeedsRemoteKms as need:
                    result, view = await self._charge_fetching(
                        need.data_key, verified, payment_id, amount, currency, reference)
        except CardsealError as err:
            await self._settle_failed(rid, err, expires_at)
            return error_outcome(err)
        row = {
            "id": payment_id, "issuer": verified.issuer.iss, "status": result.status,
            "amount": amount, "currency": currency, "reference": reference,
            "card_brand": view.brand, "card_last4": view.last4, "card_masked": view.masked,
            "card_exp_month": view.exp_month, "card_exp_year": view.exp_year,
            "card_fingerprint": view.fingerprint, "decline_code": result.decline_code,
            "processor_ref": result.processor_ref, "replay_id": rid,
            "created_at": datetime.now(UTC).replace(microsecond=0),
        }
        try:
            recorded = await self._store.record_payment(row)  # an earlier run's, if it landed
        except CardsealError as err:
            await self._settle_failed(rid, err, expires_at)
            return error_outcome(err)
        try:
            await self._replay.done(rid)
        except CardsealError:
            # The payment is recorded: answer it. Never release the token now (a retry would
            # charge again); its record stays pending, which refuses it all the same.
            pass
        return _payment_outcome(row if recorded is None else recorded)

    async def _charge_fetching(
        self, data_key: Hashable | None, verified: VerifiedToken, payment_id: str, amount: int,
        currency: str, reference: str | None,
    ) -> tuple[ChargeResult, CardView]:
        """``_charge`` for a token whose data key is not in the cache: in a worker thread,
        which fetches it from the KMS. A request that misses a data key another request is
        already fetching waits for that one and then opens on the event loop (a new data key
        reaches a busy gateway in every request in flight at once: one thread does the KMS
        call while the others wait without a thread each, then finish without contending for
        the GIL). Should that fetch fail or the key not be kept, it fetches for itself."""
        args = (verified, payment_id, amount, currency, reference)
        fetching = self._fetches.get(data_key) if data_key is not None else None
        if fetching is not None:
            await asyncio.wait([fetching])
            with contextlib.suppress(NeedsRemoteKms):
                return self._charge(*args, allow_remote=False)
        call = asyncio.ensure_future(run_in_threadpool(self._charge, *args))
        if data_key is not None and data_key not in self._fetches:
            self._fetches[data_key] = call

            def forget(_: object) -> None:
                if self._fetches.get(data_key) is call:
                    del self._fetches[data_key]

            call.add_done_callback(forget)
        return await call

    def _charge_terms(
        self, verified: VerifiedToken, request: PaymentRequest
    ) -> tuple[int, str, str | None]:
        claim = verified.payment
        currency = request.currency.upper() if request.currency is not None else None
        if claim is not None:
            if (request.amount is not None and request.amount != claim.amount) or (
                currency is not None and currency != claim.currency
            ) or (request.reference is not None and claim.reference is not None
                  and request.reference != claim.reference):
                raise RequestError(code="amount_mismatch")
            return claim.amount, claim.currency, claim.reference or request.reference
        if request.amount is None or currency is None:
            raise RequestError("amount and currency are required when the token has no payment.")
        return request.amount, currency, request.reference

    def _charge(
        self, verified: VerifiedToken, payment_id: str, amount: int, currency: str,
        reference: str | None, *, allow_remote: bool = True,
    ) -> tuple[ChargeResult, CardView]:
        """Decrypt, validate, charge. The card dies with this frame."""
        card = self._opener.open_card(verified, allow_remote=allow_remote)
        result = self._call_processor(ChargeRequest(
            payment_id=payment_id, amount=amount, currency=currency, reference=reference,
            card=card))
        return result, card.view(self._fingerprint_secret)

    def _call_processor(self, request: ChargeRequest) -> ChargeResult:
        """The processor's answer within ``processor_timeout``, else ``ProcessorError``.

        Any failure of the call is ``processor_unavailable``: the outcome is unknown, and the
        retry charges under the same payment id (the processor's idempotency key). A call that
        never started is cancelled; one still running may finish, under that same id. A
        non-blocking processor is called directly (it cannot hang).
        """
        try:
            if not self._processor.blocking:
                return self._processor.charge(request)
            future = self._processor_pool.submit(self._processor.charge, request)
            try:
                return future.result(timeout=self._processor_timeout)
            except TimeoutError:
                future.cancel()
                _log.warning("processor_timeout", timeout=self._processor_timeout)
                raise ProcessorError() from None
        except CardsealError:
            raise
        except Exception as err:
            # The type only: a processor's message may quote what it was given.
            _log.warning("processor_failed", error=type(err).__name__)
            raise ProcessorError() from None

    async def _settle_failed(self, rid: str, err: CardsealError, expires_at: int) -> None:
        """Give the token back after a retryable failure; spend it after a final one."""
        retryable = err.code in _RETRYABLE

        def settle() -> Awaitable[None]:
            return self._replay.release(rid) if retryable else self._replay.spend(rid)

        try:
            await settle()
        except CardsealError:
            # The reservation stays pending: the token is refused, never charged twice. Once
            # the store answers again the repair lands (until the token expires anyway).
            self._repair_later(settle, expires_at, giving_back=rid if retryable else None)

    def _repair_later(self, operation: Callable[[], Awaitable[None]], deadline: float, *,
                      giving_back: str | None = None) -> None:
        """Retry ``operation`` in the background until it succeeds or ``deadline`` (epoch s).
        ``giving_back``: the replay id of the token it gives back (``_giving_back``)."""
        if len(self._repairs) >= _MAX_REPAIRS:
            _log.warning("repair_dropped", pending=len(self._repairs))
            return
        task = asyncio.get_running_loop().create_task(self._repair(operation, deadline))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)
        if giving_back is not None:
            self._giving_back[giving_back] = self._giving_back.get(giving_back, 0) + 1
            task.add_done_callback(lambda _task: self._given_back(giving_back))

    def _given_back(self, rid: str) -> None:
        left = self._giving_back.pop(rid) - 1
        if left:
            self._giving_back[rid] = left

    async def _repair(self, operation: Callable[[], Awaitable[None]], deadline: float) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(_REPAIR_DELAYS[min(attempt, len(_REPAIR_DELAYS) - 1)])
            attempt += 1
            try:
                await operation()
            except CardsealError:
                if time.time() >= deadline:
                    _log.warning("repair_abandoned", attempts=attempt)
                    return
                continue
            _log.info("repaired", attempts=attempt)
            return

    async def get(self, payment_id: str, issuer: str) -> dict[str, Any] | None:
        row = await self._store.get_payment(payment_id, issuer)
        return payment_json(row) if row is not None else None
