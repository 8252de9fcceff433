"""The gateway's ASGI app driven in-process through ``httpx.ASGITransport``, synchronously.

Starlette's ``TestClient`` would do, but its httpx backend is deprecated (a warning, so an
error here). ``InProcessGateway`` runs the app's lifespan and every request on one event loop
in a background thread, as uvicorn would: background tasks the app starts keep running between
requests. An exception escaping the app is raised to the test, never turned into a 500.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

T = TypeVar("T")
CALL_TIMEOUT = 120.0


class InProcessGateway:
    """``with InProcessGateway(app) as gw: gw.post("/v1/payments", json=...)``."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="in-process-gateway")
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._client: httpx.AsyncClient | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the app's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    async def _start(self) -> None:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                         base_url="http://gateway.test")

    async def _stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)

    def __enter__(self) -> InProcessGateway:
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.run(self._stop())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        assert self._client is not None, "use InProcessGateway as a context manager"
        return self.run(self._client.request(method, url, **options))

    def get(self, url: str, **options: Any) -> httpx.Response:
        return self.request("GET", url, **options)

    def post(self, url: str, **options: Any) -> httpx.Response:
        return self.request("POST", url, **options)

    def post_many(self, url: str, bodies: list[Any]) -> list[httpx.Response]:
        """POST each JSON body in ``bodies`` at once (concurrent requests on the app's loop)."""
        assert self._client is not None, "use InProcessGateway as a context manager"
        client = self._client

        async def all_at_once() -> list[httpx.Response]:
            return list(await asyncio.gather(*(client.post(url, json=b) for b in bodies)))

        return self.run(all_at_once())
