"""The gateway's FastAPI app, built by ``create_app(settings)``; nothing connects at import.

Every error leaves as the contract's body ``{"error": {"code", "message"}}``; FastAPI's default
validation error (which echoes the input) is replaced by ``request_invalid``; 503s carry
``Retry-After``. While the app runs, single-use records of expired tokens are purged every
``purge_interval`` seconds, in short transactions (an expired token is refused before its
record is ever read).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final

import structlog
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cardseal.config import (
    Settings,
    build_issuer_policies,
    build_opener,
    build_providers,
    build_verifier,
    database_url,
    fingerprint_secret,
)
from cardseal.errors import CardsealError, RequestError, StorageError
from cardseal.gateway.heap import trim_heap_forever
from cardseal.gateway.metrics import Metrics
from cardseal.gateway.payments import Outcome, PaymentService, error_outcome
from cardseal.gateway.schemas import ErrorBody, HealthOut, PaymentOut, PaymentRequest
from cardseal.processor.base import PaymentProcessor
from cardseal.processor.sandbox import SandboxProcessor
from cardseal.storage.replay import build_replay_store
from cardseal.storage.schema import check_schema
from cardseal.storage.sql import SqlStore

RETRY_AFTER_SECONDS: Final = "2"
_PAYMENT_ID: Final = re.compile(r"pay_[0-9A-Za-z]{1,36}")  # new_payment_id: 36 hex digits
PURGE_INTERVAL_SECONDS: Final = 600.0
_JSON: Final = "application/json"
_log = structlog.get_logger("cardseal.gateway")

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "request_invalid, meta_data_malformed, decryption_failed, kms_key_not_allowed, "
              "amount_mismatch"),
        (401, "token_* codes, unauthorized"),
        (402, "payment_declined (with decline_code and payment_id)"),
        (404, "not_found"),
        (409, "token_replayed, idempotency_conflict"),
        (413, "request_too_large"),
        (422, "card_number_invalid, card_expired, card_cvv_invalid, card_brand_unsupported"),
        (503, "kms_unavailable, processor_unavailable, storage_unavailable (Retry-After)"),
    )
}


def _send(outcome: Outcome) -> Response:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if outcome.status == 503 else None
    return Response(outcome.body, status_code=outcome.status, media_type=_JSON, headers=headers)


def _error(err: CardsealError) -> Response:
    return _send(error_outcome(err))


def _utf8(value: str | None) -> str | None:
    """A header value as the UTF-8 text its bytes hold (Starlette reads them as latin-1, so
    ``clé`` arrived as ``clÃ©``); "" for bytes that are no UTF-8 (refused as no text)."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return ""


def _route_of(path: str) -> str:
    if path.startswith("/v1/payments/"):
        return "/v1/payments/{id}"
    if path in ("/v1/payments", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        return path
    return "other"


class _RequestMetrics:
    """Counts and times HTTP requests by route, method and status; each label set's children
    are made once (``labels()`` takes a lock and builds a key on every call)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, status)
        children = self._children.get(labels)
        if children is None:  # bounded: few routes, methods and statuses
            children = (self._metrics.requests.labels(route, method, str(status)),
                        self._metrics.latency.labels(route))
            if len(self._children) < 1024:
                self._children[labels] = children
        children[0].inc()
        children[1].observe(seconds)


class _Observe:
    """Counts and times every HTTP request FastAPI serves, by route and status (pure ASGI:
    Starlette's ``BaseHTTPMiddleware`` costs a task group and two memory streams per
    request). ``_PaymentsEndpoint`` does the same for the requests it takes first."""

    def __init__(self, app: ASGIApp, *, requests: _RequestMetrics) -> None:
        self._app = app
        self._requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"]
        if method == "HEAD":  # a GET without its body (RFC 9110 9.3.2): uvicorn drops the body
            scope = {**scope, "method": "GET"}
        try:
            await self._app(scope, receive, observed)
        finally:
            self._requests.observe(_route_of(scope["path"]), method, status,
                                   time.perf_counter() - start)


async def _read_body(
    chunks: AsyncIterator[bytes], declared: str | None, max_body: int
) -> bytes | None:
    """The request body, or None when it is larger than ``max_body`` (as declared by
    ``Content-Length`` or as it streams in: reading stops at the limit)."""
    if declared is not None and (not declared.isdigit() or int(declared) > max_body):
        return None
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_body:
            return None
    return bytes(body)


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: what came is all there is
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


_PAYMENTS_ROUTE: Final = "/v1/payments"
_JSON_HEADER: Final = (b"content-type", b"application/json")
_RETRY_HEADER: Final = (b"retry-after", RETRY_AFTER_SECONDS.encode())


class _PaymentsEndpoint:
    """``POST /v1/payments`` as a plain ASGI handler, called by ``GatewayApp`` before the rest
    of the app: it counts and times the request itself, as ``_Observe`` does for every other.

    FastAPI's stack (its telemetry check, Starlette's error, telemetry and body-limit
    middleware, routing, dependency solving, the ``Response`` object) costs ~100 us of
    event-loop CPU a payment, a fifth of what a payment costs (measured in-process). The
    operation is still declared on the FastAPI app, which documents it (``/openapi.json``)
    and serves it the same way (``take``) where this handler is not in front. An exception
    escaping ``take`` (none is expected) reaches uvicorn, which answers 500 and logs it, as
    Starlette's error middleware would.
    """

    def __init__(self, *, take: Callable[[Headers, AsyncIterator[bytes]], Awaitable[Outcome]],
                 requests: _RequestMetrics) -> None:
        self._take = take
        self._requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # unless an outcome comes
        try:
            outcome = await self._take(Headers(scope=scope), _body_chunks(receive))
            status = outcome.status
            headers = [_JSON_HEADER, (b"content-length", str(len(outcome.body)).encode())]
            if status == 503:
                headers.append(_RETRY_HEADER)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": outcome.body})
        finally:
            self._requests.observe(_PAYMENTS_ROUTE, "POST", status, time.perf_counter() - start)


class GatewayApp(FastAPI):
    """The FastAPI app, with ``POST /v1/payments`` handed to ``payments`` (when set) before
    FastAPI's own stack: the one request a gateway serves by the thousand goes straight to
    its handler; everything else, the FastAPI route of that operation included, is FastAPI's.
    """

    payments: _PaymentsEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        payments = self.payments
        if (payments is not None and scope["type"] == "http"
                and scope["path"] == _PAYMENTS_ROUTE and scope["method"] == "POST"):
            await payments(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    processor: PaymentProcessor | None = None,
    check_migrations: bool = True,
    purge_interval: float = PURGE_INTERVAL_SECONDS,
) -> GatewayApp:
    """Build the gateway for ``settings``. Connections open in the app's lifespan."""
    providers = build_providers(settings)
    policies = build_issuer_policies(settings)
    opener = build_opener(settings, policies, providers)
    store = SqlStore(url=database_url(settings), pool_size=settings.gateway.database_pool_size,
                     server_timeouts=settings.gateway.database_server_timeouts)
    replay = build_replay_store(settings.gateway.replay_store, store)
    service = PaymentService(
        store=store,
        replay=replay,
        verifier=build_verifier(settings, policies),
        opener=opener,
        processor=processor or SandboxProcessor(),
        fingerprint_secret=fingerprint_secret(settings),
        processor_timeout=settings.processor.timeout,
        idempotency_in_flight_timeout=settings.gateway.idempotency_in_flight_timeout,
    )
    metrics = Metrics(providers, opener.envelope)
    max_body = settings.gateway.max_body_bytes
    kms_keys = sorted({key for policy in policies for key in policy.allowed_kms_keys})

    async def purge_expired() -> None:
        while True:
            await asyncio.sleep(purge_interval)
            try:
                purged = await store.purge_expired_tokens(int(time.time()))
            except CardsealError:
                _log.warning("purge_failed")  # the next round tries again
                continue
            _log.info("purged_expired_tokens", count=purged)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if check_migrations:
            check_schema(database_url(settings))
        # What start-up built lives as long as the worker: out of the collector's sight, a
        # full collection no longer walks it (pauses that showed as p99 spikes under load).
        gc.collect()
        gc.freeze()
        _log.info("gateway_started", issuers=[p.iss for p in policies])
        loop = asyncio.get_running_loop()
        background = [loop.create_task(purge_expired()), loop.create_task(trim_heap_forever())]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await service.close()
            await replay.close()
            await store.close()
            gc.unfreeze()

    app = GatewayApp(
        title="cardseal gateway",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # No 307 to the path without its trailing slash (Starlette's default): an unknown
        # path is the contract's 404, and no Location is built from the request's Host.
        redirect_slashes=False,
        description="Takes sealed card tokens and charges them. See CONTRACT.md section 5.",
    )
    app.state.store = store
    app.state.metrics = metrics
    app.state.providers = providers

    outcome_counters: dict[str, Any] = {}

    async def take_payment(headers: Headers, chunks: AsyncIterator[bytes]) -> Outcome:
        body = await _read_body(chunks, headers.get("content-length"), max_body)
        outcome = (error_outcome(RequestError(code="request_too_large")) if body is None
                   else await service.create(body, _utf8(headers.get("idempotency-key"))))
        counter = outcome_counters.get(outcome.code)
        if counter is None:  # the contract's codes: a bounded set
            counter = outcome_counters[outcome.code] = metrics.outcomes.labels(outcome.code)
        counter.inc()
        _log.info("payment", outcome=outcome.code, status=outcome.status)
        return outcome

    requests = _RequestMetrics(metrics)
    app.payments = _PaymentsEndpoint(take=take_payment, requests=requests)
    app.add_middleware(_Observe, requests=requests)  # counts every other request

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, _exc: RequestValidationError) -> Response:
        return _error(RequestError("The request does not match the schema."))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error(CardsealError(code="not_found"))
        body = {"error": {"code": "request_invalid", "message": "Method or request not allowed."}}
        headers = dict(exc.headers or {})  # a 405's Allow; HEAD goes wherever GET does
        if "GET" in headers.get("Allow", "").split(", "):
            headers["Allow"] += ", HEAD"
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(CardsealError)
    async def _cardseal(_request: Request, exc: CardsealError) -> Response:
        return _error(exc)

    @app.post(
        "/v1/payments",
        status_code=201,
        response_model=PaymentOut,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {"required": True, "content": {_JSON: {
                "schema": PaymentRequest.model_json_schema(
                    ref_template="#/components/schemas/{model}")
            }}},
            # Read from the headers directly (a FastAPI Header parameter costs a dependency
            # resolution per request); PaymentService checks its length and characters.
            "parameters": [{
                "name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                           "title": "Idempotency-Key"},
            }],
        },
    )
    async def create_payment(request: Request) -> Response:
        """Charge the card sealed in ``token``. See the contract for every error code."""
        # Served by ``_PaymentsEndpoint`` in front of the router; this route documents the
        # operation and serves it the same way wherever that middleware is not in front.
        return _send(await take_payment(request.headers, request.stream()))

    @app.get("/v1/payments/{payment_id}", response_model=PaymentOut,
             responses={401: _ERRORS[401], 404: _ERRORS[404], 503: _ERRORS[503]})
    async def get_payment(
        payment_id: str,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """A payment of the API key's issuer; 404 for unknown and other issuers' alike."""
        # No length bound on the header here: an over-long value is no API key (401), not an
        # undocumented 400 (issuer_for_api_key refuses anything over 128 characters unread).
        scheme, _, api_key = (authorization or "").partition(" ")
        issuer = (await store.issuer_for_api_key(api_key) if scheme.lower() == "bearer"
                  else None)  # an auth scheme's name is case-insensitive (RFC 9110 11.1)
        if issuer is None:
            response = _error(CardsealError(code="unauthorized"))
            response.headers["WWW-Authenticate"] = "Bearer"  # as RFC 9110 11.6.1 asks of a 401
            return response
        # Only what a payment id can be reaches the database: PostgreSQL refuses a NUL in
        # text with an error, which is no storage outage but an unknown payment.
        payment = (await service.get(payment_id, issuer)
                   if _PAYMENT_ID.fullmatch(payment_id) else None)
        if payment is None:
            return _error(CardsealError(code="not_found"))
        return JSONResponse(payment)

    @app.get("/healthz", response_model=HealthOut)
    async def healthz() -> dict[str, Any]:
        """Alive."""
        return {"status": "ok", "checks": {}}

    @app.get("/readyz", response_model=HealthOut, responses={503: _ERRORS[503]})
    async def readyz() -> Response:
        """Ready: the database (ledger and replay store) answers and the KMS answers for every
        allowed key (one cheap call each, e.g. DescribeKey; no decryption)."""
        try:
            await store.ping()
            await replay.ping()
        except StorageError as err:
            return _error(err)
        try:
            for key in kms_keys:
                await run_in_threadpool(providers.check, key)  # blocking clients: off the loop
        except CardsealError:
            return _error(CardsealError(code="kms_unavailable"))
        return JSONResponse({"status": "ready",
                             "checks": {"database": "ok", "replay_store": "ok", "kms": "ok"}})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus"}})
    async def prometheus() -> Response:
        """Prometheus exposition format."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app

