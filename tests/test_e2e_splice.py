"""Zero-copy bodies (proxy_splice): large Content-Length bodies relayed with os.splice.

A thread backend here records each upstream connection (its client port) and
serves deterministic bodies, so a test can check bytes by SHA-256, see which
upstream connection answered, and make the backend die or stall mid-body.
That splice was used shows in the worker's descriptors: its first spliced body
creates the pooled pipe (two more pipe fds), a copied one does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from harness import ForkLB, SocketBackend, free_port, wait_for
from test_tls import make_cert

MIB = 1 << 20
DATA = random.Random(11).randbytes(4 * MIB) * 10  # 40 MiB
SPLICED = 17 * MIB  # from 16 MiB on (proxy_splice on), bodies are spliced
COPIED = MIB  # from 64 KiB: copied with recv_into, no pipe


def expected(n: int) -> bytes:
    """The body of GET /dl/N (N <= len(DATA))."""
    return DATA[:n]


class Reader:
    """Buffered reads of HTTP/1.1 messages with Content-Length on a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        self.buf += data
        return bool(data)

    def head(self) -> tuple[bytes, dict[bytes, bytes]]:
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            if not self.fill():
                raise ConnectionError("closed before a head")
        head = bytes(self.buf[:i])
        del self.buf[:i + 4]
        status, *lines = head.split(b"\r\n")
        fields = {}
        for line in lines:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        return status, fields

    def body(self, n: int) -> bytes:
        """Up to ``n`` bytes: fewer when the peer closes first."""
        while len(self.buf) < n:
            if not self.fill():
                break
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class Conn:
    """One upstream connection the backend accepted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.paths: list[bytes] = []
        self.closed = threading.Event()


class SpliceBackend(SocketBackend):
    """GET /dl/N: N bytes of DATA; /die/N: half of them, then close; /stall/N: half,
    then 10 s of silence. POST: the body's length and SHA-256 as JSON. Responses
    carry X-Conn (the upstream connection's port) and keep the connection open."""

    threaded = True

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        super().__init__()

    def serve(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        conn = Conn(addr[1])
        self.conns.append(conn)
        reader = Reader(sock)
        try:
            while True:
                status, fields = reader.head()
                method, target = status.split(b" ")[:2]
                conn.paths.append(target)
                tag = b"X-Conn: %d\r\n" % conn.port
                if method == b"POST":
                    length = int(fields.get(b"content-length", b"0"))
                    digest, received = hashlib.sha256(), 0
                    while received < length:
                        if not reader.buf and not reader.fill():
                            return
                        take = bytes(reader.buf[:length - received])
                        del reader.buf[:len(take)]
                        digest.update(take)
                        received += len(take)
                    body = json.dumps({"received": received, "sha256": digest.hexdigest()})
                    sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s"
                                 % (tag, len(body), body.encode()))
                    continue
                kind, size = target.split(b"/")[1:3]
                n = int(size)
                sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n" % (tag, n))
                if kind == b"dl":
                    while n > 0:  # DATA again for bodies longer than it
                        sock.sendall(memoryview(DATA)[:n])
                        n -= len(DATA)
                    continue
                sock.sendall(expected(n // 2))
                if kind == b"stall":
                    time.sleep(10)
                return
        except (OSError, ValueError, ConnectionError):
            pass
        finally:
            sock.close()
            conn.closed.set()

    def conn_of(self, port: int) -> Conn:
        return next(c for c in self.conns if c.port == port)


CONF = """
worker_processes 1;
error_log logs/error.log info;
events {{ }}
http {{
    access_log off;
    client_max_body_size 0;
    proxy_read_timeout 1s;
    send_timeout 1s;
    upstream b {{ server 127.0.0.1:{backend}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://b; }}
        location /off/ {{ proxy_splice off; proxy_pass http://b/; }}
        location /small/ {{ proxy_splice 64k; proxy_pass http://b/; }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ proxy_pass http://b; }}
    }}
}}
"""


class Setup:
    def __init__(self, lb: ForkLB, backend: SpliceBackend, port: int, tls_port: int,
                 cert: str) -> None:
        self.lb = lb
        self.backend = backend
        self.port = port
        self.tls_port = tls_port
        self.cert = cert

    @property
    def worker(self) -> int:
        (pid,) = self.lb.worker_pids()
        return pid


@pytest.fixture
def setup(tmp_path) -> Iterator[Setup]:
    """A fresh forklb (one worker) per test, so descriptor counts start clean."""
    backend = SpliceBackend()
    cert, key = make_cert(tmp_path, "splice.test")
    port, tls_port = free_port(), free_port()
    lb = ForkLB(tmp_path, CONF.format(backend=backend.port, port=port, tls_port=tls_port,
                                      cert=cert, key=key))
    try:
        lb.start(wait_ports=[port, tls_port], workers=1)
        yield Setup(lb, backend, port, tls_port, str(cert))
    finally:
        lb.stop()
        backend.stop()


def fds(pid: int) -> dict[str, int]:
    """The worker's descriptors by kind (socket, pipe, ...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def connect(s: Setup) -> socket.socket:
    return socket.create_connection(("127.0.0.1", s.port), timeout=20)


def get(sock: socket.socket, reader: Reader, path: str) -> tuple[bytes, dict, bytes]:
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
    status, fields = reader.head()
    return status, fields, reader.body(int(fields[b"content-length"]))


@pytest.mark.parametrize("n", [SPLICED + 7, COPIED + 7])
def test_download_is_exact_and_both_connections_stay_alive(setup, n):
    s = setup
    pipes_made = 2 if n >= SPLICED else 0
    with connect(s) as sock:
        reader = Reader(sock)
        status, fields, body = get(sock, reader, "/dl/100")  # small: copied
        assert status.startswith(b"HTTP/1.1 200") and body == expected(100)
        pipes = fds(s.worker).get("pipe", 0)
        status, fields, body = get(sock, reader, f"/dl/{n}")
        assert status.startswith(b"HTTP/1.1 200") and fields[b"connection"] == b"keep-alive"
        assert len(body) == n
        assert hashlib.sha256(body).digest() == hashlib.sha256(expected(n)).digest()
        first = fields[b"x-conn"]
        # The pooled pipe: the body went by splice (only a large one).
        assert fds(s.worker).get("pipe", 0) == pipes + pipes_made
        # Same client connection, same upstream connection, next body right.
        status, fields, body = get(sock, reader, f"/dl/{n - 1}")
        assert body == expected(n - 1) and fields[b"x-conn"] == first
        # The pipe is reused, not one per body.
        assert fds(s.worker).get("pipe", 0) == pipes + pipes_made
    assert len(s.backend.conns) == 1


@pytest.mark.parametrize("n", [SPLICED + 3, COPIED + 3])
def test_upload_then_a_pipelined_request_after_it_is_answered(setup, n):
    s = setup
    body = DATA[:n]
    with connect(s) as sock:
        reader = Reader(sock)
        pipes = fds(s.worker).get("pipe", 0)
        # The body and the next request in one stream: the splice must take exactly
        # the body, and the parser must then see a new request.
        request = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % n
        after = b"GET /dl/10 HTTP/1.1\r\nHost: a\r\n\r\n"
        sender = threading.Thread(target=sock.sendall, args=(request + body + after,))
        sender.start()
        status, fields = reader.head()
        answer = json.loads(reader.body(int(fields[b"content-length"])))
        sender.join(20)
        assert status.startswith(b"HTTP/1.1 200")
        assert answer == {"received": n, "sha256": hashlib.sha256(body).hexdigest()}
        assert fds(s.worker).get("pipe", 0) == pipes + (2 if n >= SPLICED else 0)
        status, fields2 = reader.head()
        assert status.startswith(b"HTTP/1.1 200") and reader.body(10) == expected(10)
        assert fields2[b"x-conn"] == fields[b"x-conn"]  # the upstream connection reused
        # And a second upload on the same connection, with Expect: 100-continue.
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % n)
        status, _ = reader.head()
        assert status == b"HTTP/1.1 100 Continue"
        sock.sendall(body)
        status, fields = reader.head()
        answer = json.loads(reader.body(int(fields[b"content-length"])))
        assert answer["received"] == n and answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert len(s.backend.conns) == 1


def test_proxy_splice_size_moves_the_threshold(setup):
    s = setup
    pipes = fds(s.worker).get("pipe", 0)
    with connect(s) as sock:
        reader = Reader(sock)
        status, _, body = get(sock, reader, f"/small/dl/{COPIED}")
        assert status.startswith(b"HTTP/1.1 200") and body == expected(COPIED)
        assert fds(s.worker).get("pipe", 0) == pipes + 2
        sock.sendall(b"POST /small/up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                     % COPIED + DATA[:COPIED])
        _, fields = reader.head()
        answer = json.loads(reader.body(int(fields[b"content-length"])))
        assert answer == {"received": COPIED, "sha256": hashlib.sha256(DATA[:COPIED]).hexdigest()}
        status, _, body = get(sock, reader, "/small/dl/1000")
        assert body == expected(1000)


def test_tls_and_proxy_splice_off_copy(setup):
    import ssl

    s = setup
    n = SPLICED
    pipes = fds(s.worker).get("pipe", 0)
    ctx = ssl.create_default_context(cafile=s.cert)
    with socket.create_connection(("127.0.0.1", s.tls_port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="splice.test") as tls:
        reader = Reader(tls)
        status, _, body = get(tls, reader, f"/dl/{n}")
        assert status.startswith(b"HTTP/1.1 200") and body == expected(n)
        request = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % n
        tls.sendall(request + DATA[:n])
        _, fields = reader.head()
        assert json.loads(reader.body(int(fields[b"content-length"])))["received"] == n
    with connect(s) as sock:
        status, _, body = get(sock, Reader(sock), f"/off/dl/{n}")
        assert status.startswith(b"HTTP/1.1 200") and body == expected(n)
    # Neither went by splice: no pipe was made.
    assert fds(s.worker).get("pipe", 0) == pipes


@pytest.mark.parametrize("n", [2 * SPLICED, 2 * COPIED])
def test_backend_dies_mid_body_client_gets_what_came_then_close(setup, n):
    s = setup
    pipes = fds(s.worker).get("pipe", 0)
    with connect(s) as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /die/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        status, fields = reader.head()
        assert status.startswith(b"HTTP/1.1 200") and int(fields[b"content-length"]) == n
        body = reader.body(n)
        assert body == expected(n // 2)  # everything the backend sent, then the close
        assert reader.fill() is False
    assert "upstream prematurely closed connection while reading upstream" in s.lb.error_log()
    # spliced (the empty pipe pooled) or copied
    assert fds(s.worker).get("pipe", 0) == pipes + (2 if n >= SPLICED else 0)
    # The upstream connection was not pooled: the next request opens a new one.
    with connect(s) as sock:
        _, fields, body = get(sock, Reader(sock), "/dl/100000")
        assert body == expected(100000)
    assert len(s.backend.conns) == 2


@pytest.mark.parametrize("n", [2 * SPLICED, 2 * COPIED])
def test_backend_stalls_mid_body_closed_at_read_timeout(setup, n):
    s = setup
    pipes = fds(s.worker).get("pipe", 0)
    with connect(s) as sock:
        reader = Reader(sock)
        started = time.monotonic()
        sock.sendall(b"GET /stall/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        reader.head()
        assert reader.body(n) == expected(n // 2)
        took = time.monotonic() - started
    assert 0.9 <= took < 8, took  # proxy_read_timeout 1s, not the backend's 10 s
    assert "upstream timed out (110: Connection timed out) while reading upstream" in (
        s.lb.error_log())
    assert fds(s.worker).get("pipe", 0) == pipes + (2 if n >= SPLICED else 0)


def _settled(s: Setup, baseline: dict[str, int]) -> bool:
    now = fds(s.worker)
    # Sockets back to what they were; a pipe left holding bytes is closed, so at
    # most the pooled ones remain.
    return (now.get("socket", 0) == baseline.get("socket", 0)
            and now.get("pipe", 0) <= baseline.get("pipe", 0))


@pytest.mark.parametrize("prefix", ["", "/off"])  # spliced, copied with recv_into
@pytest.mark.parametrize("direction", ["down", "up"])
def test_client_gone_mid_body_fds_return_to_baseline(setup, direction, prefix):
    s = setup
    initial = fds(s.worker)  # the listening sockets, nothing connected
    with connect(s) as sock:  # warm up: the pipe pool has its pipe
        _, fields, _ = get(sock, Reader(sock), f"/dl/{SPLICED}")
        conn = s.backend.conn_of(int(fields[b"x-conn"]))
    # The pooled upstream connection is used next, and closed with the client's.
    baseline = {"socket": initial.get("socket", 0), "pipe": fds(s.worker).get("pipe", 0)}
    n = 2 * SPLICED
    sock = connect(s)
    if direction == "down":
        sock.sendall(b"GET %s/dl/%d HTTP/1.1\r\nHost: a\r\n\r\n" % (prefix.encode(), n))
        Reader(sock).head()
        sock.recv(100000)
    else:
        sock.sendall(b"POST %s/up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                     % (prefix.encode(), n))
        sock.sendall(DATA[:n // 2])
        time.sleep(0.5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset mid-body
    assert conn.closed.wait(10), "the upstream connection stayed open"
    wait_for(lambda: _settled(s, baseline), 10,
             message=lambda: f"worker fds {fds(s.worker)} vs baseline {baseline}")
    # The worker still serves, on a new upstream connection.
    with connect(s) as sock:
        _, _, body = get(sock, Reader(sock), f"/dl/{n}")
        assert body == expected(n)
    assert len(s.backend.conns) == 2


def test_client_not_reading_is_cut_at_send_timeout(setup):
    s = setup
    with connect(s) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /dl/%d HTTP/1.1\r\nHost: a\r\n\r\n" % (256 << 20))
        # Read nothing: forklb's writes stop progressing, send_timeout (1 s) ends it.
        wait_for(lambda: "while sending response to client" in s.lb.error_log(), 15,
                 message=lambda: s.lb.error_log())
    assert "client timed out (110: Connection timed out) while sending response to client" \
        in s.lb.error_log()
