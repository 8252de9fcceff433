"""A TCP proxy on a free port that can cut a server off, the way a network or a restart does.

- ``down()``: close every proxied connection and stop listening (connection refused), as a
  server that died; ``up()`` listens again on the same port;
- ``hang()``: keep accepting, but forward nothing either way and answer nothing, as a host
  gone behind a dead network link; ``up()`` ends that and resets the hung connections (whose
  byte streams lost data).
"""

from __future__ import annotations

import socket
import threading
from typing import Final

_CHUNK: Final = 65536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._hung = False
        self.up()

    # -- control ---------------------------------------------------------------------------------

    def up(self) -> None:
        with self._lock:
            self._hung = False
        self._close_connections()
        if self._listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self.port = listener.getsockname()[1]
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._shut(listener)
        self._close_connections()

    def hang(self) -> None:
        with self._lock:
            self._hung = True

    def close(self) -> None:
        self.down()

    # -- plumbing --------------------------------------------------------------------------------

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _close_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            self._shut(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                self._sockets.add(client)
                hung = self._hung
            if hung:
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._shut(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.add(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(_CHUNK):
                with self._lock:
                    hung = self._hung
                if not hung:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            self._shut(source)
            self._shut(sink)
