"""``server NAME resolve``: the sidecar follows DNS (here /etc/hosts) without a reload."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
from harness import SocketBackend, free_port, http_request, wait_for

NAME = "forklb-dns-test.example"
HOSTS = Path("/etc/hosts")


@pytest.fixture
def hosts_entry():
    """Point NAME at an address in /etc/hosts; the original file comes back afterwards."""
    backup = HOSTS.with_name("hosts.forklb-test-backup")
    shutil.copy2(HOSTS, backup)
    original = HOSTS.read_text()

    def point(address: str) -> None:
        HOSTS.write_text(original.rstrip("\n") + f"\n{address} {NAME}\n")

    try:
        yield point
    finally:
        HOSTS.write_text(original)
        backup.unlink()


class NamedBackend(SocketBackend):
    """A tiny HTTP server on ADDRESS:PORT answering its own address."""

    def __init__(self, address: str, port: int):
        self.address = address
        super().__init__(address, port)

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        body = self.address.encode()
        conn.settimeout(2)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                         b"\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass


def test_resolve_follows_the_name_without_reload(forklb_factory, hosts_entry):
    port = free_port()
    backends = [NamedBackend("127.0.0.2", port), NamedBackend("127.0.0.3", port)]
    try:
        hosts_entry("127.0.0.2")
        lb_port = free_port()
        lb = forklb_factory(f"""
            worker_processes 2;
            error_log logs/error.log notice;
            events {{ }}
            http {{
                access_log off;
                upstream app {{ server {NAME}:{port} resolve valid=1s; }}
                server {{ listen 127.0.0.1:{lb_port}; location / {{ proxy_pass http://app; }} }}
            }}""")
        lb.start(wait_ports=[lb_port], workers=2)
        assert {http_request(lb_port).text for _ in range(4)} == {"127.0.0.2"}
        workers = lb.worker_pids()
        hosts_entry("127.0.0.3")
        t0 = time.monotonic()
        wait_for(lambda: http_request(lb_port).text == "127.0.0.3", timeout=5,
                 message=lambda: lb.error_log())
        assert time.monotonic() - t0 < 3.5  # valid=1s: the next lookup picks it up
        assert {http_request(lb_port).text for _ in range(6)} == {"127.0.0.3"}
        assert lb.worker_pids() == workers  # no reload, no restart
        assert f'resolved to 127.0.0.3:{port}' in lb.error_log()
    finally:
        for backend in backends:
            backend.stop()
