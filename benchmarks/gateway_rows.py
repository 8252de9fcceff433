"""Rows 4 and 5: the gateway over HTTPS under load, and the peak RSS of its workers.

Servers, each started on a free port with the same TLS certificate and worker count:
- ``cardseal serve`` on SQLite (a fresh file) and on PostgreSQL (a fresh database, dropped at
  the end), KMS key ``aws-kms://`` on moto, every other setting as ``cardseal init`` writes it;
- the HTTP floor and the seed's server logic (``benchmarks.shells``) under uvicorn.

For each worker count all servers are started; at each concurrency every server gets an
untimed warm-up, then ``repeats`` timed runs of the load generator (``benchmarks.loadgen``, a
separate process), interleaved: run i of every server back to back, so that load from elsewhere
on this shared machine falls on all of them alike. Tokens are sealed before each timed
run, one per request (single use): cardseal's by ``cardseal.config.build_sealer`` in two
helper processes (each body once); the floor's are cardseal tokens of the same size with a
one-hour lifetime, and the seed's are made by the seed's client (KMS Encrypt each), both from a
pool made once and handed out in turn, round and round (neither enforces single use, and
neither caches anything by token, so a body sent twice costs what a new one would). How the
requests spread over the workers comes from the gateway's own Prometheus files
(``counter_<pid>.db``, one per worker) and from the shells' ``x-bench-pid`` header; CPU per
process from ``/proc``.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Progress, Spread, peak_rss_kib, wait_until_quiet
from benchmarks.seed_flow import SEED_CARD, PresealingSeedClient, new_kms_client
from benchmarks.services import (
    Home,
    Moto,
    Postgres,
    Processes,
    Server,
    authorized_per_pid,
    start_cardseal,
    start_shell,
)

AMOUNT = 1999
CURRENCY = "USD"
_FLOOR_LIFETIME = 3600
_FIRST_GUESS = 2000.0  # requests/s, before anything was measured (sealing is cheap)


# -- tokens ------------------------------------------------------------------------------------

_SEALERS: dict[int, Any] = {}
_CONFIG: list[str] = []


def _init_sealer(config: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the suite handles Ctrl-C and stops us
    _CONFIG.append(config)


def _seal_bodies(count: int, lifetime: int) -> list[bytes]:
    """(In a helper process) ``count`` request bodies, each with a fresh cardseal token."""
    from cardseal.card import Card
    from cardseal.config import build_sealer, load_settings
    from cardseal.tokens import Payment

    sealer = _SEALERS.get(lifetime)
    if sealer is None:
        settings = load_settings(_CONFIG[0])
        client = settings.client.model_copy(update={"token_lifetime": lifetime})
        sealer = build_sealer(settings.model_copy(update={"client": client}))
        _SEALERS[lifetime] = sealer
    card = Card.from_json(b'{"card_number": "4242424242424242", "expiry_date": "12/2099", '
                          b'"cvv": "123"}')
    payment = Payment(AMOUNT, CURRENCY)
    return [json.dumps({"token": sealer.seal(card, payment=payment), "amount": AMOUNT,
                        "currency": CURRENCY}).encode() for _ in range(count)]


class CardsealTokens:
    """Request bodies with fresh tokens, sealed by two helper processes."""

    def __init__(self, home: Home) -> None:
        self._pool = get_context("spawn").Pool(2, initializer=_init_sealer,
                                               initargs=(str(home.config),))

    def bodies(self, count: int, lifetime: int = 300) -> list[bytes]:
        half = (count + 1) // 2
        parts = self._pool.starmap(_seal_bodies, [(half, lifetime), (count - half, lifetime)])
        return [body for part in parts for body in part]

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


class Rotation:
    """A fixed pool of bodies handed out in turn, round and round (for servers without single
    use): a run never runs out of requests, however fast the server."""

    def __init__(self, bodies: list[bytes]) -> None:
        self._bodies = bodies
        self._next = 0

    def take(self, count: int) -> list[bytes]:
        taken = [self._bodies[(self._next + i) % len(self._bodies)] for i in range(count)]
        self._next = (self._next + count) % len(self._bodies)
        return taken


def seed_bodies(home: Home, key_arn: str, count: int) -> list[bytes]:
    client = PresealingSeedClient(kms_client=new_kms_client(), key_id=key_arn,
                                  private_pem=home.signing_pem)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            tokens = list(pool.map(lambda _: client.create_jwt(SEED_CARD), range(count)))
    finally:
        client.kms_client.close()
    return [json.dumps({"token": t, "amount": AMOUNT, "currency": CURRENCY}).encode()
            for t in tokens]


# -- the load generator ------------------------------------------------------------------------


class LoadGen:
    """``python -m benchmarks.loadgen`` kept running; one JSON command/result per line."""

    def __init__(self, procs: Processes) -> None:
        self._procs = procs
        self.proc = procs.start("loadgen", [sys.executable, "-m", "benchmarks.loadgen"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._bodies = procs.log_dir / "bodies.txt"

    def run(self, server: Server, cafile: Path, bodies: list[bytes], *, concurrency: int,
            duration: float, churn: int, watch: list[int]) -> dict[str, Any]:
        self._bodies.write_bytes(b"\n".join(bodies) + b"\n")
        command = {"port": server.port, "cafile": str(cafile), "bodies": str(self._bodies),
                   "concurrency": concurrency, "duration": duration, "churn": churn,
                   "server_pids": server.worker_pids() + watch}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited; see its log")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"load generator: {result['error']}")
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._procs.stop(self.proc)


# -- results -----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One server at one concurrency: the timed runs."""

    server: str
    workers: int
    concurrency: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)  # share of requests per worker

    @property
    def rate(self) -> Spread:
        return Spread.of([r["rate"] for r in self.runs])

    @property
    def p50(self) -> Spread:
        return Spread.of([r["p50_ms"] for r in self.runs])

    @property
    def p99(self) -> Spread:
        return Spread.of([r["p99_ms"] for r in self.runs])

    def cores(self, key: str, pids: set[str] | None = None) -> float:
        """Median over runs of CPU seconds per wall second (client, or server pids)."""
        values: list[float] = []
        for run in self.runs:
            if key == "client":
                cpu = float(run["client_cpu"])
            else:
                cpu = sum(v for p, v in run["server_cpu"].items() if pids is None or p in pids)
            values.append(cpu / run["elapsed"])
        return statistics.median(values)

    def errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for run in self.runs:
            for status, count in run["statuses"].items():
                if status != "201":
                    total[status] = total.get(status, 0) + count
        return total


@dataclass
class GatewayResults:
    cells: dict[tuple[str, int, int], Cell] = field(default_factory=dict)
    rss: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    kms: dict[tuple[str, int], str] = field(default_factory=dict)
    data_keys: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GatewayPlan:
    servers: tuple[str, ...]
    workers: tuple[int, ...]
    concurrency: tuple[int, ...]
    repeats: int
    duration: float
    warmup: float
    churn: int

    def steps(self) -> int:
        return len(self.workers) * len(self.concurrency)


_LABELS = {
    "floor": "HTTP floor (FastAPI + PyJWT verify)",
    "seed": "seed server logic (PyJWT+PEM, KMS Decrypt)",
    "cardseal-sqlite": "cardseal serve, SQLite",
    "cardseal-postgresql": "cardseal serve, PostgreSQL",
}


def _kms_calls(server: Server, cafile: Path) -> str:
    """The gateway's own KMS counter from /metrics (all workers)."""
    try:
        text = httpx.get(server.url + "/metrics", verify=str(cafile), timeout=10).text
    except httpx.HTTPError as err:
        return f"/metrics failed: {err}"
    calls = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^cardseal_kms_calls_total\{operation="(\w+)"\} ([0-9.e+]+)$', text, re.M)}
    authorized = sum(float(m.group(1)) for m in re.finditer(
        r'^cardseal_payment_outcomes_total\{code="authorized"\} ([0-9.e+]+)$', text, re.M))
    shown = ", ".join(f"{op} {n:,.0f}" for op, n in sorted(calls.items()) if n)
    return f"KMS calls {shown or 'none'} for {authorized:,.0f} authorized payments"


@dataclass
class _Running:
    """A started server under test and how to get request bodies for it."""

    name: str
    server: Server
    take: Callable[[int], list[bytes]]
    data_keys: set[str] = field(default_factory=set)
    guess: float = _FIRST_GUESS


def run_gateway_rows(*, plan: GatewayPlan, procs: Processes, home: Home, moto: Moto,
                     key_arn: str, postgres: Postgres, progress: Progress
                     ) -> GatewayResults:
    """Per worker count, every server is started, then each concurrency level runs: a warm-up
    per server, then the timed runs interleaved (run i of every server back to back), so that
    load from elsewhere on the machine falls on all of them alike."""
    results = GatewayResults()
    names = list(plan.servers)
    if "cardseal-postgresql" in names:
        problem = postgres.available()
        if problem:
            results.skipped.append(f"cardseal-postgresql: PostgreSQL unavailable ({problem})")
            names.remove("cardseal-postgresql")
    loadgen = LoadGen(procs)
    tokens = CardsealTokens(home)
    try:
        pools: dict[str, Rotation] = {}
        for workers in plan.workers:
            running: list[_Running] = []
            try:
                for name in names:
                    progress.step(f"row 4: starting {name} w{workers}")
                    running.append(_start(name, workers, plan=plan, procs=procs, home=home,
                                          key_arn=key_arn, postgres=postgres, tokens=tokens,
                                          pools=pools, progress=progress))
                for concurrency in plan.concurrency:
                    progress.step(f"row 4: w{workers} c{concurrency}")
                    cells = _run_level(plan, loadgen, running, home, moto, concurrency,
                                       progress)
                    for item, cell in zip(running, cells, strict=True):
                        results.cells[(item.name, workers, concurrency)] = cell
                    progress.finish_step()
                for item in running:
                    key = (item.name, workers)
                    results.rss[key] = [peak_rss_kib(p) for p in item.server.worker_pids()]
                    if item.name.startswith("cardseal"):
                        results.kms[key] = _kms_calls(item.server, home.cert)
                        results.data_keys[key] = item.data_keys
            finally:
                for item in running:
                    procs.stop(item.server.proc)
    finally:
        tokens.close()
        loadgen.close()
    return results


def _start(name: str, workers: int, *, plan: GatewayPlan, procs: Processes, home: Home,
           key_arn: str, postgres: Postgres, tokens: CardsealTokens, pools: dict[str, Rotation],
           progress: Progress) -> _Running:
    label = f"{name}-w{workers}"
    if name == "floor":
        if name not in pools:
            progress.tick("sealing the floor's tokens")
            pools[name] = Rotation(tokens.bodies(int(4000 * plan.duration) + 64,
                                                 _FLOOR_LIFETIME))
        server = start_shell(procs, home, name=label, app="floor_app", workers=workers)
        return _Running(name, server, pools[name].take)
    if name == "seed":
        if name not in pools:
            progress.tick("making the seed's tokens (seed client)")
            pools[name] = Rotation(seed_bodies(home, key_arn, int(800 * plan.duration) + 64))
        server = start_shell(procs, home, name=label, app="seed_app", workers=workers)
        return _Running(name, server, pools[name].take)
    from cardseal.storage.migrate import upgrade

    if name == "cardseal-sqlite":
        url = f"sqlite:///{procs.log_dir / (label + '.db')}"
    else:
        url = postgres.create(label.replace("-", "_"))
    upgrade(url)
    server = start_cardseal(procs, home, name=label, database_url=url, workers=workers)
    return _Running(name, server, tokens.bodies)


def _run_level(plan: GatewayPlan, loadgen: LoadGen, running: list[_Running], home: Home,
               moto: Moto, concurrency: int, progress: Progress) -> list[Cell]:
    """Every server at one concurrency: warm-ups, then the interleaved timed runs."""
    watch = [moto.proc.pid]

    def needed(rate: float, seconds: float) -> int:
        return int(max(rate, 20.0) * seconds * 2.0) + 4 * concurrency

    cells = [Cell(item.name, item.server.workers, concurrency) for item in running]
    estimates: list[float] = []
    for item in running:
        progress.tick(f"warm-up {item.name}")
        bodies = item.take(needed(item.guess, plan.warmup))
        warm = loadgen.run(item.server, home.cert, bodies, concurrency=concurrency,
                           duration=plan.warmup, churn=plan.churn, watch=watch)
        _note_data_keys(bodies[:warm["sent"]], item.data_keys)
        estimates.append(max(warm["rate"], 1.0))
    for repeat in range(plan.repeats):
        for index, item in enumerate(running):
            server = item.server
            progress.tick(f"run {repeat + 1}/{plan.repeats}: {item.name} (sealing)")
            bodies = item.take(needed(estimates[index], plan.duration))
            progress.tick(f"run {repeat + 1}/{plan.repeats}: {item.name} (waiting for quiet)")
            busy, waited = wait_until_quiet()
            before = (authorized_per_pid(server.metrics_dir)
                      if server.metrics_dir is not None else {})
            progress.tick(f"run {repeat + 1}/{plan.repeats}: {item.name} "
                          f"({len(bodies)} requests)")
            result = loadgen.run(server, home.cert, bodies, concurrency=concurrency,
                                 duration=plan.duration, churn=plan.churn, watch=watch)
            if server.metrics_dir is not None:
                after = authorized_per_pid(server.metrics_dir)
                result["pids"] = {str(p): after[p] - before.get(p, 0.0) for p in after
                                  if after[p] - before.get(p, 0.0) > 0}
            result["moto_cpu"] = result["server_cpu"].pop(str(moto.proc.pid), 0.0)
            result["busy_before"], result["quiet_wait"] = busy, waited
            _note_data_keys(bodies[:result["sent"]], item.data_keys)
            cells[index].runs.append(result)
            estimates[index] = max(estimates[index], result["rate"])
    for item, cell, estimate in zip(running, cells, estimates, strict=True):
        cell.spread = _spread(cell, item.server.worker_pids())
        item.guess = estimate
    return cells


def _note_data_keys(bodies: list[bytes], data_keys: set[str]) -> None:
    """Add the wrapped data keys of cardseal tokens in ``bodies`` (other tokens: none)."""
    from cardseal._encoding import b64url_decode

    for body in bodies:
        payload = json.loads(body)["token"].split(".")[1]
        meta_data = json.loads(b64url_decode(payload)).get("meta_data", "")
        if meta_data.count(".") == 4:
            data_keys.add(meta_data.split(".")[1])


def _spread(cell: Cell, pids: list[int]) -> list[float]:
    """Share of the cell's responses per worker, in ``pids`` order."""
    counts = dict.fromkeys((str(p) for p in pids), 0.0)
    for run in cell.runs:
        for pid, n in run["pids"].items():
            counts[pid] = counts.get(pid, 0.0) + float(n)
    total = sum(counts.values()) or 1.0
    return [counts[p] / total for p in counts]


# -- printing ----------------------------------------------------------------------------------


def print_gateway(results: GatewayResults, plan: GatewayPlan, progress: Progress) -> None:
    progress.emit(f"Row 4 - gateway over HTTPS: authorized payments/s and latency, "
                  f"{plan.repeats} runs x {plan.duration:g}s per cell, median [min-max]")
    progress.emit(f"  load: benchmarks.loadgen in its own process, keep-alive HTTP/1.1, "
                  f"a new connection every {plan.churn} requests per client")
    progress.emit(f"  {'server':<44} {'w':>1} {'c':>3} {'payments/s':>24} "
                  f"{'p50 ms':>20} {'p99 ms':>20}  per worker   server/moto/client cores")
    order = {name: i for i, name in enumerate(_LABELS)}
    for (name, workers, concurrency), cell in sorted(
            results.cells.items(), key=lambda kv: (kv[0][1], order[kv[0][0]], kv[0][2])):
        shares = "/".join(f"{s * 100:.0f}" for s in cell.spread) + "%"
        moto = statistics.median(r["moto_cpu"] / r["elapsed"] for r in cell.runs)
        line = (f"  {_LABELS[name]:<44} {workers:>1} {concurrency:>3} {cell.rate.fmt():>24} "
                f"{cell.p50.fmt('', 1):>20} {cell.p99.fmt('', 1):>20}  {shares:<11}  "
                f"{cell.cores('server'):.2f}/{moto:.2f}/{cell.cores('client'):.2f}")
        errors = cell.errors()
        if errors:
            line += f"  NON-201: {errors}"
        if any(r["exhausted"] and r["elapsed"] < plan.duration * 0.9 for r in cell.runs):
            line += "  (a run ran out of tokens early)"
        progress.emit(line)
    for (name, workers), kms in results.kms.items():
        keys = len(results.data_keys.get((name, workers), ()))
        progress.emit(f"  {_LABELS[name]} w{workers}: {kms} (its /metrics); the tokens sent "
                      f"hold {keys} distinct data keys, so at best {keys * workers} Decrypt "
                      f"calls ({keys} per worker)")
    for skipped in results.skipped:
        progress.emit(f"  skipped: {skipped}")
    _print_quiet(results, progress)
    _print_client_check(results, progress)
    _print_ratios(results, plan, progress)
    progress.emit()
    progress.emit("Row 5 - peak RSS per worker process (VmHWM, after all of its runs)")
    for (name, workers), rss in results.rss.items():
        shown = ", ".join(f"{kib / 1024:.0f} MiB" for kib in rss)
        progress.emit(f"  {_LABELS[name]:<44} w{workers}: {shown}")
    progress.emit()


def _print_quiet(results: GatewayResults, progress: Progress) -> None:
    """How busy the CPUs were when each server's turn came, and how long it waited for them
    to quieten (``wait_until_quiet``), per server over all of its timed runs."""
    parts = []
    for name in _LABELS:
        runs = [r for (n, _, _), cell in results.cells.items() if n == name for r in cell.runs]
        if not runs:
            continue
        busy = sorted(r["busy_before"] for r in runs)
        waited = max(r["quiet_wait"] for r in runs)
        parts.append(f"{name} {statistics.median(busy) * 100:.0f}% (max {busy[-1] * 100:.0f}%)"
                     f", waited <= {waited:.1f} s")
    if parts:
        progress.emit(f"  before each timed run, CPUs busy in the first 100 ms: {'; '.join(parts)}")


def _print_client_check(results: GatewayResults, progress: Progress) -> None:
    """Is the load generator the bottleneck? CPU per request, client against server."""
    worst: tuple[float, str] | None = None
    for (name, workers, concurrency), cell in results.cells.items():
        client = cell.cores("client")
        if worst is None or client > worst[0]:
            per_req = statistics.median(r["client_cpu"] / max(r["ok"], 1) for r in cell.runs)
            server = statistics.median(sum(r["server_cpu"].values()) / max(r["ok"], 1)
                                       for r in cell.runs)
            worst = (client, f"{name} w{workers} c{concurrency}: client {client:.2f} cores, "
                             f"{per_req * 1e6:.0f} us CPU per request against the server's "
                             f"{server * 1e6:.0f} us")
    if worst is not None:
        progress.emit(f"  client check (busiest cell) - {worst[1]}")


def _print_ratios(results: GatewayResults, plan: GatewayPlan, progress: Progress) -> None:
    progress.emit("  cardseal against the floor and the seed (same workers, same clients; "
                  "ratio of medians)")
    for (name, workers, concurrency), cell in results.cells.items():
        if not name.startswith("cardseal"):
            continue
        parts = []
        floor = results.cells.get(("floor", workers, concurrency))
        seed = results.cells.get(("seed", workers, concurrency))
        if floor is not None:
            parts.append(f"{cell.rate.median / floor.rate.median:5.2f}x floor rate, "
                         f"p99 {cell.p99.median / floor.p99.median:5.2f}x floor p99")
        if seed is not None:
            parts.append(f"{cell.rate.median / seed.rate.median:6.2f}x seed rate")
        if parts:
            progress.emit(f"    {name:<20} w{workers} c{concurrency:<3} " + "; ".join(parts))
