"""The gateway's database in trouble: SQLite locked, SQLite's disk full, PostgreSQL unreachable.

Each fault is real: a second SQLite connection holding an exclusive transaction (the gateway's
writes wait out its 5 s ``busy_timeout``, then fail "database is locked"); the SQLite file on a
small tmpfs filled up to ``ENOSPC`` ("database or disk is full"); PostgreSQL (the machine's
server, a scratch database) behind a TCP port that is closed and opened again.

Two moments for each fault:
- before the payment: the first write fails; ``503 storage_unavailable``, nothing reserved or
  recorded, the idempotency key free; healed, the same request pays;
- in the middle (the processor has charged, then the database fails): recording the payment and
  giving the token back both fail, so the token stays reserved (fail closed: never charged
  twice); once the database answers again the gateway gives it back by itself, and the
  client's retry is charged under the same payment id, which the processor takes as its
  idempotency key: charged once, recorded once.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cardseal.gateway.app import create_app
from cardseal.processor.base import ChargeRequest, ChargeResult, PaymentProcessor
from cardseal.processor.sandbox import SandboxProcessor
from cardseal.storage.schema import sync_url
from tests.faults.conftest import (
    Home,
    TcpGate,
    assert_error,
    assert_paid,
    make_home,
    pay,
    running,
    wait_for,
)

pytestmark = pytest.mark.integration

POSTGRES = ("127.0.0.1", 5432)  # the machine's PostgreSQL (trust auth), see the README
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TMPFS_SIZE = "4m"


class HookedProcessor(PaymentProcessor):
    """The sandbox, recording each call; ``on_charge`` runs once, after the first charge."""

    def __init__(self, on_charge: Callable[[], None] | None = None) -> None:
        self.sandbox = SandboxProcessor()
        self.calls: list[tuple[str, str]] = []  # (payment id, processor reference)
        self.on_charge = on_charge

    def charge(self, request: ChargeRequest) -> ChargeResult:
        result = self.sandbox.charge(request)
        self.calls.append((request.payment_id, result.processor_ref))
        hook, self.on_charge = self.on_charge, None
        if hook is not None:
            hook()
        return result


@dataclass
class StorageFault:
    """A home whose database can be broken (``inject``) and mended (``heal``)."""

    home: Home
    inject: Callable[[], None]
    heal: Callable[[], None]
    query_home: Home  # reaches the database while it is broken for the gateway
    readyz_fails: bool  # whether /readyz notices (reads still work on a locked or full SQLite)
    release_may_land: bool = False  # whether a one-row update may pass the fault (full disk)


# -- the faults ----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_locked(tmp_path: Path) -> Iterator[StorageFault]:
    home = make_home(tmp_path / "gateway")
    path = home.db_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)

    def inject() -> None:
        holder.execute("BEGIN EXCLUSIVE")

    def heal() -> None:
        holder.execute("ROLLBACK")

    try:
        yield StorageFault(home, inject, heal, home, readyz_fails=False)
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


@pytest.fixture
def sqlite_disk_full(tmp_path: Path) -> Iterator[StorageFault]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                              "tmpfs", str(disk)], capture_output=True, check=False)
    assert mounted.returncode == 0, (
        "this test mounts a small tmpfs (root with CAP_SYS_ADMIN, as on this project's "
        f"machines and CI): {mounted.stderr.decode(errors='replace')}")
    filler = disk / "filler"
    try:
        home = make_home(tmp_path / "gateway", db_url=f"sqlite:///{disk}/cardseal.db")

        def inject() -> None:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                for size in (1 << 16, 512, 1):  # until not one byte more fits
                    while True:
                        try:
                            os.write(fd, b"\0" * size)
                        except OSError as err:
                            assert err.errno == errno.ENOSPC
                            break
            finally:
                os.close(fd)

        def heal() -> None:
            filler.unlink()

        yield StorageFault(home, inject, heal, home, readyz_fails=False, release_may_land=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


@pytest.fixture
def postgres_down(tmp_path: Path) -> Iterator[StorageFault]:
    name = "cardseal_faults_" + secrets.token_hex(6)
    admin = create_engine(sync_url(POSTGRES_ADMIN), isolation_level="AUTOCOMMIT")
    gate = TcpGate(POSTGRES)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        direct = make_home(tmp_path / "gateway",
                           db_url=f"postgresql://postgres@127.0.0.1:{POSTGRES[1]}/{name}")
        gated = direct.with_settings(
            gateway={"database_url": f"postgresql://postgres@127.0.0.1:{gate.port}/{name}"})
        gate.open()
        yield StorageFault(gated, gate.close, gate.open, direct, readyz_fails=True)
    finally:
        gate.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


FAULTS = ["sqlite_locked", "sqlite_disk_full", "postgres_down"]


@pytest.fixture(params=FAULTS)
def fault(request: pytest.FixtureRequest) -> StorageFault:
    value: StorageFault = request.getfixturevalue(request.param)
    return value


# -- the tests -----------------------------------------------------------------------------------


def test_database_fault_before_the_payment(fault: StorageFault) -> None:
    home, db = fault.home, fault.query_home
    processor = HookedProcessor()
    app = create_app(home.settings, processor=processor)
    token = home.seal()
    key = "order-" + secrets.token_hex(4)
    with running(app) as client:
        assert_paid(pay(client, home.seal()))  # a first payment: the database works
        ledger = db.ledger()
        fault.inject()

        assert_error(pay(client, token, key=key), 503, "storage_unavailable")
        assert db.ledger() == ledger  # nothing recorded
        assert db.token_state(token) is None  # nothing reserved
        assert db.idempotency_state(key) is None
        assert len(processor.calls) == 1  # the card was never charged
        ready = client.get("/readyz")
        if fault.readyz_fails:
            assert_error(ready, 503, "storage_unavailable")
        else:
            assert ready.status_code == 200
        assert client.get("/healthz").status_code == 200

        fault.heal()
        body = assert_paid(pay(client, token, key=key))
        assert client.get("/readyz").status_code == 200
    after = {row["id"]: row["processor_ref"] for row in db.ledger()}
    assert after == {**{row["id"]: row["processor_ref"] for row in ledger},
                     body["id"]: processor.calls[-1][1]}  # recorded once
    assert len(processor.calls) == 2
    assert db.token_state(token) == "done"


def test_database_fault_after_the_charge(fault: StorageFault) -> None:
    home, db = fault.home, fault.query_home
    processor = HookedProcessor(on_charge=fault.inject)
    app = create_app(home.settings, processor=processor)
    token = home.seal()
    key = "order-" + secrets.token_hex(4)
    with running(app) as client:
        assert_error(pay(client, token, key=key), 503, "storage_unavailable")
        assert db.ledger() == []  # the charge was not recorded...
        # ...and the token cannot be charged again: it stays reserved when giving it back
        # fails too. A full disk may still take that one-row update (SQLite reuses the pages
        # the failed transaction had in its WAL): then it is given back at once.
        state, idempotency = db.token_state(token), db.idempotency_state(key)
        assert (state, idempotency) in {("pending", "in_flight"), ("released", None)}
        if not fault.release_may_land:
            assert state == "pending"

        fault.heal()  # the gateway gives the token and the key back by itself
        wait_for(lambda: db.token_state(token) == "released"
                 and db.idempotency_state(key) is None)
        body = assert_paid(pay(client, token, key=key))
    (first_id, first_ref), (second_id, second_ref) = processor.calls
    assert first_id == second_id == body["id"]  # one payment id: the processor's key
    assert first_ref == second_ref  # so the processor charged once
    assert db.ledger() == [{"id": body["id"], "replay_id": db.ledger()[0]["replay_id"],
                            "processor_ref": first_ref}]
    assert db.token_state(token) == "done"
    assert db.idempotency_state(key) == "done"
