"""The gateway's log lines: JSON from structlog's own path and from the standard library's,
redacted alike."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from cardseal.gateway.logs import configure_logging

PAN = "4111111111111111"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging(stream=out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers = []


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_events_are_redacted_json_lines(stream: io.StringIO) -> None:
    log = structlog.get_logger("cardseal.gateway")
    log.info("payment", outcome="authorized", status=201, note=f"card {PAN} used",
             cvv="123", token="eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln",
             short="visa 4222222222222")
    log.debug("not at INFO")
    (line,) = lines(stream)
    assert line["event"] == "payment" and line["level"] == "info" and line["status"] == 201
    assert line["note"] == "card 411111******1111 used"
    assert line["short"] == "visa 4222*****2222"  # as Card.masked: five digits hidden at least
    assert line["cvv"] == line["token"] == "[redacted]"
    assert "timestamp" in line
    assert PAN not in stream.getvalue()


def test_standard_library_records_take_the_same_chain(stream: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").warning("client sent %s", PAN)
    (line,) = lines(stream)
    assert line["event"] == "client sent 411111******1111" and line["level"] == "warning"


def test_lines_are_ascii_whatever_the_event_holds(stream: io.StringIO) -> None:
    """orjson writes the common line; anything beyond ASCII (a C1 control a terminal obeys, a
    line separator) is escaped as ``json.dumps`` escapes it."""
    log = structlog.get_logger("cardseal.gateway")
    log.info("payment", outcome="authorized", status=201)
    log.warning("odd", reference="caf\u00e9 \x9b31m \u2028 \x1b[2J", count=3)
    text = stream.getvalue()
    assert text.isascii() and "\x1b" not in text
    plain, odd = lines(stream)
    assert plain["outcome"] == "authorized" and plain["status"] == 201
    assert odd["reference"] == "caf\u00e9 \x9b31m \u2028 \x1b[2J" and odd["count"] == 3
    assert '"event":"payment"' in text.splitlines()[0]  # the fast writer's compact form


class _Holder:
    def __repr__(self) -> str:
        return f"Holder({PAN})"


def test_every_kind_of_value_is_redacted(stream: io.StringIO) -> None:
    """Strings (short ones too), nested mappings and lists, other objects by their repr and
    exception text; numbers, booleans and None pass as they are."""
    log = structlog.get_logger("cardseal.gateway")
    try:
        raise ValueError(f"bad card {PAN}")
    except ValueError:
        log.error("failed", exc_info=True, short="eyJabcd.x.y", nested={"a": [PAN, {"cvv": 1}]},
                  obj=_Holder(), ratio=0.5, flag=True, nothing=None, count=7)
    (line,) = lines(stream)
    text = stream.getvalue()
    assert PAN not in text
    assert "411111******1111" in line["exception"]  # type: ignore[operator]
    assert line["short"] == "[redacted-jose]"
    assert line["nested"] == {"a": ["411111******1111", {"cvv": "[redacted]"}]}
    assert line["obj"] == "Holder(411111******1111)"
    assert (line["ratio"], line["flag"], line["nothing"], line["count"]) == (0.5, True, None, 7)
    assert line["level"] == "error" and line["event"] == "failed"
