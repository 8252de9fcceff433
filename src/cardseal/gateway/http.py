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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that counts the bytes of each request's head as they arrive."""

    _head_bytes = 0  # of the head being received
    _ends = 0  # heads and messages completed on this connection
    _in_body = False  # between a request's headers and its end: the body is the app's to bound

    def data_received(self, data: bytes) -> None:
        ends = self._ends
        super().data_received(data)  # at most one socket read (256 KiB) before the check
        # Only a read that ended no head and no message and fed no body was all head: one
        # that ended a head or a message also held a body's bytes.
        if ends == self._ends and not self._in_body and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("Request head over %d bytes: refused.", MAX_HEAD_BYTES)
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_body, self._head_bytes = True, 0
        self._ends += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._ends += 1
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, in the contract's error body."""
        del msg  # uvicorn's own text, "Invalid HTTP request received."
        self.transport.write(_UNPARSABLE)
        self.transport.close()
