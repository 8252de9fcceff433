"""Run the gateway under uvicorn: HTTPS with the configured certificate, N worker processes."""

from __future__ import annotations

import os
import socket
import ssl as stdlib_ssl
import sys
import tempfile
from typing import Final

import structlog
import uvicorn
from fastapi import FastAPI

from cardseal.config import Settings, database_url, load_settings
from cardseal.errors import ConfigError
from cardseal.gateway.logs import configure_logging
from cardseal.storage.schema import check_schema

_CONFIG_ENV: Final = "CARDSEAL_CONFIG"
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
SWITCH_INTERVAL: Final = 0.001
"""Seconds a thread may hold the GIL while another waits for it (CPython's default: 0.005).

The SQLite writer thread hands back the GIL while SQLite works, then waits for it to answer
the batch; under load the event loop holds it, so each of those waits ran up to the full
interval and committed batches sat unanswered. At 1 ms: ~5% more payments a second at 32
clients, measured with the benchmarks' load generator (0.5, 0.3, 0.2 and 0.1 ms gained no
more)."""


def app_from_env() -> FastAPI:
    """The uvicorn factory for each worker: settings from ``$CARDSEAL_CONFIG``."""
    from cardseal.gateway.app import create_app

    configure_logging()
    sys.setswitchinterval(SWITCH_INTERVAL)
    return create_app(load_settings(os.environ.get(_CONFIG_ENV)))


def serve(settings: Settings, config_path: str, *, host: str | None = None,
          port: int | None = None, workers: int | None = None) -> None:
    """Serve until interrupted. HTTPS unless ``gateway.insecure_http`` is set."""
    gateway = settings.gateway
    count = workers or gateway.workers
    host, port = host or gateway.host, port or gateway.port
    if not 1 <= port <= 65535:
        raise ConfigError(f"The port must be 1-65535, not {port}.")
    ssl: dict[str, str] = {}
    if not gateway.insecure_http:
        cert, key = settings.path(gateway.tls_cert), settings.path(gateway.tls_key)
        if not cert.is_file() or not key.is_file():
            raise ConfigError("gateway.tls_cert / tls_key not found; run 'cardseal init' or "
                              "set them (or insecure_http behind a TLS proxy).")
        _check_tls(str(cert), str(key))
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    # What would stop every worker at start-up, said once here in the contract's terms (exit
    # 2 and a JSON error) rather than as uvicorn's exit 3 and a traceback per worker.
    check_schema(database_url(settings))
    _check_listen(host, port)

    os.environ[_CONFIG_ENV] = str(config_path)
    if count > 1 and not os.environ.get(_MULTIPROC_ENV):
        # Prometheus multiprocess mode: each worker writes its metrics to files here.
        os.environ[_MULTIPROC_ENV] = tempfile.mkdtemp(prefix="cardseal-metrics-")
    configure_logging()
    if gateway.insecure_http:
        structlog.get_logger("cardseal.gateway").warning(
            "insecure_http",
            message="Serving PLAIN HTTP: card tokens cross the network unencrypted. Only run "
                    "this behind a TLS-terminating proxy on the same host or a private link.",
        )
    try:
        _run(host, port, count, ssl)
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # uvicorn's start-up failure (3), after its log line
            raise ConfigError("The gateway did not start; its log says why.") from None
        raise


def _check_tls(cert: str, key: str) -> None:
    try:
        stdlib_ssl.create_default_context(stdlib_ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            cert, key)
    except (stdlib_ssl.SSLError, OSError, ValueError):  # the reason could quote the key file
        raise ConfigError("gateway.tls_cert / tls_key are not a PEM certificate and its "
                          "private key.") from None


def _check_listen(host: str, port: int) -> None:
    """``ConfigError`` when ``host:port`` cannot be listened on (in use, no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        raise ConfigError(f"Cannot listen on {host}:{port} ({err.strerror or err}).") from None


def _run(host: str, port: int, workers: int, ssl: dict[str, str]) -> None:
    uvicorn.run(
        "cardseal.gateway.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
        http="cardseal.gateway.http:BoundedHttpToolsProtocol",
        # No WebSocket: with ws="auto" an Upgrade request went to the websockets library,
        # whose log line holds the request's path and query, where a careless client's
        # card number (4242%204242...) or CVV passes every redaction.
        ws="none",
        **ssl,  # type: ignore[arg-type]
    )
