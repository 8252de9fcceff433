"""uvicorn's httptools protocol with a bound on a request's head, and the contract's error body
where uvicorn itself answers a request it cannot parse.

httptools puts no limit on the request line and headers: a client that never ends its
headers makes a worker hold all of them (seen here: four connections sending 100 MiB heads
took a worker from 95 to 534 MiB, and it kept that memory). h11, uvicorn's other parser,
stops at 16 KiB; here the head may take ``MAX_HEAD_BYTES`` and the connection is answered
``431`` and closed past that. A cardseal request's head is a few hundred bytes: the token
travels in the body, which the app bounds (``request_too_large``, 64 KiB).
"""

from __future__ import annotations

from typing import Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES: Final = 32 * 1024
"""The most a request line and its headers may take (nginx's default buffers for them)."""


def _error_response(status: bytes, code: str, message: str) -> bytes:
    body = b'{"error":{"code":"%s","message":"%s"}}' % (code.encode(), message.encode())
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(body), body))


_HEAD_TOO_LARGE: Final = _error_response(
    b"431 Request Header Fields Too Large", "request_too_large",
    f"The request line and headers exceed {MAX_HEAD_BYTES} bytes.")
_UNPARSABLE: Final = _error_response(
    b"400 Bad Request", "request_invalid", "The request is not valid HTTP/1.1.")


class _HeadTooLarge(Exception):  # noqa: N818 - a signal to data_received, not an error
    """Raised from a parser callback: httptools stops, uvicorn calls ``send_400_response``."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that bounds each request's head (and a chunked body's trailers)
    at ``MAX_HEAD_BYTES``, counted two ways: the raw bytes of reads that carry nothing but
    head, while httptools still gathers an unfinished field (it calls back only with whole
    ones), and the fields it parses, as it calls back with them."""

    _read_bytes = 0  # raw bytes of reads that were all head, since the last head or body
    _field_bytes = 0  # request line and fields parsed for the current message
    _fed = 0  # heads, bodies and messages the parser has called back with
    _too_large = False

    def data_received(self, data: bytes) -> None:
        fed = self._fed
        super().data_received(data)  # at most one socket read (256 KiB) before the check
        if fed != self._fed:  # the read also held a body's bytes, or ended a head or message
            self._read_bytes = 0
        elif not self.transport.is_closing():
            self._read_bytes += len(data)
            if self._read_bytes > MAX_HEAD_BYTES:
                self._refuse()

    def on_message_begin(self) -> None:
        self._field_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # trailers come here too
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._fed += 1
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._fed += 1
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._fed += 1
        super().on_message_complete()

    def _count(self, size: int) -> None:
        self._field_bytes += size
        if self._field_bytes > MAX_HEAD_BYTES:
            self._too_large = True
            raise _HeadTooLarge

    def _refuse(self) -> None:
        self.logger.warning("Request head over %d bytes: refused.", MAX_HEAD_BYTES)
        self.transport.write(_HEAD_TOO_LARGE)
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        """An ``Upgrade`` request is answered as plain HTTP (the gateway serves no WebSocket,
        ``serve`` runs uvicorn with ``ws="none"``), then its connection closed: httptools
        stops at its head, taking what follows for the protocol asked for, so nothing more
        on the connection would be read (a body or a next request sat there unanswered).
        Nothing is logged: uvicorn's two warnings, one of them advice to install a WebSocket
        library, would let any client write them to the log with every request."""
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes httptools refused: 431 where a field passed the bound,
        else 400, each in the contract's error body (not uvicorn's text/plain)."""
        del msg  # uvicorn's own text, "Invalid HTTP request received."
        if self._too_large:
            self._refuse()
            return
        self.transport.write(_UNPARSABLE)
        self.transport.close()
