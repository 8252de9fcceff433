"""The servers the benchmarks need, started on free ports and always stopped.

``Processes`` owns every child process the suite starts; each runs in its own session (so a
Ctrl-C at the terminal reaches the suite, which then stops them in order) and is stopped by
its process-group id: SIGTERM, then SIGKILL after a grace period. ``Moto`` is moto's KMS
server in a subprocess; ``Postgres`` creates fresh databases and drops them; ``Home`` is a
``cardseal init`` folder whose KMS key is an ``aws-kms://`` key on the emulator.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import boto3
import httpx
from cryptography.hazmat.primitives import serialization

from benchmarks.common import children_of

REGION: Final = "us-east-1"
ROOT: Final = Path(__file__).resolve().parents[1]
_CARDSEAL: Final = Path(sys.executable).with_name("cardseal")
_START_TIMEOUT: Final = 60.0
_STOP_GRACE: Final = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fake_aws_environment(endpoint: str | None = None) -> None:
    """Fake credentials for the emulator in this process (children inherit them); every
    ``AWS_*`` variable of the host is dropped, so nothing can reach a real AWS account."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_KMS"] = endpoint


def raise_on_sigterm() -> None:
    """Ctrl-C (even where the shell started us with SIGINT ignored, as it does for a
    background job), SIGTERM and SIGHUP unwind the suite, so every ``finally`` runs."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


class Processes:
    """Every child process of the suite; ``close`` stops them all (newest first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, command: list[str], *, env: Mapping[str, str] | None = None,
              stdin: int | None = None, stdout: int | None = None,
              cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        """Start ``command`` in a new session; stderr (and stdout unless piped) to a log."""
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            command, env=dict(env) if env is not None else None, cwd=cwd, stdin=stdin,
            stdout=stdout if stdout is not None else log, stderr=log, start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; reaped."""
        if proc in self._procs:
            self._procs.remove(proc)
        pgid = proc.pid  # the leader of its own session: its pid is the group id
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=_STOP_GRACE)
        # Stragglers of the group (workers whose supervisor died first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)
        for log in self._logs:
            log.close()
        self._logs.clear()


def _log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# -- moto's KMS server -------------------------------------------------------------------------


@dataclass
class Moto:
    endpoint: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, procs: Processes) -> Moto:
        port = free_port()
        proc = procs.start("moto", [sys.executable, "-c", "from moto.server import main; main()",
                                    "-H", "127.0.0.1", "-p", str(port)])
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError("moto's server exited:\n" + _log_tail(procs.log_dir /
                                                                        "moto.log"))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        return cls(endpoint, proc)

    def client(self) -> Any:  # mypy_boto3_kms.KMSClient
        return boto3.session.Session().client("kms", region_name=REGION,
                                              endpoint_url=self.endpoint)

    def symmetric_key(self) -> str:
        """A new SYMMETRIC_DEFAULT key on the emulator: its ARN."""
        client = self.client()
        try:
            arn: str = client.create_key(Description="cardseal bench")["KeyMetadata"]["Arn"]
        finally:
            client.close()
        return arn


# -- PostgreSQL --------------------------------------------------------------------------------


class Postgres:
    """Fresh databases ``cardseal_bench_<run>_<label>`` on the server; all dropped at close."""

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy.engine import make_url

        self._admin = make_url(admin_url).set(drivername="postgresql")
        self._run = secrets.token_hex(4)
        self._created: list[str] = []

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._admin.render_as_string(hide_password=False),
                               autocommit=True, connect_timeout=5)

    def available(self) -> str | None:
        """None when the server answers, else why not."""
        try:
            with self._connect() as conn:
                conn.execute("SELECT 1")
        except Exception as err:
            return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None

    def create(self, label: str) -> str:
        from psycopg import sql

        name = f"cardseal_bench_{self._run}_{label}"
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.append(name)
        url: str = self._admin.set(database=name).render_as_string(hide_password=False)
        return url

    def close(self) -> None:
        if not self._created:
            return
        from psycopg import sql

        with self._connect() as conn:
            for name in self._created:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
        self._created.clear()


# -- a cardseal home on the emulator -----------------------------------------------------------


@dataclass(frozen=True)
class Home:
    """``cardseal init`` output whose KMS key is ``aws-kms://<ARN>`` on the emulator."""

    directory: Path
    config: Path
    cert: Path
    tls_key: Path
    signing_pem: Path
    public_pem: Path
    kms_uri: str

    @classmethod
    def create(cls, directory: Path, key_arn: str, endpoint: str, alg: str = "RS256") -> Home:
        from cardseal.scaffold import init_dir

        config = init_dir(directory, alg=alg)
        uri = f"aws-kms://{key_arn}"
        text = config.read_text().replace('"local://main"', f'"{uri}"')
        text = text.replace('endpoint_url = ""', f'endpoint_url = "{endpoint}"')
        config.write_text(text)
        signing = directory / "keys" / "signing.pem"
        private = serialization.load_pem_private_key(signing.read_bytes(), None)
        public = directory / "keys" / "public.pem"
        public.write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return cls(directory, config, directory / "tls" / "cert.pem",
                   directory / "tls" / "key.pem", signing, public, uri)


def base_env() -> dict[str, str]:
    """This process's environment without ``CARDSEAL_*``, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDSEAL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- HTTPS servers under test ------------------------------------------------------------------


@dataclass
class Server:
    """An HTTPS server under test: the uvicorn supervisor (or sole worker) and its workers."""

    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    workers: int
    log: Path
    metrics_dir: Path | None = None

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers (or the server itself for one)."""
        if self.workers == 1:
            return [self.proc.pid]
        return sorted(pid for pid, cmd in children_of(self.proc.pid) if "spawn_main" in cmd)


def _wait_ready(server: Server, cacert: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    with httpx.Client(verify=str(cacert), timeout=2.0) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited {server.proc.returncode}:\n"
                                   + _log_tail(server.log))
            try:
                if (client.get(server.url + "/healthz").status_code == 200
                        and len(server.worker_pids()) == server.workers):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} did not answer /healthz in time:\n"
                                   + _log_tail(server.log))
            time.sleep(0.1)


def start_cardseal(procs: Processes, home: Home, *, name: str, database_url: str,
                   workers: int) -> Server:
    """``cardseal serve --workers N`` on a free port; Prometheus multiprocess files in a
    folder of our own, so that requests can be counted per worker process."""
    port = free_port()
    metrics_dir = procs.log_dir / f"{name}-metrics"
    metrics_dir.mkdir()
    env = base_env()
    env["CARDSEAL_GATEWAY__DATABASE_URL"] = database_url
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    command = ([str(_CARDSEAL)] if _CARDSEAL.is_file()
               else [sys.executable, "-c", "from cardseal.cli import main; main()"])
    proc = procs.start(name, [*command, "--config", str(home.config), "serve", "--host",
                              "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                       env=env)
    server = Server(name, f"https://127.0.0.1:{port}", port, proc, workers,
                    procs.log_dir / f"{name}.log", metrics_dir)
    _wait_ready(server, home.cert)
    return server


def start_shell(procs: Processes, home: Home, *, name: str, app: str, workers: int,
                extra_env: Mapping[str, str] | None = None) -> Server:
    """``uvicorn benchmarks.shells:<app>`` served like ``cardseal serve`` serves the gateway:
    same TLS certificate, same worker model, no access log, no server header."""
    port = free_port()
    env = base_env()
    env["BENCH_PUBLIC_PEM"] = str(home.public_pem)
    env.update(extra_env or {})
    proc = procs.start(name, [
        sys.executable, "-m", "uvicorn", f"benchmarks.shells:{app}", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--ssl-certfile", str(home.cert), "--ssl-keyfile", str(home.tls_key),
        "--no-access-log", "--no-server-header", "--log-level", "warning",
    ], env=env)
    server = Server(name, f"https://127.0.0.1:{port}", port, proc, workers,
                    procs.log_dir / f"{name}.log")
    _wait_ready(server, home.cert)
    return server


def authorized_per_pid(metrics_dir: Path) -> dict[int, float]:
    """``cardseal_payment_outcomes_total{code="authorized"}`` per worker process, read from
    the Prometheus multiprocess files (``counter_<pid>.db``) that each worker writes."""
    import json

    from prometheus_client.mmap_dict import MmapedDict

    counts: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        total = 0.0
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        for key, value, _timestamp, _pos in values:
            _metric, sample, labels, _help = json.loads(key)
            if sample == "cardseal_payment_outcomes_total" and labels.get("code") == "authorized":
                total += value
        counts[pid] = total
    return counts


@contextlib.contextmanager
def suppress_interrupts() -> Iterator[None]:
    """Let cleanup finish even if a second Ctrl-C arrives."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
