"""Parked keep-alive connections: a client connection idle for PARK_AFTER (0.5 s)
waits for its next request with a read watcher and a timer on the worker's hub,
not a greenlet.

Real workers, real sockets: memory per idle connection, the keepalive_timeout
of a parked connection, graceful stop, worker_connections, TLS, pipelining.
"""

from __future__ import annotations

import resource
import socket
import time

import psutil
import pytest
from harness import HttpClient, free_port, wait_for
from test_e2e_metrics import scrape, total
from test_tls import TlsClient, client_context, make_cert

CONF = """
worker_processes 1;
worker_rlimit_nofile 10000;
error_log logs/error.log info;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    keepalive_timeout {keepalive};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
        location /short {{ keepalive_timeout 1s; return 200 "short\\n"; }}
    }}
}}
"""

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _start(forklb_factory, connections: int = 5000, keepalive: str = "60s"):
    port = free_port()
    lb = forklb_factory(CONF.format(connections=connections, keepalive=keepalive, port=port))
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def _answer(s: socket.socket) -> bytes:
    """One response to REQUEST (``return 200 "ok\\n"``: ends with its body)."""
    data = b""
    while not data.endswith(b"\r\n\r\nok\n"):
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _served(port: int) -> socket.socket:
    """A connection that has had one request answered (and is now idle)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(REQUEST)
    assert _answer(s).startswith(b"HTTP/1.1 200 ")
    return s


def _closed_within(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes ``s`` (None: still open after ``timeout``)."""
    started = time.monotonic()
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - started


def test_idle_keepalive_connections_cost_under_10_kib_each(forklb_factory):
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert hard >= 2 * n + 200, f"needs a hard RLIMIT_NOFILE of {2 * n + 200} (ulimit -Hn)"
    wanted = 10000 if hard == resource.RLIM_INFINITY else min(hard, 10000)
    # forklb, started below, inherits the raised soft limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    lb, port = _start(forklb_factory)
    worker = psutil.Process(lb.worker_pids()[0])
    for _ in range(100):  # warm up: allocator, code paths
        _served(port).close()
    time.sleep(0.5)
    before = worker.memory_info().rss
    socks = [_served(port) for _ in range(n)]
    try:
        time.sleep(1.5)  # all idle > PARK_AFTER: parked
        per_connection = (worker.memory_info().rss - before) / n / 1024
        # A greenlet blocked in recv alone costs ~9 KiB (12.8 KiB per connection
        # before parking); a parked connection ~3.5 KiB.
        assert per_connection < 10, f"{per_connection:.2f} KiB per idle connection"
        for s in socks:  # every one wakes up for its second request
            s.sendall(REQUEST)
        for s in socks:
            assert _answer(s).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_keepalive_timeout_closes_a_parked_connection_on_time(forklb_factory):
    lb, port = _start(forklb_factory, keepalive="3s")
    s = _served(port)
    elapsed = _closed_within(s, 10)
    assert elapsed is not None and 2.0 <= elapsed <= 4.0, elapsed
    # Woken by a request after 1.5 s: served, and its keepalive_timeout starts again.
    s = _served(port)
    time.sleep(1.5)
    s.sendall(REQUEST)
    assert _answer(s).startswith(b"HTTP/1.1 200 ")
    elapsed = _closed_within(s, 10)
    assert elapsed is not None and 2.0 <= elapsed <= 4.0, elapsed
    # The location's keepalive_timeout is kept across parking.
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"short\n"):
        data += s.recv(4096)
    elapsed = _closed_within(s, 10)
    assert elapsed is not None and elapsed <= 2.0, elapsed


def test_quit_closes_parked_connections_and_exits(forklb_factory):
    lb, port = _start(forklb_factory, keepalive="120s")
    socks = [_served(port) for _ in range(200)]
    try:
        started = time.monotonic()
        assert lb.cli("-s", "quit").returncode == 0
        wait_for(lambda: not lb.running, timeout=15,
                 message="forklb did not exit with only parked connections left")
        assert time.monotonic() - started < 6  # idle ones go after 1 s (IDLE_CLOSE_AFTER)
        assert all(_closed_within(s, 2) is not None for s in socks)
    finally:
        for s in socks:
            s.close()


def test_worker_connections_counts_parked_connections(forklb_factory):
    lb, port = _start(forklb_factory, connections=10, keepalive="120s")
    parked = [_served(port) for _ in range(10)]
    try:
        # All 10 slots are held by parked connections: an 11th waits in the backlog.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
        waiting.sendall(REQUEST)
        waiting.settimeout(1.5)
        try:
            early = waiting.recv(4096)
        except TimeoutError:
            early = None
        assert early is None, early
        # A parked client leaving (its watcher wakes, reads EOF) frees its slot.
        parked.pop().close()
        waiting.settimeout(10)
        assert _answer(waiting).startswith(b"HTTP/1.1 200 ")
        parked.append(waiting)
        # Parked connections still answer, over and over.
        for _ in range(3):
            for s in parked:
                s.sendall(REQUEST)
                assert _answer(s).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in parked:
            s.close()
    # Every slot came back: 10 new connections are served.
    again = [_served(port) for _ in range(10)]
    for s in again:
        s.close()


def test_keepalive_timeout_of_parked_connections_frees_their_slots(forklb_factory):
    lb, port = _start(forklb_factory, connections=5, keepalive="1s")
    first = [_served(port) for _ in range(5)]
    try:
        assert all(_closed_within(s, 5) is not None for s in first)
        second = [_served(port) for _ in range(5)]  # served at once: the slots are free
        for s in second:
            s.close()
    finally:
        for s in first:
            s.close()


def test_pipelined_and_split_requests_around_parking(forklb_factory):
    lb, port = _start(forklb_factory)
    with HttpClient(port, host="x") as c:
        c.send(REQUEST * 3)  # pipelined: read at once, never parked in between
        for _ in range(3):
            r = c.read_response()
            assert r.status == 200 and r.text == "ok\n"
        time.sleep(1.0)  # parked; then a request arriving in pieces
        c.send(b"GET / HT")
        time.sleep(0.3)
        c.send(b"TP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        c.send(b"\r\n")
        r = c.read_response()
        assert r.status == 200 and r.text == "ok\n"
    # A client silent after connecting is parked too, and served when it speaks.
    with HttpClient(port, host="x") as c:
        time.sleep(1.0)
        r = c.get("/")
        assert r.status == 200 and r.text == "ok\n"
        assert not c.server_closed(0.3)


TLS_CONF = """
worker_processes 1;
error_log logs/error.log info;
events {{ }}
http {{
    access_log off;
    keepalive_timeout 3s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@pytest.fixture
def a_cert(tmp_path) -> dict:
    return {"a.test": make_cert(tmp_path, "a.test")}


def test_tls_keepalive_connection_parks_and_resumes(forklb_factory, a_cert):
    certs = a_cert
    cert, key = certs["a.test"]
    port = free_port()
    lb = forklb_factory(TLS_CONF.format(port=port, cert=cert, key=key))
    lb.start(wait_ports=[port], workers=1)
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        for pause in (0, 1.0, 1.5):  # served at once, then after being parked
            time.sleep(pause)
            r = c.get("/")
            assert r.status == 200 and r.text == "ok\n"
        c.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n" * 2)  # pipelined, one record
        for _ in range(2):
            assert c.read_response().text == "ok\n"
        started = time.monotonic()
        assert c.server_closed(10)
        assert 2.0 <= time.monotonic() - started <= 4.0


METRICS_CONF = """
worker_processes 1;
events {{ }}
sidecar {{ listen 127.0.0.1:{side}; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def test_parked_connections_count_as_idle_in_the_metrics(forklb_factory):
    port, side = free_port(), free_port()
    lb = forklb_factory(METRICS_CONF.format(port=port, side=side))
    lb.start(wait_ports=[port, side], workers=1)

    def gauges() -> tuple[float, float]:
        samples = scrape(side)
        return (total(samples, "forklb_connections_active"),
                total(samples, "forklb_connections", state="idle"))

    socks = [_served(port) for _ in range(5)]
    try:
        time.sleep(1.0)  # parked
        wait_for(lambda: gauges() == (5, 5), 10, message=lambda: str(gauges()))
        socks.pop().close()  # woken by EOF, closed, forgotten
        wait_for(lambda: gauges() == (4, 4), 10, message=lambda: str(gauges()))
        socks[0].sendall(REQUEST)  # woken by a request, still counted
        assert _answer(socks[0]).startswith(b"HTTP/1.1 200 ")
        time.sleep(1.0)
        wait_for(lambda: gauges() == (4, 4), 10, message=lambda: str(gauges()))
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: gauges() == (0, 0), 10, message=lambda: str(gauges()))
