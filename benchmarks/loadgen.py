"""The load generator: a separate process that replays pre-built HTTPS requests.

Run as ``python -m benchmarks.loadgen``; it reads one JSON command per line on stdin and
answers one JSON result per line on stdout, so that one warm process serves a whole run.
A command::

    {"port": 8443, "cafile": "cert.pem", "bodies": "file, one JSON body per line",
     "concurrency": 32, "duration": 2.0, "churn": 100, "server_pids": [123, 124]}

``concurrency`` clients, each on its own keep-alive HTTP/1.1 connection, send ``POST
/v1/payments`` back to back until ``duration`` seconds have passed or the bodies run out (each
body is sent once: the tokens are single-use). After ``churn`` requests a client closes its
connection and opens a new one: a worker that is busy accepts fewer of the new connections,
so the load spreads over ``cardseal serve --workers N`` (kept-alive connections would stay
where the first accept put them). The first connections open one after another before the
clock starts: in one burst, most of them landed on one worker, and a server slow enough
that a connection outlives the run never evened that out.

The client is asyncio on uvloop with a hand-written HTTP/1.1 exchange (request bytes built
before the clock starts; the response read by ``Content-Length``) so that it costs a fraction
of what the server spends per request; the result says how much CPU it used, and how much
the server processes used over the same window (``/proc/<pid>/stat``). Latency is from
writing the request to reading the last byte of the response; a reconnect is not part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_seconds, percentile

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_PID_HEADER = b"\r\nx-bench-pid:"
_CLOSE = b"\r\nconnection: close"


def _header_value(lowered: bytes, name: bytes) -> bytes | None:
    start = lowered.find(name)
    if start < 0:
        return None
    start += len(name)
    end = lowered.find(b"\r\n", start)
    return lowered[start:end].strip()


def _request(port: int, body: bytes) -> bytes:
    return (b"POST /v1/payments HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (port, len(body), body))


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.pids: Counter[str] = Counter()
        self.connects = 0


async def _run(command: dict[str, Any]) -> dict[str, Any]:
    port = int(command["port"])
    context = ssl.create_default_context(cafile=command["cafile"])
    bodies = [line for line in Path(command["bodies"]).read_bytes().splitlines() if line]
    queue = deque(_request(port, body) for body in bodies)
    concurrency = int(command["concurrency"])
    churn = max(1, int(command.get("churn", 100)))
    duration = float(command["duration"])
    pids = [int(p) for p in command.get("server_pids", [])]
    stats = _Stats()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        stats.connects += 1
        return await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                             server_hostname="127.0.0.1")

    # One after another, not in one burst: asyncio accepts every pending connection at once,
    # so a burst lands on whichever worker wakes first, and where a connection outlives the
    # run (fewer than ``churn`` requests in it) that split would stay for the whole run.
    connections = [await connect() for _ in range(concurrency)]
    stats.connects = 0
    cpu_start = time.process_time()
    server_start = {pid: cpu_seconds(pid) for pid in pids}
    started = time.perf_counter()
    deadline = started + duration

    async def client(slot: int) -> None:
        reader, writer = connections[slot]
        served = 0
        clock = time.perf_counter
        while queue and clock() < deadline:
            if served >= churn:
                writer.close()
                reader, writer = await connect()
                served = 0
                if not queue:  # emptied by the others while this one reconnected
                    break
            request = queue.popleft()
            sent = clock()
            try:
                writer.write(request)
                head = await reader.readuntil(_HEADER_END)
                lowered = head.lower()
                length = _header_value(lowered, _CONTENT_LENGTH)
                if length:
                    await reader.readexactly(int(length))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
                stats.statuses[f"error:{type(err).__name__}"] += 1
                writer.close()
                reader, writer = await connect()
                served = 0
                continue
            done = clock()
            status = head[9:12].decode()
            stats.statuses[status] += 1
            if status == "201":
                stats.latencies.append(done - sent)
            pid = _header_value(lowered, _PID_HEADER)
            if pid:
                stats.pids[pid.decode()] += 1
            served += 1
            if _CLOSE in lowered:
                writer.close()
                reader, writer = await connect()
                served = 0
        connections[slot] = (reader, writer)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - cpu_start
    server_cpu = {pid: cpu_seconds(pid) - server_start[pid] for pid in pids}
    for _reader, writer in connections:
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.sleep(0)
    latencies = sorted(stats.latencies)
    ok = stats.statuses.get("201", 0)
    return {
        "elapsed": elapsed,
        "ok": ok,
        "rate": ok / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "statuses": dict(stats.statuses),
        "pids": dict(stats.pids),
        "client_cpu": client_cpu,
        "server_cpu": {str(pid): cpu for pid, cpu in server_cpu.items()},
        "reconnects": stats.connects,
        "exhausted": not queue,
        "sent": len(bodies) - len(queue),
    }


def _runner() -> Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run
    return uvloop.run


def main() -> int:
    run = _runner()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = run(_run(json.loads(line)))
        except Exception as err:
            result = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
