"""When every server has failed: 502 at once, 'no live upstreams', no connection made."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from harness import free_port, http_request


class Resetter:
    """Accepts, reads, resets: every attempt is an upstream error; counts attempts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.settimeout(1)
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def resetters():
    made: list[Resetter] = []

    def make() -> Resetter:
        made.append(Resetter())
        return made[-1]

    yield make
    for r in made:
        r.close()


def _lb(forklb_factory, ports):
    port = free_port()
    servers = " ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in ports)
    lb = forklb_factory(f"""
        worker_processes 1;
        events {{ }}
        http {{
            access_log off;
            upstream app {{ {servers} }}
            server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://app; }} }}
        }}""")
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def test_all_failed_means_502_at_once_without_connecting(forklb_factory, resetters):
    a, b = resetters(), resetters()
    lb, port = _lb(forklb_factory, [a.port, b.port])
    assert http_request(port).status == 502  # both tried, both failed
    assert (a.accepted, b.accepted) == (1, 1)
    t0 = time.monotonic()
    assert http_request(port).status == 502
    assert time.monotonic() - t0 < 0.5
    assert (a.accepted, b.accepted) == (1, 1)  # nobody was contacted
    assert "no live upstreams while connecting to upstream" in lb.error_log()


def test_a_single_server_is_never_marked_failed(forklb_factory, resetters):
    only = resetters()
    lb, port = _lb(forklb_factory, [only.port])
    for n in range(1, 4):
        assert http_request(port).status == 502
        assert only.accepted == n  # tried every time: nginx never disables the only server
    assert "no live upstreams" not in lb.error_log()
