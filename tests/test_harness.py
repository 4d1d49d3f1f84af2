"""Tests of the end-to-end harness itself (they do not need a working forklb)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import (
    ForkLB,
    HttpClient,
    NginxBackend,
    PyBackend,
    free_port,
    http_request,
    kill_tree,
    pid_alive,
    port_is_open,
    raw_exchange,
    wait_for,
    wait_port,
    wait_port_closed,
)

NginxFactory = Callable[..., NginxBackend]
PyFactory = Callable[..., PyBackend]


# --------------------------------------------------------------------------- nginx backend


def test_nginx_backend_answers_fixed_body(nginx_backend_factory: NginxFactory) -> None:
    backend = nginx_backend_factory(body="chaoge_www_121")
    resp = http_request(backend.port)
    assert resp.status == 200
    assert resp.body == b"chaoge_www_121\n"
    assert resp.header("content-type", "").startswith("text/plain")
    assert resp.header("CONTENT-LENGTH") == "15"
    assert resp.header("x-backend") == backend.name
    assert ("Connection", "close") in resp.headers


def test_nginx_backend_custom_status_and_server_block(
    nginx_backend_factory: NginxFactory,
) -> None:
    other = free_port()
    backend = nginx_backend_factory(
        body="teapot",
        status=418,
        server_directives='location /special { return 201 "special\\n"; }',
        extra_servers=f'server {{ listen 127.0.0.1:{other}; return 200 "other\\n"; }}',
    )
    assert http_request(backend.port).status == 418
    special = http_request(backend.port, "/special")
    assert (special.status, special.body) == (201, b"special\n")
    assert http_request(other).body == b"other\n"


def test_http_client_keepalive_two_requests(nginx_backend_factory: NginxFactory) -> None:
    backend = nginx_backend_factory(body="keepalive")
    with HttpClient(backend.port) as client:
        first = client.get("/a")
        local_port = client.local_port
        second = client.get("/b")
        assert client.local_port == local_port
        assert not client.server_closed(timeout=0.2)
    for resp in (first, second):
        assert resp.status == 200
        assert resp.body == b"keepalive\n"
        assert resp.header("connection", "keep-alive").lower() == "keep-alive"


def test_http_client_pipelined_head_and_get(nginx_backend_factory: NginxFactory) -> None:
    backend = nginx_backend_factory(body="pipe")
    with HttpClient(backend.port) as client:
        client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = client.read_response("HEAD")
        get = client.read_response()
    assert head.status == 200 and head.body == b"" and head.header("content-length") == "5"
    assert get.body == b"pipe\n"


def test_raw_exchange_http10(nginx_backend_factory: NginxFactory) -> None:
    backend = nginx_backend_factory(body="raw")
    data = raw_exchange(backend.port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", timeout=5)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"\r\n\r\nraw\n")


def test_nginx_stop_leaves_no_process(tmp_path: Path) -> None:
    backend = NginxBackend(tmp_path, body="bye").start()
    master = backend.pid
    workers = wait_for(backend.worker_pids, 5, message="nginx worker never appeared")
    assert len(workers) == 1
    tree = [master, *workers]
    assert all(pid_alive(p) for p in tree)
    backend.stop()
    assert not backend.running
    for pid in tree:
        assert not pid_alive(pid), f"nginx pid {pid} survived stop()"
    assert not port_is_open(backend.port)


def test_nginx_context_manager(tmp_path: Path) -> None:
    with NginxBackend(tmp_path, body="ctx") as backend:
        assert http_request(backend.port).body == b"ctx\n"
        pid = backend.pid
    assert not pid_alive(pid)
    wait_port_closed(backend.port, timeout=2)


def test_nginx_bad_config_fails_with_error_log(tmp_path: Path) -> None:
    backend = NginxBackend(tmp_path, server_directives="bogus_directive on;")
    with pytest.raises(AssertionError, match="bogus_directive"):
        backend.start(timeout=5)
    assert not backend.running


# --------------------------------------------------------------------------- python backend


def test_py_backend_echo_returns_request(py_backend_factory: PyFactory) -> None:
    backend = py_backend_factory("echo", name="echo1")
    resp = http_request(
        backend.port,
        "/a//b?x=1%20&y",
        host="example.test",
        method="POST",
        headers=[("X-Test", "42"), ("X-Dup", "1"), ("X-Dup", "2")],
        body=b"hello",
    )
    assert resp.status == 200
    assert resp.header("x-backend") == "echo1"
    info = resp.json()
    assert info["method"] == "POST"
    assert info["path"] == "/a//b?x=1%20&y"
    assert info["body_len"] == 5 and info["body"] == "hello"
    headers = [tuple(h) for h in info["headers"]]
    assert ("Host", "example.test") in headers
    assert ("X-Test", "42") in headers
    assert [v for k, v in headers if k == "X-Dup"] == ["1", "2"]
    assert ("Content-Length", "5") in headers
    assert ("Connection", "close") in headers


def test_py_backend_name_mode_keepalive_and_chunked(py_backend_factory: PyFactory) -> None:
    backend = py_backend_factory("name", name="b1")
    with HttpClient(backend.port) as client:
        plain = client.get("/")
        chunked = client.get("/?__chunked=1&__size=10000")
        status = client.get("/?__status=503")
        assert not client.server_closed(timeout=0.2)
        closing = client.get("/?__close=1")
        assert client.server_closed(timeout=2)
    assert plain.body == b"b1\n" and not plain.chunked
    assert chunked.chunked and chunked.body == b"x" * 10000
    assert status.status == 503 and status.body == b"b1\n"
    assert closing.header("connection") == "close"


def test_py_backend_stop_and_delay(tmp_path: Path) -> None:
    backend = PyBackend(tmp_path, "name", body="slow").start()
    started = time.monotonic()
    assert http_request(backend.port, "/?__delay=0.3").body == b"slow\n"
    assert time.monotonic() - started >= 0.3
    pid = backend.pid
    backend.stop()
    assert not pid_alive(pid)
    wait_port_closed(backend.port, timeout=2)


# --------------------------------------------------------------------------- response parsing


@pytest.fixture
def scripted_server() -> Iterator[Callable[[bytes], int]]:
    """A one-shot socket server that reads a request head, writes bytes, then closes."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def serve(reply: bytes) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        socks.append(srv)

        def run() -> None:
            conn, _ = srv.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(reply)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return int(srv.getsockname()[1])

    yield serve
    for s in socks:
        s.close()
    for t in threads:
        t.join(timeout=2)


def test_parse_close_delimited_body(scripted_server: Callable[[bytes], int]) -> None:
    port = scripted_server(b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nuntil close")
    resp = http_request(port)
    assert resp.close_delimited and resp.body == b"until close"
    assert resp.version == "HTTP/1.0" and resp.header("x-a") == "1"


def test_parse_chunked_with_trailers_and_interim(
    scripted_server: Callable[[bytes], int],
) -> None:
    port = scripted_server(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    resp = http_request(port)
    assert resp.status == 200 and resp.chunked
    assert resp.body == b"abcde"
    assert resp.trailers == [("X-Trailer", "t")]


def test_parse_truncated_body_raises(scripted_server: Callable[[bytes], int]) -> None:
    port = scripted_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(Exception, match="3 of 10"):
        http_request(port)


# --------------------------------------------------------------------------- ports / processes


def test_free_port_and_wait_port_timeout() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    port = free_port()
    started = time.monotonic()
    with pytest.raises(AssertionError, match=f"127.0.0.1:{port}"):
        wait_port(port, timeout=0.3)
    assert time.monotonic() - started < 2


def test_kill_tree_kills_grandchildren() -> None:
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        parent = psutil.Process(proc.pid)
        children = wait_for(parent.children, 5, message="grandchild never started")
        kill_tree(proc.pid, timeout=1.0, popen=proc, orphan_grace=0.5)
        assert proc.returncode is not None
        for child in children:
            assert not pid_alive(child.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_forklb_bad_config_reports_failure(tmp_path: Path) -> None:
    port = free_port()
    lb = ForkLB(tmp_path, "this is { not a valid config\n")
    assert lb.conf_path.read_text() == "this is { not a valid config\n"
    with pytest.raises(AssertionError, match="exited early") as info:
        lb.start(wait_ports=[port], timeout=20)
    assert "--- stderr" in str(info.value)
    assert not lb.running
    assert lb.worker_pids() == []
