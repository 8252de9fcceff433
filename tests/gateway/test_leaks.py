"""No PAN, CVV, token or ``meta_data`` anywhere the gateway writes or answers (CONTRACT.md s. 5).

The test runs a full mix against the session's ``cardseal serve`` (successes, every failure
class the subprocess can produce, every sandbox decline, idempotent replays, API-key reads, and
client mistakes such as card data in a query string), then scans:

- every gateway folder of the session: the SQLite database file and its ``-wal``/``-shm``
  (raw bytes, so freed pages and old WAL frames count), and the server's captured stderr log
  and stdout;
- every row of every table, read back through SQL (this is also the scan for PostgreSQL);
- the ``/metrics`` page and every response body the suite received.

Needles are every PAN, CVV, token and ``meta_data`` the suite made (``LeakRegistry``), plus each
token's signature and each ``meta_data``'s ciphertext on their own, so a truncated copy counts.

CVVs are three or four digits, so a bare substring search would hit innocent bytes (a
timestamp's microseconds, a latency bucket, a random id). The suite uses distinctive CVVs
(``739``, ``4826``) and looks for them as they would appear if leaked: as JSON or Python string
values (``"739"``, ``'739'``) in the raw database bytes, and as a standalone number (not part of a
longer run of digits, letters or a decimal) in text (logs, metrics, response bodies) and in
every database cell.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import MetaData

from cardseal import jws
from cardseal.testing import SANDBOX_DECLINES
from cardseal.tokens import Payment
from tests.gateway.conftest import (
    CVV,
    CVV_AMEX,
    OTHER_ISSUER,
    PAN_AMEX,
    PAN_MASTERCARD,
    PAN_VISA,
    Gateway,
    GatewayHome,
    LeakRegistry,
    card_json,
)
from tests.gateway.test_api_errors import META_CASES, REQUEST_INVALID, TOKEN_CASES

_MIN_PART = 40  # shorter pieces of a token are not distinctive (and may be empty)


def run_full_mix(gateway: Gateway) -> bytes:
    """Every kind of request the subprocess gateway answers; returns the /metrics page."""
    forge = gateway.forge
    auth = {"Authorization": f"Bearer {gateway.api_key()}"}
    with gateway.client() as client:
        def post(token: str, *, key: str | None = None, **body: Any) -> httpx.Response:
            headers = {"Idempotency-Key": key} if key else {}
            return client.post("/v1/payments", json={"token": token, "amount": 1234,
                                                     "currency": "USD", **body},
                               headers=headers)

        paid = post(forge.seal(PAN_VISA, CVV)).json()
        post(forge.seal(PAN_MASTERCARD, CVV, payment=Payment(1234, "USD", "ref-1")))
        post(forge.seal(PAN_AMEX, CVV_AMEX))
        other = forge.forge(iss=OTHER_ISSUER, signer=forge.other_signer,
                            card=card_json(PAN_AMEX, CVV_AMEX))
        post(other)
        for pan in SANDBOX_DECLINES:
            post(forge.seal(pan, CVV))
        for make_body in REQUEST_INVALID.values():
            body = make_body(forge.seal())
            if isinstance(body, dict):
                client.post("/v1/payments", json=body)
            else:
                client.post("/v1/payments", content=body)
        for _code, make_token in TOKEN_CASES.values():
            post(make_token(forge))
        for _status, _code, make_token in META_CASES.values():
            post(make_token(forge))
        mismatched = forge.seal(payment=Payment(1000, "USD"))
        post(mismatched, amount=999)
        replayed = forge.seal()
        post(replayed)
        post(replayed)
        key = "mix-" + secrets.token_hex(6)
        idem = forge.seal()
        post(idem, key=key)
        post(idem, key=key)
        post(idem, key=key, amount=1)
        declined_key = "mix-" + secrets.token_hex(6)
        declined = forge.seal("4000000000000002", CVV)
        post(declined, key=declined_key)
        post(declined, key=declined_key)
        big = {"token": forge.seal(), "card_number": PAN_VISA, "cvv": CVV, "pad": "x" * 70000}
        client.post("/v1/payments", json=big)
        client.get(f"/v1/payments/{paid['id']}", headers=auth)
        client.get(f"/v1/payments/{paid['id']}")
        client.get("/v1/payments/pay_" + "0" * 24, headers=auth)
        # Client mistakes: card data and a token where they never belong.
        leaky = forge.seal(PAN_VISA, CVV)
        client.post(f"/v1/payments?card_number={PAN_VISA}&cvv={CVV}&token={leaky}",
                    json={"token": leaky, "amount": 1234, "currency": "USD"},
                    headers={"X-Card-Number": PAN_VISA, "X-Cvv": CVV})
        client.get(f"/v1/payments/{PAN_VISA}?cvv={CVV}", headers=auth)
        client.get(f"/v1/payments/{forge.seal()}", headers=auth)
        client.post("/v1/payments", json={"token": PAN_VISA, "amount": 1, "currency": "USD",
                                          "reference": "x"})
        client.get("/readyz")
        return client.get("/metrics").content


def needles(registry: LeakRegistry) -> dict[str, list[bytes]]:
    """What must never appear, by kind."""
    found: dict[str, set[str]] = {"pan": set(registry.pans), "token": set(), "meta_data": set()}
    for token in registry.tokens:
        found["token"].add(token)
        signature = token.rsplit(".", 1)[-1]
        if len(signature) >= _MIN_PART:
            found["token"].add(signature)
    for meta in registry.meta_data:
        if len(meta) < _MIN_PART:
            continue
        found["meta_data"].add(meta)
        parts = meta.split(".")
        if len(parts) == 5 and len(parts[3]) >= _MIN_PART:
            found["meta_data"].add(parts[3])  # the card's ciphertext
    return {kind: sorted(v.encode() for v in values) for kind, values in found.items()}


def cvv_pattern(cvvs: set[str]) -> re.Pattern[bytes]:
    alternatives = b"|".join(re.escape(c.encode()) for c in sorted(cvvs))
    return re.compile(rb"(?<![0-9A-Za-z.])(?:" + alternatives + rb")(?![0-9A-Za-z.])")


def quoted_cvvs(cvvs: set[str]) -> list[bytes]:
    return [q + c.encode() + q for c in sorted(cvvs) for q in (b'"', b"'")]


def scan(sources: dict[str, bytes], registry: LeakRegistry, *, raw: bool) -> list[str]:
    """``source: kind`` for every needle found. ``raw`` sources (database bytes) look for
    CVVs as quoted string values; text sources for a standalone CVV."""
    hits: list[str] = []
    wanted = needles(registry)
    cvvs = {c for c in registry.cvvs if len(c) >= 3}  # "73" (a refused CVV) is not distinctive
    pattern = cvv_pattern(cvvs)
    quoted = quoted_cvvs(cvvs)
    for name, data in sources.items():
        for kind, values in wanted.items():
            hits.extend(f"{name}: {kind} {value[:12]!r}..." for value in values if value in data)
        if raw:
            hits.extend(f"{name}: cvv {q!r}" for q in quoted if q in data)
        else:
            hits.extend(f"{name}: cvv {m.group()!r}" for m in pattern.finditer(data))
    return hits


def database_files(home: GatewayHome) -> dict[str, bytes]:
    if not home.is_sqlite:
        return {}
    path = Path(home.database_url.removeprefix("sqlite:///"))
    return {str(p): p.read_bytes() for p in sorted(path.parent.glob(path.name + "*"))}


def log_files(home: GatewayHome) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(home.directory.glob("server.*"))}


def database_cells(home: GatewayHome) -> dict[str, bytes]:
    """Every text cell of every table, one source per table."""
    engine = home.engine()
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        cells: dict[str, bytes] = {}
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                rows = conn.execute(table.select()).all()
                values = [str(v) for row in rows for v in row if v is not None]
                cells[f"{home.database_url}#{table.name}"] = "\n".join(values).encode()
        return cells
    finally:
        engine.dispose()


def replay_store_entries(home: GatewayHome) -> dict[str, bytes]:
    """Every key and value of a Redis replay store (the database one is in the cells)."""
    url = home.settings.gateway.replay_store
    if not url.startswith(("redis://", "rediss://")):
        return {}
    client = redis.Redis.from_url(url)
    try:
        entries = [key + b" " + (client.get(key) or b"") for key in client.scan_iter()]
    finally:
        client.close()
    return {url: b"\n".join(entries)}



def _logs_a_payment(log: bytes) -> bool:
    """True when a line of ``log`` is the JSON record of a payment."""
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "payment":
            return True
    return False

def test_scanner_finds_what_it_looks_for(gateway: Gateway) -> None:
    registry = gateway.registry
    token = gateway.forge.seal(PAN_VISA, CVV)
    meta = json.loads(jws.parse_compact(token).payload)["meta_data"]
    samples = {
        "pan": PAN_VISA.encode(), "token": token.encode(), "meta": meta.encode(),
        "token-without-header": token.split(".", 1)[1].encode(),
        "card-ciphertext": meta.split(".")[3].encode(),
        "cvv-json": json.dumps({"cvv": CVV}).encode(),
        "cvv-query": f"GET /x?cvv={CVV} HTTP/1.1".encode(),
    }
    for name, data in samples.items():
        assert scan({name: data}, registry, raw=name != "cvv-query"), name
    innocent = {"timestamp": b'"2026-01-01T00:00:00.739123Z"', "bucket": b'le="0.739"',
                "id": b"pay_a739f0", "port": b"127.0.0.1:47390"}
    assert scan(innocent, registry, raw=False) == []


def test_no_card_data_token_or_meta_data_anywhere(gateway: Gateway) -> None:
    metrics = run_full_mix(gateway)
    registry = gateway.registry
    assert {CVV, CVV_AMEX} <= registry.cvvs
    assert {PAN_VISA, PAN_MASTERCARD, PAN_AMEX, *SANDBOX_DECLINES} <= registry.pans
    assert len(registry.tokens) > 80 and len(registry.responses) > 80

    raw: dict[str, bytes] = {}
    text: dict[str, bytes] = {"/metrics": metrics}
    for home in registry.homes:
        raw.update(database_files(home))
        text.update(log_files(home))
        text.update(database_cells(home))
        text.update(replay_store_entries(home))
    text.update({f"response #{i}": body for i, body in enumerate(registry.responses)})
    assert any(_logs_a_payment(data) for name, data in text.items()
               if name.endswith("server.log")), "the server log captured nothing"
    if gateway.home.is_sqlite:
        assert raw, "no database file to scan"

    hits = scan(raw, registry, raw=True) + scan(text, registry, raw=False)
    assert hits == []


def test_no_table_has_a_column_for_card_data(gateway: Gateway) -> None:
    engine = gateway.home.engine()
    try:
        metadata = MetaData()
        metadata.reflect(engine)
    finally:
        engine.dispose()
    columns = {f"{t.name}.{c.name}" for t in metadata.sorted_tables for c in t.columns}
    suspicious = {c for c in columns
                  if re.search(r"pan$|cvv|cvc|card_number|token$|meta_data|data_key", c)}
    assert suspicious == set(), suspicious
