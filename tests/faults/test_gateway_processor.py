"""The payment processor in trouble, and the gateway's housekeeping.

A processor that answers after ``processor.timeout``, or fails (``ProcessorError``, or any
other exception a real adapter may let out): ``503 processor_unavailable`` with
``Retry-After``, within the timeout; nothing recorded; the token given back. The retry is
charged under the same payment id, so a processor that finished late (or failed after
charging) charges once. Then: expired single-use records are purged while the app runs, and a
processor timeout out of range is refused when the app is built.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import ClassVar

import pytest
from sqlalchemy import create_engine, text

from cardseal.errors import ConfigError, ProcessorError
from cardseal.gateway.app import create_app
from cardseal.processor.base import ChargeRequest, ChargeResult, PaymentProcessor
from cardseal.processor.sandbox import SandboxProcessor
from cardseal.storage.schema import sync_url
from tests.faults.conftest import (
    Home,
    assert_error,
    assert_paid,
    pay,
    running,
    wait_for,
)

TIMEOUT = 0.3
LATE = 2.5  # how long the slow processor takes: far past the timeout
ANSWERED_WITHIN = TIMEOUT + 1.2  # the request's bound, with room for a loaded machine


class TroubledProcessor(PaymentProcessor):
    """The sandbox behind a fault: ``"slow"`` answers after ``delay`` s, ``"raise"`` charges
    and then raises ``error`` (the answer is lost); ``None`` is healthy."""

    def __init__(self, fault: str | None, *, delay: float = 0.0,
                 error: Exception | None = None) -> None:
        self.sandbox = SandboxProcessor()
        self.fault = fault
        self.delay = delay
        self.error = error
        self.calls: list[tuple[str, str]] = []  # (payment id, processor reference)
        self.finished = threading.Event()

    def charge(self, request: ChargeRequest) -> ChargeResult:
        if self.fault == "slow":
            time.sleep(self.delay)
        result = self.sandbox.charge(request)
        self.calls.append((request.payment_id, result.processor_ref))
        self.finished.set()
        if self.fault == "raise" and self.error is not None:
            raise self.error
        return result


class InlineTroubledProcessor(TroubledProcessor):
    """The same faults from a processor that says it never blocks: called on the event loop,
    without the timeout's thread, and its failures still become processor_unavailable."""

    blocking: ClassVar[bool] = False


def processor_home(home: Home) -> Home:
    return home.with_settings(processor={"timeout": TIMEOUT})


@pytest.mark.parametrize("make", [
    lambda: TroubledProcessor("slow", delay=LATE),
    lambda: TroubledProcessor("raise", error=ProcessorError()),
    lambda: TroubledProcessor("raise", error=ConnectionResetError("peer reset")),
    lambda: TroubledProcessor("raise", error=RuntimeError("adapter bug")),
    lambda: InlineTroubledProcessor("raise", error=ProcessorError()),
    lambda: InlineTroubledProcessor("raise", error=RuntimeError("adapter bug")),
], ids=["slow-past-timeout", "processor-error", "connection-reset", "unexpected-exception",
        "inline-processor-error", "inline-unexpected-exception"])
def test_processor_fault_is_processor_unavailable_and_charges_once(
        home: Home, make: Callable[[], TroubledProcessor]) -> None:
    home = processor_home(home)
    processor = make()
    app = create_app(home.settings, processor=processor)
    token = home.seal()
    key = "order-" + secrets.token_hex(4)
    with running(app) as client:
        start = time.monotonic()
        assert_error(pay(client, token, key=key), 503, "processor_unavailable")
        assert time.monotonic() - start < ANSWERED_WITHIN  # the timeout holds
        assert home.ledger() == []
        assert home.token_state(token) == "released"
        assert home.idempotency_state(key) is None
        assert processor.finished.wait(5)  # the late call ends (and charges) anyway

        processor.fault = None
        body = assert_paid(pay(client, token, key=key))
    (first_id, first_ref), (second_id, second_ref) = processor.calls
    assert first_id == second_id == body["id"]
    assert first_ref == second_ref  # the same payment id: charged once
    assert home.ledger() == [{"id": body["id"], "replay_id": home.ledger()[0]["replay_id"],
                              "processor_ref": first_ref}]
    assert home.token_state(token) == "done"


def test_processor_hung_for_good_keeps_answering_within_the_timeout(home: Home) -> None:
    """Every request still ends within the timeout while the processor never answers."""
    home = processor_home(home)
    release = threading.Event()

    class Hung(PaymentProcessor):
        def charge(self, request: ChargeRequest) -> ChargeResult:
            release.wait(30)
            raise ProcessorError()

    app = create_app(home.settings, processor=Hung())
    tokens = [home.seal() for _ in range(3)]
    try:
        with running(app) as client:
            for token in tokens:
                start = time.monotonic()
                assert_error(pay(client, token), 503, "processor_unavailable")
                assert time.monotonic() - start < ANSWERED_WITHIN
                assert home.token_state(token) == "released"
    finally:
        release.set()
    assert home.ledger() == []


def test_expired_single_use_records_are_purged_while_the_app_runs(home: Home) -> None:
    now = int(time.time())
    app = create_app(home.settings, purge_interval=0.05)
    token = home.seal()
    with running(app) as client:
        assert_paid(pay(client, token))
        for rid, expires_at in (("a" * 64, now - 10), ("b" * 64, now + 3600)):
            _insert_used_token(home, rid, expires_at)
        wait_for(lambda: not home.query("SELECT 1 FROM used_tokens WHERE replay_id = :r",
                                        r="a" * 64), timeout=5)
        assert home.query("SELECT replay_id FROM used_tokens WHERE replay_id = :r", r="b" * 64)
        assert home.token_state(token) == "done"  # not expired: kept, still refused
        assert_error(pay(client, token), 409, "token_replayed")


def _insert_used_token(home: Home, rid: str, expires_at: int) -> None:
    engine = create_engine(sync_url(home.db_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO used_tokens (replay_id, payment_id, state, expires_at)"
                              " VALUES (:rid, 'pay_x', 'done', :exp)"), {"rid": rid,
                                                                         "exp": expires_at})
    finally:
        engine.dispose()


@pytest.mark.parametrize("timeout", [0.0, -1.0, 301.0])
def test_processor_timeout_out_of_range_is_refused_at_creation(home: Home,
                                                               timeout: float) -> None:
    with pytest.raises(ConfigError) as caught:
        create_app(home.with_settings(processor={"timeout": timeout}).settings)
    assert caught.value.code == "config_invalid"
