"""A small fault-injecting HTTP proxy in front of the KMS emulator.

KMS speaks awsJson1_1: ``POST /`` with ``X-Amz-Target: TrentService.<Operation>`` and a JSON
body; errors are ``{"__type": "<Code>", "message": ...}`` with a 4xx/5xx status. The proxy
forwards each request to the emulator unless a fault is set:

- ``down()`` / ``up()``: stop listening (connection refused) and listen again on the same port;
- ``fault = "slow"``: hold each request ``delay`` seconds before forwarding it;
- ``fault = "throttle"``: answer ``400 ThrottlingException`` (what KMS says past its quota);
- ``fault = "error500"``: answer ``500 KMSInternalException``.

``responders[op]`` can answer an operation itself (to emulate what the emulator lacks) and
``rewriters[op]`` can change the emulator's answer. ``attempts`` counts every request received
per operation, retries included. The proxy speaks HTTP/1.0, one connection per request, so that
``down()`` really refuses every next attempt.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Reply = tuple[int, dict[str, Any]]
Responder = Callable[[dict[str, Any]], Reply | None]
Rewriter = Callable[[dict[str, Any], int, dict[str, Any]], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: KmsProxy


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
        proxy.record(operation)
        try:
            self._reply(*proxy.answer(operation, body, dict(self.headers.items())))
        except OSError:  # the client gave up (read timeout): nobody to answer
            pass

    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class KmsProxy:
    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self._upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.fault: str | None = None
        self.delay = 0.0
        self.attempts: Counter[str] = Counter()
        self.responders: dict[str, Responder] = {}
        self.rewriters: dict[str, Rewriter] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def heal(self) -> None:
        """No fault, listening."""
        self.fault, self.delay = None, 0.0
        if self._server is None:
            self.up()

    def record(self, operation: str) -> None:
        with self._lock:
            self.attempts[operation] += 1

    def reset(self) -> None:
        with self._lock:
            self.attempts.clear()

    # -- answers ------------------------------------------------------------------------------

    def answer(self, operation: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.fault == "throttle":
            return _error(400, "ThrottlingException", "Rate exceeded")
        if self.fault == "error500":
            return _error(500, "KMSInternalException", "Internal failure")
        if self.fault == "slow":
            time.sleep(self.delay)
        request = json.loads(body or b"{}")
        responder = self.responders.get(operation)
        reply = responder(request) if responder is not None else None
        if reply is not None:
            return reply[0], json.dumps(reply[1]).encode()
        status, payload = self._forward(body, headers)
        rewriter = self.rewriters.get(operation)
        if rewriter is not None:
            status, document = rewriter(request, status, json.loads(payload or b"{}"))
            payload = json.dumps(document).encode()
        return status, payload

    def _forward(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            skip = {"host", "connection", "content-length"}
            connection.request("POST", "/", body,
                               {k: v for k, v in headers.items() if k.lower() not in skip})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self.down()


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"__type": code, "message": message}).encode()


def error_reply(status: int, code: str, message: str = "") -> Reply:
    """A KMS error document, for responders and rewriters."""
    return status, {"__type": code, "message": message}
