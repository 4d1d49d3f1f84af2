"""WebSocket / Upgrade tunnelling through real forklb workers (and Debian's nginx).

The backend is a small threaded TCP server in this process: to a request with an
``Upgrade`` header it answers ``101 Switching Protocols`` and then echoes every
byte back until the peer closes; to any other request it answers ``200 plain``.
It records each request head it received.  Clients are raw sockets.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import time

import pytest
from harness import SocketBackend, free_port, http_request, proxy_block, raw_exchange, wait_for

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY + WS_GUID).digest())

TUNNEL = 'proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade";'


class UpgradeBackend(SocketBackend):
    """Answers an upgrade with 101 and echoes; anything else with ``200 plain``."""

    threaded = True

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.closed = 0  # upgraded connections that ended (peer closed)
        super().__init__()

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(30)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads.append(head)
                lower = head.lower()
                length = 0
                for line in lower.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                if b"\r\nupgrade:" in lower:
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ACCEPT
                                 + b"\r\nX-Backend: ws\r\n\r\n")
                    self._echo(conn, buf)
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Backend: ws\r\n\r\n"
                             b"plain\n")
        except OSError:
            return

    def _echo(self, conn: socket.socket, first: bytes) -> None:
        if first:
            conn.sendall(first)
        while True:
            data = conn.recv(65536)
            if not data or data == b"bye":
                self.closed += 1
                return
            conn.sendall(data)


@pytest.fixture
def backend():
    b = UpgradeBackend()
    yield b
    b.stop()


def _block(backend, port, directives, params=""):
    """The balancer's upstream ``ws`` (``backend`` with server ``params``) and server."""
    return proxy_block(port=port, servers=f"server 127.0.0.1:{backend.port}{params};",
                       directives=directives, upstream="ws")


def _forklb(forklb_factory, backend, directives=TUNNEL, read_timeout="", params=""):
    port = free_port()
    block = _block(backend, port, directives + read_timeout, params)
    lb = forklb_factory(f"worker_processes 1;\nevents {{ }}\nhttp {{ access_log off; {block} }}")
    lb.start(wait_ports=[port], workers=1)
    return port


def _nginx(nginx_backend_factory, backend, directives=TUNNEL):
    port = free_port()
    nginx_backend_factory("unused", extra_servers=_block(backend, port, directives))
    return port


def _upgrade_request(upgrade=b"websocket", connection=b"Upgrade", extra=b""):
    return (b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: " + upgrade
            + b"\r\nConnection: " + connection + b"\r\nSec-WebSocket-Key: " + KEY
            + b"\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n")


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed before a response head: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _headers(head: bytes) -> dict[bytes, bytes]:
    return {k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}


def _recv_exactly(sock: socket.socket, n: int, already: bytes = b"") -> bytes:
    buf = already
    while len(buf) < n:
        data = sock.recv(65536)
        assert data, f"closed after {buf!r}"
        buf += data
    return buf


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (TimeoutError, ConnectionResetError):
        return False


@pytest.mark.parametrize("balancer", ["forklb", "nginx"])
def test_websocket_tunnel_echoes_both_ways(forklb_factory, nginx_backend_factory, backend,
                                           balancer):
    port = (_forklb(forklb_factory, backend) if balancer == "forklb"
            else _nginx(nginx_backend_factory, backend))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Bytes sent right behind the head belong to the tunnel, not to HTTP.
        sock.sendall(_upgrade_request() + b"early")
        head, rest = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 "), head
        h = _headers(head)
        assert h[b"upgrade"] == b"websocket"
        assert h[b"connection"].lower() == b"upgrade"
        assert h[b"sec-websocket-accept"] == ACCEPT
        assert _recv_exactly(sock, 5, rest) == b"early"
        for message in (b"hello", b"x" * 100_000, b"\x00\x81binary"):
            sock.sendall(message)
            assert _recv_exactly(sock, len(message)) == message
    up = _headers(backend.heads[0])
    assert up[b"upgrade"] == b"websocket"
    assert up[b"connection"] == b"upgrade"
    assert up[b"sec-websocket-key"] == KEY
    # The client closed: the upstream side of the tunnel is closed too.
    wait_for(lambda: backend.closed == 1, 10, message="upstream tunnel not closed")


def test_upstream_close_ends_the_tunnel(forklb_factory, backend):
    port = _forklb(forklb_factory, backend)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_upgrade_request())
        head, _ = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"bye")  # the backend closes on this
        assert _closed_within(sock, 10)


def test_idle_tunnel_closed_after_proxy_read_timeout(forklb_factory, backend):
    port = _forklb(forklb_factory, backend, read_timeout=" proxy_read_timeout 2s;")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_upgrade_request())
        head, _ = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        time.sleep(0.5)
        sock.sendall(b"ping")
        assert _recv_exactly(sock, 4) == b"ping"  # still open while in use
        started = time.monotonic()
        assert _closed_within(sock, 15)
        assert time.monotonic() - started >= 1.0  # closed for idleness, not at once
    wait_for(lambda: backend.closed == 1, 10, message="upstream tunnel not closed")


def test_upgrade_without_the_config_is_answered_normally(forklb_factory, backend):
    port = _forklb(forklb_factory, backend, directives="")
    reply = raw_exchange(port, _upgrade_request(), timeout=10)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert reply.endswith(b"plain\n")
    up = _headers(backend.heads[0])
    assert b"upgrade" not in up
    assert up.get(b"connection", b"").lower() != b"upgrade"


def test_h2c_is_never_tunnelled(forklb_factory, backend):
    port = _forklb(forklb_factory, backend)
    reply = raw_exchange(port, _upgrade_request(b"h2c", b"Upgrade, HTTP2-Settings",
                                                b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"),
                         timeout=10)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    up = _headers(backend.heads[0])
    assert b"upgrade" not in up
    assert up.get(b"connection", b"").lower() != b"upgrade"


def test_plain_requests_on_a_websocket_location(forklb_factory, backend):
    """No Upgrade from the client: the configured Upgrade/Connection are not sent,
    and the upstream connection is kept alive as usual."""
    port = _forklb(forklb_factory, backend)
    for _ in range(2):
        r = http_request(port, "/")
        assert (r.status, r.text) == (200, "plain\n")
    for head in backend.heads:
        assert b"upgrade" not in head.lower(), head


def test_h2c_upgrade_request_with_a_body_is_forwarded_whole(forklb_factory,
                                                            py_backend_factory):
    """llhttp skips the body of an upgrade request; forklb still forwards it."""
    port = _forklb(forklb_factory, py_backend_factory("echo"))
    body = b"a=1&b=" + b"x" * 70_000
    request = (b"POST /form HTTP/1.1\r\nHost: example.com\r\nUpgrade: h2c\r\n"
               b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABk\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    reply = raw_exchange(port, request, timeout=15)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert b'"body_len": %d' % len(body) in reply


def test_a_tunnel_counts_as_a_connection_for_max_conns(forklb_factory, backend):
    port = _forklb(forklb_factory, backend, params=" max_conns=1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_upgrade_request())
        head, _ = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert http_request(port, "/").status == 502  # the one allowed connection is busy
    wait_for(lambda: backend.closed == 1, 10, message="upstream tunnel not closed")
    wait_for(lambda: http_request(port, "/").status == 200, 10, message="peer not released")
