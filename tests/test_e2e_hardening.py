"""Hardening end to end: malformed requests never reach the backend, malformed
upstream replies are 502 and never pooled, and the fault matrix of
/work/shared/reference/http-hardening.md (dies or stalls mid-body, client gone).

The backend is a threaded raw-socket server in this file that records every byte
it receives per connection and answers each request by its path.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from harness import ForkLB, SocketBackend, free_port, http_request, wait_for


class BackendConn:
    """What one upstream connection brought: bytes, request paths, whether forklb closed it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.paths: list[bytes] = []
        self.peer_closed = threading.Event()


Handler = Callable[[socket.socket], bool]  # writes a reply; False: backend closes


class ScriptedBackend(SocketBackend):
    """Accepts on loopback; per request, ``handlers[path](sock)`` writes the reply."""

    threaded = True

    def __init__(self, handlers: dict[bytes, Handler]) -> None:
        self.handlers = handlers
        self.conns: list[BackendConn] = []
        super().__init__()

    @property
    def bytes_received(self) -> int:
        return sum(len(c.data) for c in self.conns)

    def serve(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        record = BackendConn()
        self.conns.append(record)
        pending = b""
        sock.settimeout(30)
        try:
            while not self.stopping:
                data = sock.recv(65536)
                if not data:
                    record.peer_closed.set()
                    return
                record.data += data
                pending += data
                while b"\r\n\r\n" in pending:  # the tests send no request bodies
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    path = head.split(b" ", 2)[1]
                    record.paths.append(path)
                    if not self.handlers[path](sock):
                        return
        except TimeoutError:
            pass  # idle in forklb's pool for 30 s: not a close by forklb
        except OSError:
            record.peer_closed.set()  # reset by forklb, or our send failed


def reply(data: bytes, keep: bool = True) -> Handler:
    def handler(sock: socket.socket) -> bool:
        sock.sendall(data)
        return keep
    return handler


OK = reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def _dies_mid_length(sock: socket.socket) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 30000)
    time.sleep(0.2)
    return False


def _dies_mid_chunked(sock: socket.socket) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n6\r\n world\r\n")
    time.sleep(0.2)
    return False


def _stalls_mid_body(sock: socket.socket) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"s" * 10)
    time.sleep(8)  # forklb's proxy_read_timeout (1s) ends it first
    return False


def _endless(sock: socket.socket) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
    block = b"e" * 65536
    for _ in range(1000000000 // len(block)):
        sock.sendall(block)  # fails once forklb closes the upstream connection
    return False


HANDLERS: dict[bytes, Handler] = {
    b"/ok": OK,
    b"/cl-te": reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    b"/two-cl": reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
    b"/cl-list": reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"),
    b"/garbage": reply(b"HELLO THERE\r\n\r\n"),
    b"/http09": reply(b"<html><body>no status line</body></html>\n"),
    b"/rtsp": reply(b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    b"/gzip": reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok"),
    b"/dies-length": _dies_mid_length,
    b"/dies-chunked": _dies_mid_chunked,
    b"/stalls": _stalls_mid_body,
    b"/endless": _endless,
}

CONF = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    upstream app {{ server 127.0.0.1:{backend}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_read_timeout 1s;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Seen-Xff "[$http_x_forwarded_for]";
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[tuple[ScriptedBackend, ForkLB, int]]:
    backend = ScriptedBackend(HANDLERS)
    port = free_port()
    lb = ForkLB(tmp_path_factory.mktemp("hardening"),
                CONF.format(backend=backend.port, port=port))
    try:
        lb.start(wait_ports=[port], workers=1)
        yield backend, lb, port
    finally:
        lb.stop()
        backend.stop()


def exchange(port: int, data: bytes, read: int | None = None,
             timeout: float = 10.0) -> tuple[bytes, bool, float]:
    """Send ``data``; read until the server closes (or ``read`` bytes arrived).

    Returns (bytes received, closed by the server, seconds taken)."""
    received = bytearray()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        while read is None or len(received) < read:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(received), False, time.monotonic() - start
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            return bytes(received), False, time.monotonic() - start
    return bytes(received), True, time.monotonic() - start


H = b"POST /ok HTTP/1.1\r\nHost: a\r\n"
TE = b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"

# RFC 9112 section in the name where there is one; the status forklb answers.
BAD_REQUESTS: dict[str, tuple[bytes, int]] = {
    "CL and TE (6.1)": (H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n", 400),
    "two equal CLs (6.3)": (H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "CL list 3, 3": (H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "CL +3": (H + b"Content-Length: +3\r\n\r\nabc", 400),
    "CL non-digits": (H + b"Content-Length: 3a\r\n\r\nabc", 400),
    "TE gzip, chunked": (H + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                         501),
    "TE gzip": (H + b"Transfer-Encoding: gzip\r\n\r\nabc", 501),
    "TE chunked, identity": (H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "TE repeated": (H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"0\r\n\r\n", 400),
    "TE on HTTP/1.0": (b"POST /ok HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\n0\r\n\r\n", 400),
    "obs-fold (5.2)": (H + b"X-A: b\r\n c\r\n\r\n", 400),
    "space before colon (5.1)": (H + b"X-A : b\r\n\r\n", 400),
    "@ in a name": (H + b"X@A: b\r\n\r\n", 400),
    "control char in a name": (H + b"X\x01A: b\r\n\r\n", 400),
    "space in a name": (H + b"X A: b\r\n\r\n", 400),
    "colon starting a name": (H + b":X: b\r\n\r\n", 400),
    "bare CR in a value": (H + b"X-A: b\rc\r\n\r\n", 400),
    "NUL in a value": (H + b"X-A: b\x00c\r\n\r\n", 400),
    "no Host on HTTP/1.1 (3.2)": (b"GET /ok HTTP/1.1\r\n\r\n", 400),
    "two Hosts (3.2)": (b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "chunk size 0x3": (TE + b"0x3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk size -3": (TE + b"-3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk size 17 hex digits": (TE + b"00000000000000003\r\nabc\r\n0\r\n\r\n", 400),
    "chunk size overflow": (TE + b"10000000000000003\r\nabc\r\n0\r\n\r\n", 400),
    "no CRLF after chunk data": (TE + b"3\r\nabcd\r\n0\r\n\r\n", 400),
    "chunk extension over 4 KiB": (TE + b"3;e=" + b"x" * 5000 + b"\r\nabc\r\n0\r\n\r\n", 400),
    "bare LF after chunk size": (TE + b"3\nabc\r\n0\r\n\r\n", 400),
    "bare LF after chunk data": (TE + b"3\r\nabc\n0\r\n\r\n", 400),
    "bare LF in the last chunk": (TE + b"3\r\nabc\r\n0\n\n", 400),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_malformed_request_is_refused_and_never_reaches_backend(setup, name):
    backend, lb, port = setup
    raw, status = BAD_REQUESTS[name]
    before = (len(backend.conns), backend.bytes_received)
    resp, closed, _ = exchange(port, raw)
    assert resp.startswith(b"HTTP/1.1 %d " % status), resp[:200]
    assert b"\r\nConnection: close\r\n" in resp
    assert closed, "forklb left the connection open"
    time.sleep(0.1)  # a forwarded request would have arrived by now
    assert (len(backend.conns), backend.bytes_received) == before
    # The worker lives on and still proxies.
    assert http_request(port, "/ok", host="a").status == 200


def test_underscored_name_is_dropped_never_taken_for_the_dashed_one(setup):
    backend, lb, port = setup
    resp, _, _ = exchange(port, b"GET /ok HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\n"
                                b"X-Other_Thing: 1\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: backend.conns and b"/ok" in backend.conns[-1].paths, 5)
    seen = bytes(backend.conns[-1].data).lower().split(b"\r\n\r\n")[-2]  # the last head
    assert b"x-forwarded-for: 127.0.0.1\r\n" in seen
    assert b"x-seen-xff: []" in seen  # $http_x_forwarded_for is empty
    assert b"6.6.6.6" not in seen and b"x_forwarded_for" not in seen
    assert b"x-other_thing" not in seen


@pytest.mark.parametrize("path", [b"/cl-te", b"/two-cl", b"/cl-list", b"/garbage",
                                  b"/http09", b"/rtsp", b"/gzip"])
def test_malformed_upstream_reply_is_502_and_never_pooled(setup, path):
    backend, lb, port = setup
    # A good exchange first, so a pooled connection exists and is the one used.
    assert http_request(port, "/ok", host="a").status == 200
    used = backend.conns[-1]
    resp, _, _ = exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n"
                          b"Connection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 502 "), resp[:200]
    assert used.paths[-1] == path, "the bad request did not reuse the pooled connection"
    assert used.peer_closed.wait(5), "forklb kept the upstream connection open"
    count = len(backend.conns)
    assert http_request(port, "/ok", host="a").status == 200
    assert len(backend.conns) == count + 1, "the next request did not use a new connection"
    assert "upstream" in lb.error_log()


def test_upstream_dies_mid_body_with_content_length(setup):
    backend, lb, port = setup
    resp, closed, took = exchange(port, b"GET /dies-length HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100000" in head
    assert body == b"a" * 30000  # every byte the upstream sent, then close
    assert closed and took < 5


def test_upstream_dies_mid_body_chunked(setup):
    backend, lb, port = setup
    resp, closed, took = exchange(port, b"GET /dies-chunked HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    decoded = b""
    rest = body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        assert size, "forklb sent the final 0-chunk of a truncated body"
        decoded += rest[:size]
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    assert decoded == b"hello world"
    assert closed and took < 5


def test_upstream_stalls_mid_body_closed_at_read_timeout(setup):
    backend, lb, port = setup
    resp, closed, took = exchange(port, b"GET /stalls HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 ") and resp.endswith(b"\r\n\r\n" + b"s" * 10)
    assert closed
    assert 0.9 <= took < 6, took  # proxy_read_timeout 1s, not the backend's 8 s
    assert "upstream timed out (110: Connection timed out) while reading upstream" in (
        lb.error_log())


def _fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def test_client_gone_mid_response_closes_upstream_and_fds_return(setup):
    backend, lb, port = setup
    (worker,) = lb.worker_pids()
    # Baseline with nothing open: pooled upstream connections are fds too, so close
    # them first (a bad reply makes forklb close the one it uses).
    exchange(port, b"GET /garbage HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    baseline = _fds(worker)
    resp, closed, _ = exchange(port, b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n",
                               read=1_000_000)
    assert resp.startswith(b"HTTP/1.1 200 ") and not closed  # we hung up mid-response
    endless = next(c for c in backend.conns if b"/endless" in c.paths)
    assert endless.peer_closed.wait(10), "the upstream connection stayed open"
    wait_for(lambda: _fds(worker) == baseline, 10,
             message=lambda: f"worker fds {_fds(worker)} != baseline {baseline}")
    # Not pooled: the next request opens a new connection.
    count = len(backend.conns)
    assert http_request(port, "/ok", host="a").status == 200
    assert len(backend.conns) == count + 1
