"""The soak of ``make fuzz``: a real ``cardseal serve`` under mixed good and bad traffic.

Makes a throwaway home (``cardseal init``), starts the gateway (HTTPS, SQLite, local KMS,
sandbox processor) as a subprocess, and drives it with ``--clients`` threads for ``--minutes``:
valid payments (also with an ``Idempotency-Key``, sent twice), replays, declines, invalid cards,
forged signatures, expired tokens, malformed tokens, bad JSON, oversize bodies, ``/readyz`` and
``/metrics``; a share of requests on a fresh connection each. Every answer is checked against
the contract (status and code). Every ``--sample-seconds`` the server's RSS and open file
descriptors are read from ``/proc/<pid>/status`` and ``/proc/<pid>/fd``.

Verdict: RSS flat when the end value is within ``--rss-tolerance-pct`` of the value after
warm-up (the first ``--warmup-fraction`` of the run; the slope and the growth per charged
request are reported too); fds flat when, at rest (traffic paused, client connections closed),
no kind of descriptor grew between the end of warm-up and the end, the database files excepted
while the connection pool fills up to its bound of 5 connections. At
the end the server's log is scanned for the suite's PANs and tokens. Reports go to
``fuzz/reports/soak.json`` and ``fuzz/reports/latest.md``.

    python fuzz/soak.py [--minutes 10] [--clients 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cardseal import jws
from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.card import Card
from cardseal.config import build_providers, build_sealer, build_signer, load_settings
from cardseal.envelope import EnvelopeSealer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import fd_count, fd_kinds, read_rss_kib, write_reports

PAN = "4242424242424242"
PAN_DECLINED = "4000000000000002"
PAN_LUHN_INVALID = "4242424242424241"
EXPIRY = "12/2030"
MAX_BODY = 64 * 1024
# kind -> (weight, expected "status code")
TRAFFIC: dict[str, tuple[int, str]] = {
    "valid": (30, "201"),
    "idempotent": (6, "201, then the same 201 replayed"),
    "replay": (10, "201, then 409 token_replayed"),
    "declined": (8, "402 payment_declined"),
    "card_invalid": (5, "422 card_number_invalid"),
    "forged": (10, "401 token_signature_invalid"),
    "expired": (8, "401 token_expired"),
    "malformed": (10, "401 token_malformed"),
    "bad_json": (8, "400 request_invalid"),
    "oversize": (3, "413 request_too_large"),
    "readyz": (2, "200"),
}


def cardseal_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("cardseal")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "from cardseal.cli import main; main()", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    got: dict[str, Counter[str]] = field(default_factory=dict)
    mismatches: list[dict[str, str]] = field(default_factory=list)
    mismatch_count: int = 0
    server_errors: int = 0
    transport_errors: int = 0
    requests: int = 0
    charged: int = 0  # answers 201 or 402: the requests that reached the processor (or a replay)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, expected: str, response: httpx.Response) -> None:
        code = ""
        if response.headers.get("content-type") == "application/json":
            try:
                body = response.json()
                error = body.get("error") if isinstance(body, dict) else None
                code = str(error.get("code")) if isinstance(error, dict) else ""
            except ValueError:
                code = "not-json"
        got = f"{response.status_code} {code}".strip()
        with self.lock:
            self.requests += 1
            self.charged += response.status_code in (201, 402)
            self.got.setdefault(kind, Counter())[got] += 1
            if response.status_code >= 500:
                self.server_errors += 1
            if got != expected:
                self.mismatch_count += 1
                if len(self.mismatches) < 20:
                    self.mismatches.append({"kind": kind, "expected": expected, "got": got})


class Traffic:
    """Makes every kind of request; the tokens come from the home's own client settings."""

    def __init__(self, config: Path) -> None:
        settings = load_settings(config)
        self.settings = settings
        self.providers = build_providers(settings)
        self.sealer = build_sealer(settings, self.providers)
        self.signer = build_signer(settings)
        self.envelopes = EnvelopeSealer(providers=self.providers,
                                        key_uri=settings.client.kms_key)
        self.secrets: list[str] = []  # a sample of tokens, for the log scan

    def seal(self, pan: str = PAN) -> str:
        token = self.sealer.seal(Card(card_number=pan, expiry_date=EXPIRY, cvv="739"))
        if len(self.secrets) < 200:
            self.secrets.append(token)
        return token

    def forge(self, *, plaintext: bytes | None = None, iat_shift: int = 0) -> str:
        """A correctly signed token around any card JSON, issued ``iat_shift`` s from now."""
        card = plaintext or json.dumps({"card_number": PAN, "expiry_date": EXPIRY,
                                        "cvv": "739"}).encode()
        client = self.settings.client
        jti = secrets.token_urlsafe(16)
        now = int(time.time()) + iat_shift
        claims = {"iss": client.issuer, "aud": client.audience, "iat": now, "exp": now + 120,
                  "jti": jti, "meta_data": self.envelopes.seal(
                      card, iss=client.issuer, aud=client.audience, jti=jti)}
        header = {"alg": self.signer.alg, "kid": self.signer.kid, "typ": "card+jwt"}
        return jws.encode_compact(header, json.dumps(claims).encode(), self.signer.sign)

    def requests(self, kind: str) -> list[tuple[str, str, dict[str, Any], str]]:
        """(method, path, httpx options, expected "status code") for one ``kind``."""
        def pay(token: str, expected: str) -> tuple[str, str, dict[str, Any], str]:
            return ("POST", "/v1/payments",
                    {"json": {"token": token, "amount": 1999, "currency": "USD"}}, expected)

        def raw(content: bytes, expected: str) -> tuple[str, str, dict[str, Any], str]:
            return ("POST", "/v1/payments",
                    {"content": content, "headers": {"Content-Type": "application/json"}},
                    expected)

        if kind == "valid":
            return [pay(self.seal(), "201")]
        if kind == "idempotent":  # the same request twice: the first answer, replayed
            method, path, options, _ = pay(self.seal(), "201")
            options["headers"] = {"Idempotency-Key": "soak-" + secrets.token_hex(8)}
            return [(method, path, options, "201")] * 2
        if kind == "replay":  # paid, then sent again
            token = self.seal()
            return [pay(token, "201"), pay(token, "409 token_replayed")]
        if kind == "declined":
            return [pay(self.seal(PAN_DECLINED), "402 payment_declined")]
        if kind == "card_invalid":
            card = json.dumps({"card_number": PAN_LUHN_INVALID, "expiry_date": EXPIRY,
                               "cvv": "739"}).encode()
            return [pay(self.forge(plaintext=card), "422 card_number_invalid")]
        if kind == "forged":
            head, payload, signature = self.seal().split(".")
            flipped = bytearray(b64url_decode(signature))
            flipped[len(flipped) // 2] ^= 1
            return [pay(f"{head}.{payload}.{b64url_encode(bytes(flipped))}",
                        "401 token_signature_invalid")]
        if kind == "expired":
            return [pay(self.forge(iat_shift=-400), "401 token_expired")]
        if kind == "malformed":
            junk = secrets.token_urlsafe(secrets.choice((8, 40, 300)))
            return [pay(junk + "." + junk, "401 token_malformed")]
        if kind == "bad_json":
            return [raw(b'{"token": ', "400 request_invalid")]
        if kind == "oversize":
            return [raw(b"{" + b" " * MAX_BODY + b"}", "413 request_too_large")]
        return [("GET", "/readyz", {}, "200")]


class Server:
    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.log = home / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARDSEAL_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own console script
                cardseal_command("--config", str(home / "cardseal.toml"), "serve", "--port",
                                 str(port)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def wait_ready(self, ssl_context: ssl.SSLContext) -> None:
        deadline = time.monotonic() + 30
        with httpx.Client(verify=ssl_context, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"cardseal serve exited {self.proc.returncode}")
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("cardseal serve did not answer /healthz in 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Soak:
    def __init__(self, server: Server, traffic: Traffic, ssl_context: ssl.SSLContext,
                 clients: int, fresh_share: float) -> None:
        self.server = server
        self.traffic = traffic
        self.ssl_context = ssl_context
        self.clients = clients
        self.fresh_share = fresh_share
        self.tally = Tally()
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.idle = threading.Semaphore(0)  # released by each client as it goes idle
        self.resume = threading.Event()
        self.kinds = list(TRAFFIC)
        self.weights = [TRAFFIC[k][0] for k in self.kinds]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, verify=self.ssl_context, timeout=30)

    def worker(self) -> None:
        rng = secrets.SystemRandom()
        client = self.client()
        try:
            while not self.stop.is_set():
                if self.paused.is_set():  # drop the keep-alive connection while at rest
                    client.close()
                    self.idle.release()
                    self.resume.wait()
                    client = self.client()
                    continue
                kind = rng.choices(self.kinds, self.weights)[0]
                fresh = rng.random() < self.fresh_share
                use = self.client() if fresh else client
                try:
                    for method, path, options, expected in self.traffic.requests(kind):
                        try:
                            response = use.request(method, path, **options)
                        except httpx.TransportError:
                            with self.tally.lock:
                                self.tally.transport_errors += 1
                            continue
                        self.tally.record(kind, expected, response)
                    with self.tally.lock:
                        self.tally.sent[kind] += 1
                finally:
                    if fresh:
                        use.close()
        finally:
            client.close()

    def rest(self) -> None:
        """Pause every client and close their connections (returns when they are idle)."""
        self.resume.clear()
        self.paused.set()
        for _ in range(self.clients):
            self.idle.acquire()

    def go_on(self) -> None:
        self.paused.clear()
        self.resume.set()


def sample(pid: int) -> dict[str, float]:
    memory = read_rss_kib(pid)
    return {"rss_mb": round(memory["VmRSS"] / 1024, 2), "hwm_mb": round(memory["VmHWM"] / 1024, 2),
            "fds": fd_count(pid)}


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    done = subprocess.run(cardseal_command("init", "--dir", str(home)),  # noqa: S603
                          capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace"))
    ssl_context = ssl.create_default_context(cafile=str(home / "tls" / "cert.pem"))
    server = Server(home, free_port())
    try:
        server.wait_ready(ssl_context)
        soak = Soak(server, Traffic(home / "cardseal.toml"), ssl_context, args.clients,
                    args.fresh_share)
        return drive(args, server, soak)
    finally:
        server.stop()


def drive(args: argparse.Namespace, server: Server, soak: Soak) -> dict[str, Any]:
    pid = server.proc.pid
    duration = args.minutes * 60
    warmup = duration * args.warmup_fraction
    samples: list[dict[str, float]] = []
    rest: dict[str, int] = {"start": fd_count(pid)}
    kinds: dict[str, dict[str, int]] = {"start": fd_kinds(pid)}
    start_sample = sample(pid)
    started = time.time()
    t0 = time.monotonic()
    threads = [threading.Thread(target=soak.worker, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    warmed: dict[str, float] | None = None
    next_sample = t0
    while (now := time.monotonic()) < t0 + duration:
        if warmed is None and now >= t0 + warmup:
            soak.rest()
            time.sleep(args.rest_seconds)
            rest["after_warmup"] = fd_count(pid)
            kinds["after_warmup"] = fd_kinds(pid)
            warmed = {**sample(pid), "t": round(now - t0, 1), "requests": soak.tally.requests,
                      "charged": soak.tally.charged}
            samples.append(warmed)
            soak.go_on()
        if now >= next_sample:
            samples.append({**sample(pid), "t": round(now - t0, 1),
                            "requests": soak.tally.requests})
            next_sample += args.sample_seconds
        time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
    soak.rest()
    time.sleep(args.rest_seconds)
    rest["end"] = fd_count(pid)
    kinds["end"] = fd_kinds(pid)
    end = {**sample(pid), "t": round(time.monotonic() - t0, 1), "requests": soak.tally.requests,
           "charged": soak.tally.charged}
    samples.append(end)
    soak.stop.set()
    soak.go_on()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = time.monotonic() - t0
    if warmed is None:  # a run shorter than one sampling step: the end is the warm point
        warmed = end
        rest["after_warmup"] = rest["end"]
        kinds["after_warmup"] = kinds["end"]

    rss_warm, rss_end = warmed["rss_mb"], end["rss_mb"]
    change = 100 * (rss_end - rss_warm) / rss_warm
    after = [(s["t"], s["rss_mb"]) for s in samples if s["t"] >= warmed["t"]]
    rss_flat = abs(change) <= args.rss_tolerance_pct
    charged = end["charged"] - warmed.get("charged", 0)
    per_charge = (rss_end - rss_warm) * 2**20 / charged if charged else 0.0
    fd_flat = fds_flat(kinds["after_warmup"], kinds["end"])
    leaks = scan_log(server.log, soak.traffic.secrets)
    tally = soak.tally
    report = {
        "command": " ".join(["python fuzz/soak.py", *args.argv]).strip(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "minutes": args.minutes,
        "clients": args.clients,
        "server_pid": pid,
        "sample_seconds": args.sample_seconds,
        "requests": tally.requests,
        "requests_per_second": round(tally.requests / elapsed, 1),
        "mismatches": tally.mismatch_count,
        "first_mismatches": tally.mismatches,
        "server_errors": tally.server_errors,
        "transport_errors": tally.transport_errors,
        "log_leaks": leaks,
        "rss_mb": {"start": start_sample["rss_mb"], "after_warmup": rss_warm, "end": rss_end,
                   "peak": max(s["hwm_mb"] for s in samples),
                   "end_vs_warmup_pct": round(change, 2),
                   "slope_mb_per_min": round(slope_per_minute(after), 4),
                   "growth_bytes_per_201_or_402_after_warmup": round(per_charge)},
        "rss_tolerance_pct": args.rss_tolerance_pct,
        "fds": {"start": rest["start"], "after_warmup": int(warmed["fds"]), "end": int(end["fds"]),
                "peak": int(max(s["fds"] for s in samples)),
                "rest_after_warmup": rest["after_warmup"], "rest_end": rest["end"],
                "kinds_at_rest": kinds},
        "rss_verdict": "flat" if rss_flat else "GROWING",
        "fd_verdict": "flat" if fd_flat else "GROWING",
        "traffic": {kind: {"sent": tally.sent[kind], "expected": TRAFFIC[kind][1],
                           "got": dict(tally.got.get(kind, Counter()))} for kind in TRAFFIC},
        "samples": samples,
    }
    ok = (rss_flat and fd_flat and not tally.mismatch_count and not tally.server_errors
          and not leaks and not tally.transport_errors)
    report["verdict"] = "pass" if ok else "FAIL"
    return report


# SqlStore's engine on SQLite: SQLAlchemy's AsyncAdaptedQueuePool, 5 connections kept (overflow
# ones are closed when given back). Each pooled connection holds the database file and its WAL.
SQLITE_POOL_SIZE = 5
SQLITE_FILES = frozenset({"cardseal.db", "cardseal.db-wal", "cardseal.db-shm"})


def fds_flat(before: dict[str, int], after: dict[str, int]) -> bool:
    """Descriptors at rest: no kind grew, except the database files while the connection pool
    fills up to its bound (a pool that opens its 4th connection on the first burst of 4 is not
    a leak; a 6th kept connection would be)."""
    for kind, count in after.items():
        if kind in SQLITE_FILES:
            if kind == "cardseal.db" and count > SQLITE_POOL_SIZE:
                return False
        elif count > before.get(kind, 0):
            return False
    return True


def scan_log(log: Path, tokens: list[str]) -> int:
    """How many of the suite's PANs and token signatures appear in the server's log."""
    text = log.read_text(errors="replace")
    needles = [PAN, PAN_DECLINED, PAN_LUHN_INVALID] + [t.rsplit(".", 1)[-1] for t in tokens]
    return sum(needle in text for needle in needles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3, help="client threads")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--rest-seconds", type=float, default=2.0,
                        help="pause before counting fds at rest")
    parser.add_argument("--fresh-share", type=float, default=0.05,
                        help="share of requests sent on a new connection")
    parser.add_argument("--rss-tolerance-pct", type=float, default=10.0)
    parser.add_argument("--reports", type=Path,
                        default=Path(__file__).resolve().parent / "reports")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    home = Path(tempfile.mkdtemp(prefix="cardseal-soak-"))
    try:
        report = run(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    write_reports(args.reports, soak=report)
    summary = {k: v for k, v in report.items() if k not in ("samples", "traffic")}
    print(json.dumps(summary, indent=2))
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())

