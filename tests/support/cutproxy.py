"""A loopback TCP proxy that can cut responses off in the middle of their body."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

__all__ = ["CutProxy"]


class CutProxy:
    """Forwards connections to ``upstream``; while ``cut`` (or ``cut_next`` > 0), the first
    response on a connection is sent up to its headers and 3 bytes of body, then the
    connection is closed: the request reached the server, the answer did not."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.cut = False
        self.cut_next = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}{parts.path}"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            cut = self.cut or self.cut_next > 0
            if self.cut_next > 0:
                self.cut_next -= 1
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pipe, args=(client, server), daemon=True).start()
        try:
            if cut:
                seen = b""
                while True:
                    data = server.recv(65536)
                    if not data:
                        break
                    seen += data
                    end = seen.find(b"\r\n\r\n")
                    if end >= 0 and len(seen) >= end + 4 + 3:
                        client.sendall(seen[: end + 4 + 3])
                        self.cuts += 1
                        break
            else:
                _pipe(server, client)
        except OSError:
            pass
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
