"""Scale-out fixtures: several ``cardseal serve`` processes sharing one PostgreSQL database.

A ``Cluster`` is one gateway folder (``cardseal init`` + the gateway suite's extras, so every
instance has the same configuration, keyring and fingerprint secret, as the deploy guide asks)
served by several ``cardseal serve`` processes, each on its own free port. The database is a
fresh PostgreSQL database of this run (``tests/conftest.py``), migrated once with ``cardseal db
upgrade``; the replay store is that database or Redis under a fresh key prefix.

Each server runs in its own process group, so that cleanup also reaches uvicorn's worker
processes when ``--workers`` is above one, even if the test failed half way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import (
    GatewayHome,
    LeakRegistry,
    ServerProcess,
    TokenForge,
    cardseal_command,
    free_port,
    make_home,
)

START_TIMEOUT = 60.0  # several servers start at once on two cores



def _event(line: str) -> object:
    """The ``event`` of a JSON log line (None for any other line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("event") if isinstance(record, dict) else None

class GatewayInstance(ServerProcess):
    """``cardseal serve --port P [--workers N]`` in its own process group."""

    def __init__(self, home: GatewayHome, port: int, log_path: Path, *, workers: int = 1
                 ) -> None:
        super().__init__(home, port, log_path)
        self.workers = workers

    def spawn(self) -> None:
        args = ["--config", str(self.home.config), "serve", "--port", str(self.port)]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        with self.log_path.open("ab") as log, self.log_path.with_suffix(".out").open("ab") as out:
            self.proc = subprocess.Popen(
                cardseal_command(*args), stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                env=self.home.env, start_new_session=True,
            )

    def workers_started(self) -> int:
        """How many worker processes logged ``gateway_started`` (each does, once)."""
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines()
                   if _event(line) == "gateway_started")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until every worker started and ``/readyz`` answers 200 (database and replay store
        reachable)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=self.home.ssl_context(), timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"cardseal serve exited {self.proc.returncode}:\n"
                                       + self.log_path.read_text(errors="replace")[-4000:])
                try:
                    if (self.workers_started() >= self.workers
                            and client.get(self.url + "/readyz").status_code == 200):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"cardseal serve on port {self.port} was not ready in time")

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the whole group (uvicorn's supervisor stops its workers and waits for
        them), SIGKILL to the whole group if it lingers."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@dataclass
class Cluster:
    """One configuration, one database, several gateway processes."""

    home: GatewayHome
    instances: list[GatewayInstance]
    forge: TokenForge
    registry: LeakRegistry

    def client(self, index: int, **options: Any) -> httpx.Client:
        """An HTTPS client of instance ``index`` (every response is recorded)."""
        options.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.instances[index].url,
                            verify=self.home.ssl_context(),
                            event_hooks={"response": [self.registry.response]}, **options)

    def ledger(self) -> list[dict[str, Any]]:
        return self.home.query("SELECT id, replay_id, amount, status FROM payments")

    def stop(self) -> None:
        """Stop every instance (at once: each may take a few seconds to shut down)."""
        with ThreadPoolExecutor(max_workers=len(self.instances)) as pool:
            list(pool.map(GatewayInstance.stop, self.instances))


def start_cluster(base: Path, database_url: str, replay_store: str, *,
                  workers: Sequence[int]) -> Cluster:
    """``len(workers)`` instances on one migrated database; all started at once."""
    home = make_home(base, database_url, replay_store)
    instances = [GatewayInstance(home, free_port(), base / f"server.{i}.log", workers=n)
                 for i, n in enumerate(workers)]
    registry = LeakRegistry()
    cluster = Cluster(home, instances, TokenForge(home, registry), registry)
    try:
        for instance in instances:
            instance.spawn()
        for instance in instances:
            instance.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


Request = Callable[[httpx.Client], httpx.Response]


def race(cluster: Cluster, requests: Sequence[tuple[int, Request]]) -> list[httpx.Response]:
    """Run every ``(instance, request)`` at the same moment, each on its own connection
    (connected and TLS-handshaken before a barrier releases them all together)."""
    barrier = threading.Barrier(len(requests))

    def one(item: tuple[int, Request]) -> httpx.Response:
        index, request = item
        with cluster.client(index) as client:
            client.get("/healthz")
            barrier.wait(timeout=60)
            return request(client)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.fixture
def make_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        Callable[..., Cluster]]:
    """Start clusters; every one is stopped when the test ends, passed or failed."""
    started: list[Cluster] = []

    def make(database_url: str, replay_store: str = "database", *,
             workers: Sequence[int] = (1,)) -> Cluster:
        cluster = start_cluster(tmp_path_factory.mktemp("cluster"), database_url, replay_store,
                                workers=workers)
        started.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()
