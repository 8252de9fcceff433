"""Two FastAPI apps served like the gateway (uvicorn, same TLS, same workers), for row 4.

``floor_app``: the HTTP floor. ``POST /v1/payments`` reads the body, takes ``token`` and
verifies it with PyJWT (RS256, audience and issuer; the public key loaded once as a key
object), then answers 201. No database, no decryption: what any JWT endpoint costs.

``seed_app``: the seed's server logic in the same shell. The body's ``token`` goes through
``SeedServer.process_jwt`` (PyJWT with the PEM string, one KMS Decrypt per token against the
emulator, ``json.loads``) in the thread pool, since boto3 blocks (a ``def`` endpoint would do
the same). 201 on success, 401 where the seed prints "Invalid JWT.".

Both add an ``x-bench-pid`` header so that the load generator can count requests per worker.
Settings come from the environment: ``BENCH_PUBLIC_PEM`` (the signing key's public half).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final

import jwt
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from benchmarks.seed_flow import AUDIENCE, ISSUER, SeedServer, new_kms_client

_JSON: Final = "application/json"
_OK: Final = b'{"status":"authorized"}'
_REFUSED: Final = b'{"error":{"code":"token_invalid","message":"Invalid JWT."}}'


def _token_of(body: bytes) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    token = value.get("token") if isinstance(value, dict) else None
    return token if isinstance(token, str) else None


def floor_app() -> FastAPI:
    public_key = serialization.load_pem_public_key(
        Path(os.environ["BENCH_PUBLIC_PEM"]).read_bytes())
    pid = {"x-bench-pid": str(os.getpid())}
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/payments")
    async def pay(request: Request) -> Response:
        token = _token_of(await request.body())
        try:
            if token is None:
                raise jwt.InvalidTokenError("no token")
            jwt.decode(token, public_key, algorithms=["RS256"],  # type: ignore[arg-type]
                       audience=AUDIENCE, issuer=ISSUER)
        except jwt.InvalidTokenError:
            return Response(_REFUSED, status_code=401, media_type=_JSON, headers=pid)
        return Response(_OK, status_code=201, media_type=_JSON, headers=pid)

    return app


def seed_app() -> FastAPI:
    server = SeedServer(kms_client=new_kms_client(),
                        public_pem=Path(os.environ["BENCH_PUBLIC_PEM"]))
    pid = {"x-bench-pid": str(os.getpid())}
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/payments")
    async def pay(request: Request) -> Response:
        token = _token_of(await request.body())
        card = await run_in_threadpool(server.process_jwt, token) if token else None
        if card is None:
            return Response(_REFUSED, status_code=401, media_type=_JSON, headers=pid)
        return Response(_OK, status_code=201, media_type=_JSON, headers=pid)

    return app
