"""Limits through real forklb workers: header buffers, send_timeout, the body rate,
access log escaping (checked against Debian's nginx writing the same request).

Boundaries were taken from nginx 1.22 with ``large_client_header_buffers 2 1k``: a
request or header line of 1024 bytes (CRLF included) passes, 1025 does not; two
897-byte header lines pass, three do not.  nginx answers an over-long header line
or section with 400 ("Request Header Or Cookie Too Large"); forklb answers 431.
"""

from __future__ import annotations

import select
import socket
import time

import psutil
import pytest
from harness import free_port, raw_exchange, wait_for

CONF = """
worker_processes 1;
error_log logs/error.log info;
events {{ }}
http {{
    access_log off;
    large_client_header_buffers 2 1k;
    client_header_timeout {header_timeout};
    {http}
    upstream app {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
        location /proxy/ {{ proxy_pass http://app/; {location} }}
    }}
}}
"""


def _start(forklb_factory, backend=9, http="", location="", header_timeout="30s"):
    port = free_port()
    lb = forklb_factory(CONF.format(port=port, backend=backend, http=http, location=location,
                                    header_timeout=header_timeout))
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def _status(resp: bytes) -> bytes:
    return resp.split(b"\r\n", 1)[0]


def _request_line(length: int) -> bytes:
    """A request line of exactly ``length`` bytes, CRLF included."""
    line = b"GET /" + b"a" * (length - len(b"GET / HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"
    assert len(line) == length
    return line


def _header_line(length: int, name: bytes = b"X-A") -> bytes:
    line = name + b": " + b"b" * (length - len(name) - 4) + b"\r\n"
    assert len(line) == length
    return line


END = b"Host: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("length, status", [
    (1024, b"200 OK"), (1025, b"414 Request-URI Too Large"),
])
def test_request_line_limit(forklb_factory, length, status):
    lb, port = _start(forklb_factory)
    resp = raw_exchange(port, _request_line(length) + END)
    assert _status(resp) == b"HTTP/1.1 " + status


@pytest.mark.parametrize("length, status", [(1024, b"200"), (1025, b"431")])
def test_header_line_limit(forklb_factory, length, status):
    lb, port = _start(forklb_factory)
    resp = raw_exchange(port, b"GET / HTTP/1.1\r\n" + _header_line(length) + END)
    assert _status(resp).startswith(b"HTTP/1.1 " + status), resp[:100]
    if status == b"431":
        assert b"Connection: close" in resp
        wait_for(lambda: "client sent too long header line" in lb.error_log(), 5)


@pytest.mark.parametrize("count, status", [(2, b"200"), (3, b"431")])
def test_header_section_limit(forklb_factory, count, status):
    lb, port = _start(forklb_factory)
    headers = b"".join(_header_line(897, b"X-%d" % i) for i in range(count))
    resp = raw_exchange(port, b"GET / HTTP/1.1\r\n" + headers + END)
    assert _status(resp).startswith(b"HTTP/1.1 " + status), resp[:100]


def _trickle(port: int, pieces: list[bytes], pause: float = 0.02) -> tuple[bytes, int]:
    """Send ``pieces`` one by one (separate reads on the server); return the answer and
    how many bytes went out before the server stopped taking them."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(10)
    sent = 0
    try:
        for piece in pieces:
            s.sendall(piece)
            sent += len(piece)
            if select.select([s], [], [], pause)[0]:  # answered: stop sending
                break
    except OSError:
        pass
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    s.close()
    return data, sent


def _pieces(data: bytes, size: int = 64) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("what, status, limit", [
    ("request line", b"414", 1024), ("header line", b"431", 1024 + 25), ("section", b"431", 2048),
])
def test_limits_hold_when_the_header_trickles_in(forklb_factory, what, status, limit):
    """A header that never ends, sent 64 bytes per read, is cut off once past the
    limit, not after the whole of it."""
    lb, port = _start(forklb_factory)
    if what == "request line":
        stream = b"GET /" + b"a" * 4000  # no end of line, ever
    elif what == "header line":
        stream = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 4000
    else:  # many short lines that never end the section
        stream = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Short: ccccccccccccccccc\r\n" * 200
    resp, sent = _trickle(port, _pieces(stream))
    assert _status(resp).startswith(b"HTTP/1.1 " + status), resp[:100]
    # Refused as soon as the limit is passed (give or take a read), not at the end.
    assert sent <= limit + 3 * 64, sent
    assert b"Connection: close" in resp


def test_send_timeout_closes_a_client_that_stops_reading(forklb_factory, py_backend_factory):
    backend = py_backend_factory("echo")
    lb, port = _start(forklb_factory, backend.port, location="send_timeout 1s;")
    (worker,) = lb.worker_pids()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /proxy/?__size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    # Never read: forklb's writes stop progressing once the socket buffers are full.
    wait_for(lambda: "client timed out (110: Connection timed out) while sending response "
             "to client" in lb.error_log(), 20, message=lb.diagnostics)
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    line = next(x for x in lb.error_log().splitlines() if "while sending response" in x)
    assert "[info]" in line and 'request: "GET /proxy/?__size=50000000 HTTP/1.1"' in line

    def upstream_closed() -> bool:
        return not [c for c in psutil.Process(worker).net_connections("tcp")
                    if c.raddr and c.raddr.port == backend.port]

    wait_for(upstream_closed, 5, message="the upstream connection was not released")
    # The client connection is reset (not just closed: a close would leave the unsent
    # data, and the connection, to the kernel for as long as the client reads slowly).
    s.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while s.recv(1 << 20):
            pass
    s.close()


def _slow_post(port: int, path: str, total: int, trickle_for: float, interval: float = 0.5):
    """POST ``total`` bytes declared, one byte every ``interval`` s for ``trickle_for`` s,
    then the rest at once.  Returns (answer, seconds until the answer)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), total))
    started = time.monotonic()
    sent = 0
    answered = None
    try:
        while time.monotonic() - started < trickle_for:
            s.sendall(b"z")
            sent += 1
            if select.select([s], [], [], interval)[0]:  # answered before the end
                answered = time.monotonic()
                break
        else:
            s.sendall(b"z" * (total - sent))
    except OSError:
        pass
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    s.close()
    return data, (answered or time.monotonic()) - started


def test_body_min_rate_cuts_off_a_trickling_post(forklb_factory, py_backend_factory):
    """One byte every 0.5 s never trips client_body_timeout 2s; client_body_min_rate
    100 (bytes/s) ends it after the 2 s grace: 408, close."""
    backend = py_backend_factory("echo")
    lb, port = _start(forklb_factory, backend.port, http="client_body_timeout 2s;",
                      location="client_body_min_rate 100;")
    resp, elapsed = _slow_post(port, "/proxy/", 1000, trickle_for=6)
    assert _status(resp) == b"HTTP/1.1 408 Request Timeout", resp[:200]
    assert 1.5 < elapsed < 4.5, elapsed
    wait_for(lambda: "slower than client_body_min_rate" in lb.error_log(), 5)


def test_body_without_min_rate_may_trickle(forklb_factory, py_backend_factory):
    """The same trickle with client_body_min_rate 0 (nginx's behaviour) is served."""
    backend = py_backend_factory("echo")
    lb, port = _start(forklb_factory, backend.port, http="client_body_timeout 2s;",
                      location="client_body_min_rate 0;")
    resp, elapsed = _slow_post(port, "/proxy/", 1000, trickle_for=3)
    assert _status(resp) == b"HTTP/1.1 200 OK", resp[:200]
    assert b'"body_len": 1000' in resp


def test_idle_body_gets_408(forklb_factory, py_backend_factory):
    backend = py_backend_factory("echo")
    lb, port = _start(forklb_factory, backend.port, http="client_body_timeout 1s;")
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(b"POST /proxy/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    started = time.monotonic()
    resp = s.recv(65536)
    assert _status(resp) == b"HTTP/1.1 408 Request Timeout"
    assert time.monotonic() - started < 4
    wait_for(lambda: "client timed out (110: Connection timed out) while reading client "
             "request body" in lb.error_log(), 5)
    s.close()


LOG_FORMATS = """
    log_format esc_default '$request_uri|$http_user_agent|$http_referer|$status';
    log_format esc_json escape=json
        '{"uri":"$request_uri","ua":"$http_user_agent","r":"$http_referer"}';
    log_format esc_none escape=none '$request_uri|$http_user_agent|$http_referer';
"""
LOGS = "access_log {dir}/d.log esc_default; access_log {dir}/j.log esc_json; " \
       "access_log {dir}/n.log esc_none;"
HOSTILE = (b'GET /p?q="x"\\y%22 HTTP/1.1\r\nHost: x\r\n'
           b'User-Agent: a"b\\c\td \xe9\xff end\r\nConnection: close\r\n\r\n')


def test_access_log_escaping_matches_nginx(forklb_factory, nginx_backend_factory, tmp_path):
    ngx_dir = tmp_path / "ngx-logs"
    ngx_dir.mkdir()
    ngx_port = free_port()
    # log_format must come before the access_log using it: a server of its own
    nginx = nginx_backend_factory(extra_servers=LOG_FORMATS + f"""
        server {{ listen 127.0.0.1:{ngx_port}; location / {{ return 200 "ok\\n";
            {LOGS.format(dir=ngx_dir)} }} }}""")
    port = free_port()
    conf = f"""
worker_processes 1;
events {{ }}
http {{
    {LOG_FORMATS}
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; {LOGS.format(dir="logs")} }}
    }}
}}
"""
    lb = forklb_factory(conf)
    lb.start(wait_ports=[port], workers=1)
    assert _status(raw_exchange(port, HOSTILE)).startswith(b"HTTP/1.1 200")
    assert nginx.running
    assert _status(raw_exchange(ngx_port, HOSTILE)).startswith(b"HTTP/1.1 200")
    for name in ("d.log", "j.log", "n.log"):
        ours = lb.path("logs/" + name)
        wait_for(lambda ours=ours: ours.exists() and ours.read_bytes().endswith(b"\n"), 5)
        theirs = (ngx_dir / name).read_bytes()
        assert ours.read_bytes() == theirs, name



def test_refused_requests_are_access_logged(forklb_factory):
    """Requests refused while their head is read (a limit, a parse error) get an
    access log line with their status, as nginx writes one."""
    port = free_port()
    lb = forklb_factory(f"""
worker_processes 1;
events {{ }}
http {{
    large_client_header_buffers 2 1k;
    access_log logs/access.log;
    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}
}}
""")
    lb.start(wait_ports=[port], workers=1)
    too_long = raw_exchange(port, _request_line(1025) + END)
    assert _status(too_long) == b"HTTP/1.1 414 Request-URI Too Large"
    garbage = raw_exchange(port, b"GE\x01T / HTTP/1.1\r\n" + END)
    assert _status(garbage) == b"HTTP/1.1 400 Bad Request"
    assert _status(raw_exchange(port, b"GET /ok HTTP/1.1\r\n" + END)) == b"HTTP/1.1 200 OK"
    log = lb.path("logs/access.log")
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 3, 5)
    lines = log.read_text().splitlines()
    assert '"GET /aaa' in lines[0] and '" 414 ' in lines[0]
    assert '" 400 ' in lines[1]
    assert '"GET /ok HTTP/1.1" 200 ' in lines[2]


def test_first_request_waits_client_header_timeout(forklb_factory):
    """A new connection that sends nothing is closed after client_header_timeout, not
    keepalive_timeout (nginx's ngx_http_wait_request_handler)."""
    lb, port = _start(forklb_factory, header_timeout="1s", http="keepalive_timeout 60s;")
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    started = time.monotonic()
    assert s.recv(65536) == b""
    assert 0.9 < time.monotonic() - started < 4
    s.close()


def test_header_timeout_closes_and_logs_as_nginx(forklb_factory):
    """A header not complete within client_header_timeout: closed without an answer
    (as nginx), logged at info with nginx's words."""
    lb, port = _start(forklb_factory, header_timeout="1s")
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert s.recv(65536) == b""
    assert time.monotonic() - started < 4
    s.close()
    wait_for(lambda: "[info]" in lb.error_log() and "client timed out (110: Connection timed "
             "out) while reading client request headers" in lb.error_log(), 5)
