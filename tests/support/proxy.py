"""A small TCP proxy on 127.0.0.1 for fault tests: put it in front of a server (moto's S3) and make
the network misbehave on demand.

    with TcpProxy("127.0.0.1", moto.port) as proxy:
        store = S3BlobStore(bucket, endpoint_url=proxy.url)
        proxy.reset_after(1 << 20)   # reset every connection once 1 MiB more went upstream
        proxy.slow(2.0)              # each response waits 2 s before its first byte
        proxy.refuse()               # new and open connections are reset
        proxy.heal()                 # back to a plain pipe

Threads, one pair per connection. A reset is a real TCP RST (SO_LINGER 0), sent by the thread
that reads the client, so the client sees ECONNRESET, not a clean end of stream.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Any

CHUNK = 64 * 1024


def _rst(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _quiet_shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._budget: int | None = None  # bytes still allowed upstream before the reset trips
        self._tripped = False
        self._once = False  # reset one connection, then forward everything again
        self._latency = 0.0
        self.bytes_up = 0  # client -> upstream, all connections
        self.bytes_down = 0
        self.resets = 0
        self.connections = 0
        self._open: set[socket.socket] = set()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    # --- modes --------------------------------------------------------------------------------

    def reset_after(self, n: int) -> None:
        """Forward ``n`` more bytes upstream, then reset that connection and every later one."""
        with self._lock:
            self._budget, self._tripped = n, False

    def reset_once_after(self, n: int) -> None:
        """Forward ``n`` more bytes upstream, then reset that one connection and heal."""
        with self._lock:
            self._budget, self._tripped, self._once = n, False, True

    def refuse(self) -> None:
        """Reset every connection from now on (open ones at their next byte)."""
        with self._lock:
            self._budget, self._tripped = 0, True

    def slow(self, latency: float) -> None:
        """Hold each response (the first bytes after a request) for ``latency`` seconds."""
        with self._lock:
            self._latency = latency

    def heal(self) -> None:
        with self._lock:
            self._budget, self._tripped, self._once, self._latency = None, False, False, 0.0

    @property
    def tripped(self) -> bool:
        with self._lock:
            return self._tripped

    # --- plumbing -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not self._closing.is_set():
                if not sel.select(timeout=0.1):
                    continue
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue
                self.connections += 1
                threading.Thread(target=self._serve, args=(client,), name="proxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.tripped:
            self._count_reset()
            _rst(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _rst(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        turn = threading.Event()  # set when a request went up and its response has not started
        down = threading.Thread(target=self._pump_down, args=(upstream, client, turn), name="proxy-down", daemon=True)
        down.start()
        reset = self._pump_up(client, upstream, turn)
        if reset:
            self._count_reset()
            _quiet_shutdown(upstream, socket.SHUT_RDWR)  # ends the other pump
            down.join(30)
            _rst(client)
        else:
            _quiet_shutdown(upstream, socket.SHUT_WR)
            down.join(30)
            client.close()
        upstream.close()
        with self._lock:
            self._open.difference_update((client, upstream))

    def _count_reset(self) -> None:
        with self._lock:
            self.resets += 1

    def _pump_up(self, client: socket.socket, upstream: socket.socket, turn: threading.Event) -> bool:
        """Client -> upstream until EOF (False) or a reset is due (True)."""
        while True:
            try:
                data = client.recv(CHUNK)
            except OSError:
                return False
            if not data:
                return False
            with self._lock:
                if self._tripped:
                    return True
                if self._budget is not None:
                    if len(data) > self._budget:
                        if self._once:
                            self._budget, self._once = None, False
                        else:
                            self._tripped = True
                        return True
                    self._budget -= len(data)
                self.bytes_up += len(data)
            turn.set()
            try:
                upstream.sendall(data)
            except OSError:
                return False

    def _pump_down(self, upstream: socket.socket, client: socket.socket, turn: threading.Event) -> None:
        while True:
            try:
                data = upstream.recv(CHUNK)
            except OSError:
                break
            if not data:
                break
            if turn.is_set():
                turn.clear()
                with self._lock:
                    latency = self._latency
                if latency:
                    self._closing.wait(latency)  # simulated network latency (cut short by close())
            with self._lock:
                self.bytes_down += len(data)
            try:
                client.sendall(data)
            except OSError:
                break
        _quiet_shutdown(client, socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        self._acceptor.join(10)
        self._listener.close()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _quiet_shutdown(sock, socket.SHUT_RDWR)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
