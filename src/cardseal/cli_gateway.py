"""Gateway commands of ``cardseal``: ``serve``, ``pay``, ``apikey create``, ``db upgrade``."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from typing import Annotated, Any, Final

import httpx
import typer

from cardseal.cli import (
    ConfigOption,
    _state,
    app,
    emit,
    guarded,
    payment_option,
    read_card,
    settings,
)
from cardseal.config import build_sealer, database_url
from cardseal.errors import ConfigError, RequestError, exit_code_for

_GATEWAY_UNREACHABLE: Final = 7
_PAY_ATTEMPTS: Final = 3
_MAX_RETRY_WAIT: Final = 5.0

apikey_app = typer.Typer(help="API keys for GET /v1/payments/{id}.", no_args_is_help=True)
db_app = typer.Typer(help="The gateway's database.", no_args_is_help=True)
app.add_typer(apikey_app, name="apikey")
app.add_typer(db_app, name="db")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (gateway.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (gateway.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the gateway: HTTPS on 127.0.0.1:8443 by default."""
    from cardseal.gateway.server import serve as run

    s = guarded(lambda: settings(config))
    path = config or _state["config"] or "cardseal.toml"
    guarded(lambda: run(s, path, host=host, port=port, workers=workers))


def _payments_url(base: str, *, option: bool) -> str:
    """``base`` + ``/v1/payments`` when ``base`` is an http(s) URL of a host (checked before
    anything is sealed); else ``request_invalid`` for ``--gateway``, ``config_invalid`` for
    ``client.gateway_url``."""
    try:
        url = httpx.URL(base.rstrip("/") + "/v1/payments")
    except httpx.InvalidURL:  # a control character, a bad port
        url = None
    if (url is None or url.scheme not in ("http", "https") or not url.host or url.query
            or url.fragment):
        if option:
            raise RequestError("--gateway must be the gateway's http:// or https:// URL.")
        raise ConfigError("client.gateway_url must be the gateway's http:// or https:// URL.")
    return str(url)


def _post(url: str, body: dict[str, Any], headers: dict[bytes, bytes],
          verify: bool | ssl.SSLContext) -> httpx.Response:
    """POST with the same Idempotency-Key, retrying connection failures and 503s. ``verify``
    is an SSL context, never a CA path (httpx deprecates ``verify=<path>``)."""
    last: Exception | None = None
    with httpx.Client(verify=verify, timeout=httpx.Timeout(30.0, connect=5.0)) as client:
        for attempt in range(_PAY_ATTEMPTS):
            try:
                response = client.post(url, json=body, headers=headers)
            except httpx.TransportError as err:
                last = err
                time.sleep(min(2.0**attempt, _MAX_RETRY_WAIT))
                continue
            if response.status_code != 503 or attempt == _PAY_ATTEMPTS - 1:
                return response
            wait = response.headers.get("retry-after", "1")
            time.sleep(min(float(wait) if wait.isdigit() else 1.0, _MAX_RETRY_WAIT))
    raise ConnectionError("gateway unreachable") from last


@app.command()
def pay(
    amount: Annotated[int, typer.Option(help="Amount in minor units.")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code, e.g. USD.")],
    reference: Annotated[str | None, typer.Option(help="Your order reference.")] = None,
    gateway: Annotated[str | None, typer.Option(help="Gateway base URL.")] = None,
    cacert: Annotated[str | None, typer.Option(help="CA bundle (PEM) to trust.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Idempotency-Key to send.")] = None,
    config: ConfigOption = None,
) -> None:
    """Card JSON on stdin -> seal -> POST /v1/payments -> the payment."""

    def prepare() -> tuple[str, dict[str, Any], dict[bytes, bytes], ssl.SSLContext | bool]:
        s = settings(config)
        payment = payment_option(amount, currency, reference)
        if payment is None:  # pragma: no cover - typer requires amount and currency
            raise RequestError("--amount and --currency are required.")
        if idempotency_key is not None and not (
                1 <= len(idempotency_key) <= 255 and idempotency_key.isprintable()):
            raise RequestError("--idempotency-key must be 1-255 printable characters.")
        url = _payments_url(s.client.gateway_url if gateway is None else gateway,
                            option=gateway is not None)
        verify: ssl.SSLContext | bool = True
        if url.startswith("https://"):
            ca = cacert or str(s.path(s.client.gateway_cacert))
            try:
                verify = ssl.create_default_context(cafile=ca)
            except (OSError, ValueError):  # ssl.SSLError is an OSError
                raise ConfigError(f"The CA bundle {ca} cannot be read as PEM.") from None
        token = build_sealer(s).seal(read_card(), payment=payment)
        body = {"token": token, "amount": payment.amount, "currency": payment.currency}
        if reference is not None:
            body["reference"] = reference
        key = idempotency_key or "pay-" + secrets.token_urlsafe(16)
        return url, body, {b"Idempotency-Key": key.encode()}, verify  # UTF-8, as read

    url, body, headers, verify = guarded(prepare)
    try:
        response = _post(url, body, headers, verify)
    except (ConnectionError, httpx.HTTPError, OSError):
        typer.echo(json.dumps({"error": {"code": "gateway_unreachable",
                                         "message": f"Cannot reach the gateway at {url}."}}),
                   err=True)
        raise typer.Exit(_GATEWAY_UNREACHABLE) from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": {"code": "gateway_error", "message": "The answer is not JSON."}}
    if response.status_code in (200, 201):
        emit(answer)
        return
    typer.echo(json.dumps(answer), err=True)
    code = answer.get("error", {}).get("code") if isinstance(answer, dict) else None
    if response.status_code >= 500 or not isinstance(code, str):
        raise typer.Exit(_GATEWAY_UNREACHABLE)
    try:
        raise typer.Exit(exit_code_for(code))
    except KeyError:
        raise typer.Exit(_GATEWAY_UNREACHABLE) from None


@apikey_app.command("create")
def apikey_create(
    issuer: Annotated[str, typer.Option(help="The issuer (iss) the key may read.")],
    config: ConfigOption = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from cardseal.storage.sql import SqlStore

    def body() -> str:
        s = settings(config)
        if issuer not in {i.iss for i in s.issuers}:
            raise RequestError(f"No [[issuers]] entry has iss = {issuer!r}.")

        async def create() -> str:
            store = SqlStore(url=database_url(s),
                             server_timeouts=s.gateway.database_server_timeouts)
            try:
                return await store.create_api_key(issuer)
            finally:
                await store.close()

        return asyncio.run(create())

    emit({"api_key": guarded(body), "issuer": issuer})


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the database schema to the newest revision."""
    from cardseal.storage.migrate import upgrade

    revision = guarded(lambda: upgrade(database_url(settings(config))))
    emit({"database": "ok", "revision": revision})
