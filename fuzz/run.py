"""The long fuzz run of ``make fuzz``: a million mutated inputs over cardseal's three parsers.

Targets (each input is run once, in this process, no network):

- ``token``: ``TokenVerifier.verify`` (``jws.parse_compact`` first, then header, key, signature
  and claim checks) on genuine tokens mutated as text, bit-flipped inside a part, spliced,
  with header members changed, or with claims changed and correctly re-signed;
- ``meta_data``: ``EnvelopeOpener.open`` (envelope), ``decode_kms_direct`` +
  ``open_kms_direct`` (kms-direct) and ``Card.from_json`` (the card JSON behind both), on
  genuine inputs mutated likewise;
- ``http_body``: ``PaymentService.create(body, idempotency_key)``, the payment endpoint's whole
  request path minus the HTTP framing (body parser, idempotency, verification, the replay
  store on SQLite), and a share through the ASGI app itself (``httpx.ASGITransport``).

Oracle: nothing but a ``CardsealError`` with a contract code and a 4xx status escapes a parser;
the HTTP answers are below 500, JSON, and of the contract's shapes. Reported: inputs, inputs/s,
outcomes by code, unexpected exceptions by type (each saved with its input under
``fuzz/reports/crashes/``), the slowest single input, and the RSS at start, after warm-up, at
the end and at peak. Exit status 1 on any unexpected exception or when the RSS grew past
``--rss-slack-mb`` after warm-up.

    python fuzz/run.py [--inputs 1000000] [--seed 1] [--reports fuzz/reports]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

from cardseal import jws
from cardseal.card import Card
from cardseal.config import (
    build_issuer_policies,
    build_opener,
    build_providers,
    build_sealer,
    build_verifier,
    database_url,
    fingerprint_secret,
    load_settings,
)
from cardseal.envelope import (
    EnvelopeSealer,
    decode_kms_direct,
    kms_direct_context,
    open_kms_direct,
    seal_kms_direct,
)
from cardseal.errors import ALL_CODES, CardsealError, http_status_for
from cardseal.gateway.app import create_app
from cardseal.gateway.payments import PaymentService
from cardseal.processor.sandbox import SandboxProcessor
from cardseal.scaffold import init_dir
from cardseal.storage.migrate import upgrade
from cardseal.storage.replay import build_replay_store
from cardseal.storage.sql import SqlStore
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, LocalSetup, sample_card_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import Mutator, b64url_decode_loose, dumps
from report import read_rss_kib, write_reports

T = 1_750_000_000  # the fixed clock of the token and meta_data targets
MAX_CORPUS = 2000
MAX_SAVED_CRASHES = 20
RAM_DISK = Path("/dev/shm")  # noqa: S108 - only a parent for mkdtemp's private folder


class Unexpected(Exception):  # noqa: N818 - an oracle verdict, raised only inside this script
    """The oracle's verdict on an answer that broke the contract (not an exception type)."""


@dataclass
class Stats:
    name: str
    inputs: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    corpus: list[Any] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def record(self, kind: str, outcome: str, item: Any, seconds: float) -> None:
        self.inputs += 1
        self.seconds += seconds
        self.slowest = max(self.slowest, seconds)
        self.outcomes[f"{kind}:{outcome}"] += 1
        key = f"{kind}:{outcome}"
        if key not in self.seen:  # a new outcome: keep the input as a seed (crude feedback)
            self.seen.add(key)
            self.corpus.append((kind, item))
            if len(self.corpus) > MAX_CORPUS:
                self.corpus.pop(len(self.corpus) // 2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "seconds": round(self.seconds, 2),
            "inputs_per_second": round(self.inputs / self.seconds) if self.seconds else 0,
            "slowest_input_ms": round(self.slowest * 1000, 2),
            "unexpected": dict(self.unexpected),
            "outcomes": dict(sorted(self.outcomes.items(), key=lambda kv: -kv[1])),
        }


class Crashes:
    """Unexpected exceptions: counted by type, the first few saved with their input."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved = 0

    def save(self, stats: Stats, kind: str, item: Any, err: BaseException) -> str:
        name = type(err).__name__
        stats.unexpected[f"{kind}:{name}"] += 1
        if self.saved < MAX_SAVED_CRASHES:
            self.saved += 1
            self.directory.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(repr(item).encode()).hexdigest()[:12]
            path = self.directory / f"{stats.name}-{kind}-{name}-{digest}.txt"
            path.write_text(f"target: {stats.name}/{kind}\ninput: {item!r}\n\n"
                            + "".join(traceback.format_exception(err)))
        return f"UNEXPECTED {name}"


def check_error(err: CardsealError) -> str:
    if err.code not in ALL_CODES or not 400 <= err.http_status < 500:
        raise Unexpected(f"{err.code} -> {err.http_status}")
    return err.code


# -- token ---------------------------------------------------------------------------------------

HEADER_NAMES = ["alg", "kid", "typ", "crit", "b64", "jku", "jwk", "x5u", "cty", "zip"]
CLAIM_NAMES = ["iss", "aud", "iat", "exp", "nbf", "jti", "meta_data", "payment", "sub"]


class TokenTarget:
    def __init__(self, setup: LocalSetup, other: LocalSetup, mutator: Mutator) -> None:
        self.setup = setup
        self.m = mutator
        card = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))
        self.seeds = [setup.sealer.seal(card), other.sealer.seal(card)]
        sealer = EnvelopeSealer(providers=setup.providers, key_uri="local://main")
        self.envelopes: list[tuple[str, str]] = []
        for pan in (SAMPLE_PANS["amex"], SAMPLE_PANS["mastercard"]):
            jti = secrets.token_urlsafe(16)
            plaintext = sample_card_json(pan)
            self.envelopes.append((sealer.seal(plaintext, iss=ISSUER, aud=AUDIENCE, jti=jti), jti))
            direct = seal_kms_direct(setup.providers, "local://main", plaintext,
                                     kms_direct_context(ISSUER, AUDIENCE, jti))
            claims = self.claims(direct, jti)
            claims["payment"] = {"amount": 1999, "currency": "USD", "reference": "r-1"}
            self.seeds.append(self.sign(claims))
        self.seeds.append(self.sign(self.claims(*self.envelopes[0])))
        kid = setup.signer.kid
        self.header_values: dict[str, list[Any]] = {
            "alg": ["RS256", "PS256", "ES256", "EdDSA", "none", "HS256", "RS512", ""],
            "kid": [kid, kid + "x", "", None, 1, [kid]],
            "typ": ["card+jwt", "CARD+JWT", "application/card+jwt", "JWT", "", None],
            "crit": [["exp"], [], "b64"], "b64": [False, True],
            "jku": ["https://attacker.example/jwks.json"],
        }
        self.claim_values: dict[str, list[Any]] = {
            "iss": [ISSUER, "other-service", "", None, [ISSUER]],
            "aud": [AUDIENCE, [AUDIENCE], [AUDIENCE, "x"], "", None],
            "iat": [T, T + 10**6, T - 10**6, str(T), 1.5, 2**63],
            "exp": [T + 60, T + 301, T - 31, T, str(T + 60), 2**53],
            "nbf": [T, T + 31, -1, 1.5],
            "jti": ["short", "x" * 256, "\u00e9" * 20, "a\nb" * 8, self.envelopes[0][1]],
            "meta_data": [self.envelopes[0][0], "", "....", "a.b.c.d.e", 1, None],
            "payment": [{"amount": 1, "currency": "USD"}, {"amount": "1", "currency": "USD"},
                        {"amount": True, "currency": "USD"}, {"amount": 1, "currency": ["USD"]},
                        {"amount": 1, "currency": "USD", "x": 1}, [], "USD"],
        }

    def claims(self, meta_data: str, jti: str) -> dict[str, Any]:
        return {"iss": ISSUER, "aud": AUDIENCE, "iat": T, "exp": T + 120, "jti": jti,
                "meta_data": meta_data}

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        signer = self.setup.signer
        head = header or {"alg": signer.alg, "kid": signer.kid, "typ": "card+jwt"}
        return jws.encode_compact(head, dumps(claims).encode("utf-8", "surrogatepass"),
                                  signer.sign)

    def generate(self, corpus: list[Any]) -> tuple[str, Any]:
        m, rng = self.m, self.m.rng
        base = rng.choice(self.seeds) if not corpus or rng.random() < 0.6 else \
            rng.choice(corpus)[1]
        if not isinstance(base, str):
            base = self.seeds[0]
        roll = rng.random()
        if roll < 0.45:
            return "text", m.text(base, self.seeds)
        if roll < 0.6:
            return "bitflip", m.flip_part(base)
        if roll < 0.7:
            return "splice", m.splice(base, rng.choice(self.seeds))
        if roll < 0.82:
            return "header", m.json_part(base, 0, HEADER_NAMES, self.header_values)
        if roll < 0.87:  # re-signed: reaches the claim checks (costs one RSA signature)
            raw = b64url_decode_loose(base.split(".")[1]) if base.count(".") == 2 else None
            try:
                claims = json.loads(raw) if raw else None
            except ValueError:
                claims = None
            if not isinstance(claims, dict):
                claims = self.claims(*self.envelopes[0])
            return "resigned", self.sign(m.members(claims, CLAIM_NAMES, self.claim_values))
        if roll < 0.95:
            return "junk", m.junk(rng.choice((8, 64, 512)))
        return "bytes", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 128)))

    def run(self, item: str | bytes) -> str:
        try:
            self.setup.verifier.verify(item)
        except CardsealError as err:
            return check_error(err)
        return "verified"


# -- meta_data -------------------------------------------------------------------------------------

ENVELOPE_HEADER = ["alg", "enc", "kid", "jti", "zip"]
ENVELOPE_VALUES: dict[str, list[Any]] = {
    "alg": ["kms", "KMS", "dir", ""], "enc": ["A256GCM", "A128GCM", None],
    "kid": ["local://main", "local://other", "local://missing", "aws-kms://alias/x", "nonsense",
            "local://", "", None],
    "jti": ["", None, 1, "x" * 300],
}
CARD_NAMES = ["card_number", "expiry_date", "cvv", "cardholder_name", "extra"]
CARD_VALUES: dict[str, list[Any]] = {
    "card_number": [*SAMPLE_PANS.values(), "4242 4242 4242 4242", "4242-4242-4242-4242",
                    "4242424242424241", "1000000000000008", "", "4" * 25],
    "expiry_date": ["12/29", "12/2099", "13/29", "00/30", "1/30", "12/99999", "12-29", "1229",
                    "01/20"],
    "cvv": ["123", "1234", "12", "12a", ""],
}
ALLOWED = ("local://main",)


class MetaDataTarget:
    def __init__(self, setup: LocalSetup, tokens: TokenTarget, mutator: Mutator) -> None:
        self.setup = setup
        self.m = mutator
        self.envelopes = tokens.envelopes
        self.directs = []
        for pan in (SAMPLE_PANS["visa"], SAMPLE_PANS["jcb"]):
            jti = secrets.token_urlsafe(16)
            self.directs.append((seal_kms_direct(
                setup.providers, "local://main", sample_card_json(pan),
                kms_direct_context(ISSUER, AUDIENCE, jti)), jti))
        self.cards = [sample_card_json(pan).decode() for pan in SAMPLE_PANS.values()]

    def generate(self, corpus: list[Any]) -> tuple[str, Any]:
        m, rng = self.m, self.m.rng
        roll = rng.random()
        if corpus and rng.random() < 0.3:
            kind, item = rng.choice(corpus)
            if kind == "card":
                return kind, m.text(item, self.cards)
            return kind, (m.text(item[0]), item[1])
        if roll < 0.5:
            md, jti = rng.choice(self.envelopes)
            sub = rng.random()
            if sub < 0.4:
                md = m.text(md, [e for e, _ in self.envelopes])
            elif sub < 0.65:
                md = m.flip_part(md)
            elif sub < 0.75:
                md = m.splice(md, rng.choice(self.envelopes)[0])
            elif sub < 0.95:
                md = m.json_part(md, 0, ENVELOPE_HEADER, ENVELOPE_VALUES)
            else:
                md = m.junk(256)
            return "envelope", (md, jti if rng.random() < 0.9 else m.junk(24))
        if roll < 0.8:
            md, jti = rng.choice(self.directs)
            sub = rng.random()
            if sub < 0.5:
                md = m.text(md, alphabet="+/=-_ \n.AZaz09\u00e9")
            elif sub < 0.6:
                md = md.rstrip("=") if rng.random() < 0.5 else \
                    md.replace("+", "-").replace("/", "_")
            else:
                raw = bytearray(decode_kms_direct(md))
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                md = base64.b64encode(bytes(raw)).decode()
            return "kms_direct", (md, jti)
        base = rng.choice(self.cards)
        if rng.random() < 0.5:
            return "card", m.text(base, self.cards, alphabet='{}[]",:0123456789 /-\\\u00e9tfnul')
        try:
            obj = json.loads(base)
        except ValueError:
            obj = {}
        return "card", dumps(m.members(obj, CARD_NAMES, CARD_VALUES))

    def run(self, kind: str, item: Any) -> str:
        try:
            if kind == "envelope":
                md, jti = item
                self.setup.opener.envelope.open(md, allowed_keys=ALLOWED, iss=ISSUER,
                                                aud=AUDIENCE, jti=jti)
            elif kind == "kms_direct":
                md, jti = item
                open_kms_direct(self.setup.providers, decode_kms_direct(md), allowed_keys=ALLOWED,
                                context=kms_direct_context(ISSUER, AUDIENCE, jti))
            else:
                Card.from_json(item.encode("utf-8", "surrogatepass"))
        except CardsealError as err:
            return check_error(err)
        return "opened"


# -- http body -----------------------------------------------------------------------------------

BODY_NAMES = ["token", "amount", "currency", "reference", "extra"]
IDEMPOTENCY_KEYS = ["order-1", "order-2", "k" * 255, "k" * 256, "", " ", "\u00e9", "a\tb"]


def check_http(status: int, body: bytes) -> str:
    if status >= 500:
        raise Unexpected(f"HTTP {status}")
    answer = json.loads(body)
    if status == 201:
        if not isinstance(answer, dict) or answer.get("status") != "authorized":
            raise Unexpected("201 without a PAYMENT")
        return "201"
    error = answer.get("error") if isinstance(answer, dict) and set(answer) == {"error"} else None
    if not isinstance(error, dict) or error.get("code") not in ALL_CODES:
        raise Unexpected(f"HTTP {status} without the contract's error body")
    if http_status_for(error["code"]) != status:
        raise Unexpected(f"{error['code']} with HTTP {status}")
    if set(error) - {"code", "message", "decline_code", "payment_id"}:
        raise Unexpected("extra members in the error body")
    return str(error["code"])


class HttpTarget:
    def __init__(self, directory: Path, tokens: TokenTarget, mutator: Mutator) -> None:
        self.m = mutator
        config = init_dir(directory)
        self.settings = load_settings(config)
        upgrade(database_url(self.settings))
        sealer = build_sealer(self.settings)
        card = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))
        self.tokens = [sealer.seal(card) for _ in range(50)] + tokens.seeds
        self.values: dict[str, list[Any]] = {
            "token": self.tokens,
            "amount": [1999, 1, 0, -1, 10**12, 10**12 + 1, "1999", 1999.0, True, None],
            "currency": ["USD", "usd", "XXX", "ZZZ", "US", "USDD", "", None, 840],
        }
        self.bodies = [dumps({"token": t, "amount": 1999, "currency": "USD"})
                       for t in self.tokens[:8]]
        providers = build_providers(self.settings)
        policies = build_issuer_policies(self.settings)
        self.store = SqlStore(url=database_url(self.settings))
        self.service = PaymentService(
            store=self.store,
            replay=build_replay_store(self.settings.gateway.replay_store, self.store),
            verifier=build_verifier(self.settings, policies),
            opener=build_opener(self.settings, policies, providers),
            processor=SandboxProcessor(),
            fingerprint_secret=fingerprint_secret(self.settings),
        )

    def generate(self, corpus: list[Any]) -> tuple[str, Any]:
        m, rng = self.m, self.m.rng
        key = None
        if rng.random() < 0.2:
            key = rng.choice(IDEMPOTENCY_KEYS) if rng.random() < 0.5 else m.junk(40)
        if corpus and rng.random() < 0.3:
            base = rng.choice(corpus)[1][0].decode("utf-8", "replace")
        else:
            base = rng.choice(self.bodies)
        roll = rng.random()
        if roll < 0.45:
            try:
                obj = json.loads(base)
            except ValueError:
                obj = {}
            if not isinstance(obj, dict):
                obj = {}
            obj = m.members(obj, BODY_NAMES, self.values)
            if isinstance(obj.get("token"), str) and rng.random() < 0.5:
                obj["token"] = m.text(obj["token"], self.tokens)
            body = dumps(obj).encode("utf-8", "surrogatepass")
        elif roll < 0.85:
            body = m.text(base, self.bodies, alphabet='{}[]",:0123456789 \\\u00e9tfnul.') \
                .encode("utf-8", "surrogatepass")
        elif roll < 0.95:
            body = dumps(m.value()).encode("utf-8", "surrogatepass")
        else:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 256)))
        return "service", (body, key)

    async def run(self, item: tuple[bytes, str | None]) -> str:
        body, key = item
        outcome = await self.service.create(body, key)
        return check_http(outcome.status, outcome.body)


# -- the run -------------------------------------------------------------------------------------


def run_sync(stats: Stats, crashes: Crashes, count: int,
             generate: Callable[[list[Any]], tuple[str, Any]],
             execute: Callable[[str, Any], str]) -> None:
    clock = time.perf_counter
    for _ in range(count):
        kind, item = generate(stats.corpus)
        start = clock()
        try:
            outcome = execute(kind, item)
        except Exception as err:  # the oracle: anything else is a finding
            outcome = crashes.save(stats, kind, item, err)
        stats.record(kind, outcome, item, clock() - start)


async def run_service(target: HttpTarget, stats: Stats, crashes: Crashes, count: int) -> None:
    clock = time.perf_counter
    for _ in range(count):
        kind, item = target.generate(stats.corpus)
        start = clock()
        try:
            outcome = await target.run(item)
        except Exception as err:
            outcome = crashes.save(stats, kind, item, err)
        stats.record(kind, outcome, item, clock() - start)


async def run_asgi(target: HttpTarget, stats: Stats, crashes: Crashes, count: int) -> None:
    """The same bodies through the ASGI app: the route's streaming and size limit too."""
    clock = time.perf_counter
    app = create_app(target.settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        for _ in range(count):
            _, (body, key) = target.generate(stats.corpus)
            headers = {"Content-Type": "application/json"}
            if key is not None and key.isascii() and key.isprintable():
                headers["Idempotency-Key"] = key
            start = clock()
            try:
                response = await client.post("/v1/payments", content=body, headers=headers)
                outcome = check_http(response.status_code, response.content)
            except Exception as err:
                outcome = crashes.save(stats, "asgi", (body, key), err)
            stats.record("asgi", outcome, (body, key), clock() - start)


def _counts(total: int) -> dict[str, int]:
    shares = {"token": 0.4, "meta_data": 0.35, "http_body": 0.25}
    counts = {name: int(total * share) for name, share in shares.items()}
    counts["token"] += total - sum(counts.values())
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="total inputs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--asgi-share", type=float, default=0.02,
                        help="share of the http_body inputs sent through the ASGI app")
    parser.add_argument("--rss-slack-mb", type=float, default=64.0,
                        help="largest RSS growth after warm-up that still counts as bounded")
    parser.add_argument("--reports", type=Path,
                        default=Path(__file__).resolve().parent / "reports")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv

    # Scratch files (keyrings, the SQLite ledger) in RAM when there is a RAM disk: the run
    # measures the parsers, not fsync. mkdtemp makes a fresh 0700 folder.
    base = Path(tempfile.mkdtemp(prefix="cardseal-fuzz-",
                                 dir=RAM_DISK if RAM_DISK.is_dir() else None))
    try:
        return _run(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(args: argparse.Namespace, base: Path) -> int:
    # The gateway logs one line per request at info: keep warnings (processor or storage
    # trouble would show there), not a million request lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    counts = _counts(args.inputs)
    mutator = Mutator(args.seed)
    crashes = Crashes(args.reports / "crashes")
    started = time.time()
    rss_start = read_rss_kib(os.getpid())["VmRSS"]

    setup = LocalSetup.create(base / "local", now=lambda: T)
    other = LocalSetup.create(base / "other", now=lambda: T)
    tokens = TokenTarget(setup, other, mutator)
    meta = MetaDataTarget(setup, tokens, mutator)
    http = HttpTarget(base / "gateway", tokens, mutator)
    stats = {name: Stats(name) for name in counts}

    # Warm-up: 5% of each target, then the RSS baseline for the bounded-memory verdict.
    warm = {name: count // 20 for name, count in counts.items()}
    phases = [warm, {name: counts[name] - warm[name] for name in counts}]
    rss_warm = 0
    loop = asyncio.new_event_loop()
    try:
        for phase, plan in enumerate(phases):
            run_sync(stats["token"], crashes, plan["token"], tokens.generate,
                     lambda _kind, item: tokens.run(item))
            run_sync(stats["meta_data"], crashes, plan["meta_data"], meta.generate, meta.run)
            asgi = int(plan["http_body"] * args.asgi_share)
            loop.run_until_complete(run_service(http, stats["http_body"], crashes,
                                                plan["http_body"] - asgi))
            loop.run_until_complete(run_asgi(http, stats["http_body"], crashes, asgi))
            if phase == 0:
                rss_warm = read_rss_kib(os.getpid())["VmRSS"]
        loop.run_until_complete(http.service.close())
        loop.run_until_complete(http.store.close())
    finally:
        loop.close()
    memory = read_rss_kib(os.getpid())
    elapsed = time.time() - started
    total = sum(s.inputs for s in stats.values())
    unexpected = sum(sum(s.unexpected.values()) for s in stats.values())
    growth_mb = (memory["VmRSS"] - rss_warm) / 1024
    result = {
        "command": " ".join(["python fuzz/run.py", *args.argv]).strip(),
        "seed": args.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(elapsed, 1),
        "inputs": total,
        "inputs_per_second": round(total / elapsed),
        "unexpected_exceptions": unexpected,
        "crashes_saved_in": str(crashes.directory) if crashes.saved else None,
        "rss_mb": {"start": round(rss_start / 1024, 1), "after_warmup": round(rss_warm / 1024, 1),
                   "end": round(memory["VmRSS"] / 1024, 1),
                   "peak": round(memory["VmHWM"] / 1024, 1)},
        "rss_growth_after_warmup_mb": round(growth_mb, 1),
        "memory_bounded": growth_mb <= args.rss_slack_mb,
        "targets": {name: s.as_dict() for name, s in stats.items()},
    }
    result["verdict"] = "pass" if unexpected == 0 and result["memory_bounded"] else "FAIL"
    write_reports(args.reports, fuzz=result)
    print(json.dumps({k: v for k, v in result.items() if k != "targets"}, indent=2))
    for name, s in stats.items():
        d = s.as_dict()
        print(f"{name:>10}: {d['inputs']:>9,} inputs, {d['inputs_per_second']:>7,}/s, "
              f"slowest {d['slowest_input_ms']} ms, unexpected {d['unexpected'] or 0}")
    return 0 if result["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
