"""Expect: 100-continue and $upstream_connect_time, through real workers and backends."""

from __future__ import annotations

import json
import re
import socket

from harness import free_port, wait_for

CONF = """
worker_processes 1;
events {{ }}
http {{
    log_format timing '$status "$upstream_addr" "$upstream_connect_time"';
    access_log logs/access.log timing;
    client_max_body_size 1k;
    upstream app {{ {servers} }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; }}
    }}
}}
"""


def _start(forklb_factory, ports):
    servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
    port = free_port()
    lb = forklb_factory(CONF.format(servers=servers, port=port))
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = _read_until(sock, b"\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_100_continue_is_sent_before_the_body_and_not_forwarded(forklb_factory,
                                                                py_backend_factory):
    echo = py_backend_factory("echo", name="echo1")
    lb, port = _start(forklb_factory, [echo.port])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        # The client sends nothing more until it is told to go on.
        interim = _read_until(s, b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        head, body = _read_response(s)
    assert head.startswith(b"HTTP/1.1 200")
    seen = json.loads(body)
    assert seen["body"] == "hello"
    assert "expect" not in {name.lower() for name, _ in seen["headers"]}


def test_expect_with_a_body_over_the_limit_gets_413_without_100(forklb_factory,
                                                                 py_backend_factory):
    echo = py_backend_factory("echo", name="echo1")
    lb, port = _start(forklb_factory, [echo.port])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head = _read_until(s, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head


def test_upstream_connect_time_per_attempt(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo", name="echo1")
    refused = free_port()  # nothing listens there
    lb, port = _start(forklb_factory, [refused, echo.port])
    log = lb.path("logs/access.log")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for _ in range(3):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            head, _ = _read_response(s)
            assert head.startswith(b"HTTP/1.1 200")
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, timeout=5)
    lines = log.read_text().splitlines()
    # First request: the refused peer ("-") then a fresh connect to the echo backend.
    status, addrs, times = re.fullmatch(r'(\d+) "(.*)" "(.*)"', lines[0]).groups()
    assert status == "200"
    assert addrs == f"127.0.0.1:{refused}, 127.0.0.1:{echo.port}"
    first, second = times.split(", ")
    assert first == "-"
    assert 0.0 <= float(second) < 1.0
    # The refused peer is now out for fail_timeout; the echo connection is pooled.
    assert lines[2].endswith(f'"127.0.0.1:{echo.port}" "0.000"'), lines[2]
