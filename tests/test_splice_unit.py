"""forklb.http.splice on real loopback TCP sockets, in this process under gevent.

Each test moves bytes src → pipe → dst with :func:`splice.relay` and checks
what arrived, what stayed in the source and how failures are reported.
"""

from __future__ import annotations

import os

import gevent
import pytest
from gevent import socket

from forklb.http import splice


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (gevent's, so fds are non-blocking)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return client, accepted


@pytest.fixture
def pairs():
    """(writer, src) and (dst, reader): relay reads src and writes dst."""
    writer, src = tcp_pair()
    dst, reader = tcp_pair()
    yield writer, src, dst, reader
    for s in (writer, src, dst, reader):
        s.close()


def read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def idle(moved: int) -> float:
    return 5.0


def test_relay_moves_exactly_n_bytes_and_leaves_the_rest(pairs):
    writer, src, dst, reader = pairs
    body = os.urandom(3 * 1024 * 1024 + 7)
    sender = gevent.spawn(writer.sendall, body + b"NEXT")
    received = gevent.spawn(read_exact, reader, len(body))
    assert splice.relay(src.fileno(), dst.fileno(), len(body), idle, 5.0) == len(body)
    sender.get(timeout=10)
    assert received.get(timeout=10) == body
    # The next message's bytes stay in the source socket.
    assert read_exact(src, 4) == b"NEXT"
    assert splice._working is True and len(splice._free) >= 1


def test_source_eof_delivers_what_came_then_reports_it(pairs):
    writer, src, dst, reader = pairs
    writer.sendall(b"x" * 1000)
    writer.close()
    with pytest.raises(splice.SpliceFailed) as info:
        splice.relay(src.fileno(), dst.fileno(), 5000, idle, 5.0)
    assert (info.value.side, info.value.kind, info.value.moved) == ("src", "eof", 1000)
    assert read_exact(reader, 1000) == b"x" * 1000


def test_source_timeout_reports_the_wait(pairs):
    writer, src, dst, reader = pairs
    writer.sendall(b"y" * 10)
    with pytest.raises(splice.SpliceFailed) as info:
        splice.relay(src.fileno(), dst.fileno(), 100, lambda moved: 0.2, 5.0)
    e = info.value
    assert (e.side, e.kind, e.moved, e.waited) == ("src", "timeout", 10, 0.2)


def test_destination_gone_is_a_dst_error_and_the_pipe_is_not_pooled(pairs):
    writer, src, dst, reader = pairs
    reader.close()
    gevent.sleep(0.05)
    free = len(splice._free)
    sender = gevent.spawn(writer.sendall, b"z" * (4 << 20))
    with pytest.raises(splice.SpliceFailed) as info:
        splice.relay(src.fileno(), dst.fileno(), 4 << 20, idle, 5.0)
    assert (info.value.side, info.value.kind) == ("dst", "error")
    assert info.value.err is not None
    assert len(splice._free) <= free  # a pipe that may hold bytes is closed
    sender.kill()


def test_destination_stalled_times_out(pairs):
    writer, src, dst, reader = pairs  # nobody reads ``reader``
    sender = gevent.spawn(writer.sendall, b"w" * (64 << 20))
    with pytest.raises(splice.SpliceFailed) as info:
        splice.relay(src.fileno(), dst.fileno(), 64 << 20, idle, 0.3)
    assert (info.value.side, info.value.kind) == ("dst", "timeout")
    assert 0 < info.value.moved < 64 << 20
    sender.kill()


def test_usable_refuses_tls_sockets():
    class FakeTls:
        def cipher(self):
            return None

    assert splice.usable(object(), object()) is (splice._working is not False)
    assert splice.usable(object(), FakeTls()) is False


def test_rate_timeout_follows_client_body_min_rate():
    clock = [100.0]
    plain = splice.rate_timeout(60.0, 0, 100.0, 0, lambda: clock[0])
    assert plain(10**9) == 60.0
    # 10 s of grace, then each byte buys 1/1000 s: 5000 bytes read before, 0 since.
    timed = splice.rate_timeout(10.0, 1000, 100.0, 5000, lambda: clock[0])
    assert timed(0) == 10.0  # the idle timeout binds at first
    clock[0] = 112.0
    assert timed(0) == pytest.approx(3.0)  # 100 + 10 + 5 - 112
    assert timed(2000) == pytest.approx(5.0)
    clock[0] = 120.0
    assert timed(0) <= 0  # already too slow


def test_copy_moves_exactly_n_bytes_through_recv_into(pairs):
    writer, src, dst, reader = pairs
    body = os.urandom(splice.BUFFER_SIZE * 3 + 5)
    sender = gevent.spawn(writer.sendall, body + b"NEXT")
    received = gevent.spawn(read_exact, reader, len(body))
    assert splice.copy(src, dst.sendall, len(body), idle) == len(body)
    sender.get(timeout=10)
    assert received.get(timeout=10) == body
    assert read_exact(src, 4) == b"NEXT"
    assert len(splice._buffers) >= 1  # the buffer goes back to the pool


def test_copy_source_eof_and_timeout(pairs):
    writer, src, dst, reader = pairs
    writer.sendall(b"q" * 100)
    with pytest.raises(splice.SpliceFailed) as info:
        splice.copy(src, dst.sendall, 1000, lambda moved: 0.2)
    assert (info.value.side, info.value.kind, info.value.moved) == ("src", "timeout", 100)
    writer.close()
    with pytest.raises(splice.SpliceFailed) as info:
        splice.copy(src, dst.sendall, 1000)
    assert (info.value.side, info.value.kind) == ("src", "eof")
    assert read_exact(reader, 100) == b"q" * 100


def test_proxy_splice_directive_inherits_and_checks(tmp_path):
    from forklb.config.errors import ConfigError
    from forklb.config.loader import load

    (tmp_path / "nginx.conf").write_text(
        "events {}\nhttp {\n proxy_splice off;\n upstream u { server 127.0.0.1:1; }\n"
        " server {\n  location / { proxy_pass http://u; }\n"
        "  location /a { proxy_splice on; proxy_pass http://u; }\n"
        "  location /b { proxy_splice 1m; proxy_pass http://u; }\n }\n}\n")
    locations = load("nginx.conf", prefix=str(tmp_path)).http.servers[0].locations
    splice_of = {loc.pattern: loc.proxy_splice for loc in locations}
    assert (splice_of["/"], splice_of["/a"], splice_of["/b"]) == (0, 16 << 20, 1 << 20)
    (tmp_path / "nginx.conf").write_text("events {}\nhttp {\n proxy_splice yes;\n}\n")
    with pytest.raises(ConfigError) as info:
        load("nginx.conf", prefix=str(tmp_path))
    assert str(info.value) == ('invalid value "yes" in "proxy_splice" directive, it must be '
                               '"on", "off" or a size in nginx.conf:3')


def test_einval_on_first_splice_switches_the_worker_to_copying(pairs, monkeypatch):
    # An eventfd cannot be spliced from: the kernel answers EINVAL, as a sandbox
    # without splice would. In a worker that never spliced, that turns it off.
    writer, src, dst, reader = pairs
    monkeypatch.setattr(splice, "_working", None)
    monkeypatch.setattr(splice, "_free", [])
    efd = os.eventfd(1)
    try:
        with pytest.raises(splice.Unsupported):
            splice.relay(efd, dst.fileno(), 8, idle, 5.0)
    finally:
        os.close(efd)
    assert splice._working is False and splice._free == []
    assert splice.usable(object()) is False
    # Once splice has worked, the same error is the source's failure, not a switch.
    monkeypatch.setattr(splice, "_working", True)
    efd = os.eventfd(1)
    try:
        with pytest.raises(splice.SpliceFailed) as info:
            splice.relay(efd, dst.fileno(), 8, idle, 5.0)
    finally:
        os.close(efd)
    assert (info.value.side, info.value.kind) == ("src", "error")
    assert splice._working is True
