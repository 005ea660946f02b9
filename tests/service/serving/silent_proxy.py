"""A TCP proxy in front of Redis that can make its pub/sub connections go silent without closing them.

That is what a half-open connection looks like to a client (a NAT or load balancer that dropped the flow, a
peer that vanished): writes succeed, nothing ever arrives, and no error is raised. Killing the connection
(CLIENT KILL) would not do: the client sees the close and reconnects by itself.
"""

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class Link:
    """One client connection and its connection to Redis, pumped both ways by two threads."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.pubsub = False  # the client subscribed on it
        self.silent = False  # drop everything, both ways, and keep both sockets open
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if source is self.client and b"SUBSCRIBE" in data.upper():
                    self.pubsub = True
                if not self.silent:
                    sink.sendall(data)
        self.close()

    def close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class SilentProxy:
    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}{parts.path}"
        self.links: list[Link] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                self.links.append(Link(client, socket.create_connection(self.upstream)))

    def subscriptions(self) -> int:
        return sum(link.pubsub for link in self.links)

    def silence_pubsub(self) -> None:
        """Every pub/sub connection open now goes silent; later connections work."""
        for link in self.links:
            if link.pubsub:
                link.silent = True

    def close(self) -> None:
        self.listener.close()
        for link in self.links:
            link.close()
