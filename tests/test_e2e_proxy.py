"""Proxying through real forklb workers to real Python backends."""

from __future__ import annotations

import email.utils
import socket
import time
from datetime import datetime

import pytest
from harness import HttpClient, free_port, http_request, raw_exchange, wait_for

CONF = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    client_max_body_size 10m;  # the streaming tests send more than nginx's 1m default
    upstream app {{ {servers} }}
    server {{
        listen 127.0.0.1:{port};
        server_name www.example.com;
        location / {{
            proxy_pass http://app;
            {extra}
        }}
        location /a/ {{ proxy_pass http://app/b/; }}
        location /slow/ {{ proxy_pass http://app; proxy_read_timeout 1s; }}
    }}
}}
"""


@pytest.fixture
def echo(py_backend_factory):
    return py_backend_factory("echo", name="echo1")


def _start(forklb_factory, ports, extra=""):
    servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
    port = free_port()
    lb = forklb_factory(CONF.format(servers=servers, port=port, extra=extra))
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def _headers(resp) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_default_upstream_headers(forklb_factory, echo):
    lb, port = _start(forklb_factory, [echo.port])
    r = http_request(port, "/x?y=1", host="www.example.com", headers={
        "X-Custom": "kept", "Connection": "close, X-Secret", "X-Secret": "dropped",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Connection": "keep-alive",
    })
    assert r.status == 200
    body = r.json()
    h = _headers(r)
    assert body["path"] == "/x?y=1"
    assert h["host"] == ["app"]  # $proxy_host: the upstream group's name
    assert h["x-custom"] == ["kept"]
    for hop in ("x-secret", "keep-alive", "te", "proxy-connection"):
        assert hop not in h, hop
    assert h.get("connection", ["keep-alive"]) != ["close"]  # upstream side is keep-alive
    assert r.header("server") == "forklb"
    assert r.header("x-backend") == "echo1"


def test_date_header_and_log_time_follow_the_clock(forklb_factory, echo):
    """The worker formats the time once a second, from a timer (nginx's cached
    time): Date and $time_local of an idle worker's next request are still current."""
    port = free_port()
    lb = forklb_factory(f"""
worker_processes 1;
events {{ }}
http {{
    log_format t '$time_local';
    upstream app {{ server 127.0.0.1:{echo.port}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; access_log logs/t.log t; }}
    }}
}}
""")
    lb.start(wait_ports=[port], workers=1)
    seen = []
    for _ in range(2):
        before = time.time()
        r = http_request(port, "/", host="www.example.com")
        after = time.time()
        date = email.utils.parsedate_to_datetime(r.header("date")).timestamp()
        assert int(before) <= date <= int(after), (before, r.header("date"), after)
        seen.append(date)
        time.sleep(2.2)
    assert seen[1] - seen[0] >= 2
    log = lb.path("logs/t.log")
    wait_for(lambda: log.exists() and log.read_text().count("\n") == 2, 5)
    stamps = [datetime.strptime(t, "%d/%b/%Y:%H:%M:%S %z").timestamp()
              for t in log.read_text().splitlines()]
    assert stamps == seen


def test_proxy_set_header_with_variables(forklb_factory, echo):
    extra = ("proxy_set_header Host $host; "
             "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; "
             'proxy_set_header X-Empty "";')
    lb, port = _start(forklb_factory, [echo.port], extra)
    r = http_request(port, "/", host="www.example.com:8080",
                     headers={"X-Forwarded-For": "10.1.1.1", "X-Empty": "client"})
    h = _headers(r)
    assert h["host"] == ["www.example.com"]
    assert h["x-forwarded-for"] == ["10.1.1.1, 127.0.0.1"]
    assert "x-empty" not in h  # an empty value means "not sent", and it replaces the client's


def test_proxy_pass_uri_part_replaces_location_prefix(forklb_factory, echo):
    lb, port = _start(forklb_factory, [echo.port])
    assert http_request(port, "/a/x?q=1", host="www.example.com").json()["path"] == "/b/x?q=1"
    assert http_request(port, "/a//./x", host="www.example.com").json()["path"] == "/b/x"


def test_request_bodies_are_streamed_both_framings(forklb_factory, echo):
    lb, port = _start(forklb_factory, [echo.port])
    body = b"x" * (3 * 1024 * 1024 + 7)
    r = http_request(port, "/up", method="POST", host="www.example.com", body=body)
    assert r.status == 200 and r.json()["body_len"] == len(body)

    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    raw = (b"POST /up HTTP/1.1\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n" + chunked)
    resp = raw_exchange(port, raw)
    assert resp.startswith(b"HTTP/1.1 200")
    assert b'"body": "hello world"' in resp


def test_large_and_chunked_responses(forklb_factory, echo):
    lb, port = _start(forklb_factory, [echo.port])
    r = http_request(port, "/?__size=5000000", host="www.example.com")
    assert r.status == 200 and len(r.body) == 5_000_000
    r = http_request(port, "/?__chunked=1&__size=100000", host="www.example.com")
    assert r.status == 200 and r.chunked and len(r.body) == 100_000
    r = http_request(port, "/?__size=1000", host="www.example.com", method="HEAD")
    assert r.status == 200 and r.body == b"" and r.header("content-length") == "1000"


def test_upstream_keepalive_connection_is_reused(forklb_factory, echo):
    lb, port = _start(forklb_factory, [echo.port])
    with HttpClient(port, host="www.example.com") as c:
        clients = {tuple(c.get("/").json()["client"]) for _ in range(20)}
    assert len(clients) == 1, clients


def test_one_pooled_connection_carries_every_kind_of_response(forklb_factory, echo):
    """A pooled connection's reader goes on from one reply to the next, and is
    replaced after one llhttp did not see to its end (to a HEAD request, a body
    relayed past the parser): every answer is whole, all over one connection."""
    lb, port = _start(forklb_factory, [echo.port])
    steps = [("GET", "/?__size=10", 10), ("HEAD", "/?__size=1000", 1000),
             ("GET", "/?__size=20", 20), ("GET", "/?__size=300000", 300_000),
             ("GET", "/?__chunked=1&__size=5000", 5000), ("GET", "/?__size=30", 30),
             ("HEAD", "/?__size=40", 40), ("HEAD", "/?__size=50", 50),
             ("GET", "/?__size=60", 60)]
    with HttpClient(port, host="www.example.com") as c:
        first = c.get("/").json()["client"]
        for method, path, size in steps:
            r = c.request(method, path)
            assert r.status == 200, (method, path)
            assert len(r.body) == (0 if method == "HEAD" else size), (method, path)
            if method == "HEAD":
                assert r.header("content-length") == str(size)
        assert c.get("/").json()["client"] == first


def test_refused_upstream_gives_502_and_worker_keeps_serving(forklb_factory):
    dead = free_port()
    lb, port = _start(forklb_factory, [dead])
    workers = lb.worker_pids()
    for _ in range(3):
        r = http_request(port, "/", host="www.example.com")
        assert r.status == 502
        assert b"502 Bad Gateway" in r.body
    assert lb.worker_pids() == workers
    log = lb.error_log()
    assert "connect() failed (111: Connection refused) while connecting to upstream" in log
    assert f'upstream: "http://127.0.0.1:{dead}/"' in log


def test_one_refusing_peer_is_skipped(forklb_factory, echo):
    dead = free_port()
    lb, port = _start(forklb_factory, [dead, echo.port])
    for _ in range(6):
        assert http_request(port, "/", host="www.example.com").status == 200


def test_read_timeout_gives_504(forklb_factory, echo):
    lb, port = _start(forklb_factory, [echo.port])
    r = http_request(port, "/slow/?__delay=3", host="www.example.com", timeout=10)
    assert r.status == 504
    assert "upstream timed out" in lb.error_log()


class _Listener:
    """A bare TCP listener that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


BAD_REQUESTS = {
    "garbage": b"HELLO\r\n\r\n",
    "bad method": b"GE T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "no host on 1.1": b"GET / HTTP/1.1\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "CL and TE": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "two CLs": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "space before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "huge header": b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
    "dot-dot above root": b"GET /../etc/passwd HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_malformed_request_gets_400_and_never_reaches_backend(forklb_factory, name):
    backend = _Listener()
    lb, port = _start(forklb_factory, [backend.port])
    resp = raw_exchange(port, BAD_REQUESTS[name])
    # large_client_header_buffers: 431 for an over-long header line (nginx: 400)
    status = b"431" if name == "huge header" else b"400"
    assert resp.startswith(b"HTTP/1.1 " + status), resp[:200]
    assert b"Connection: close" in resp
    assert not backend.connected()
    # The worker survives and still routes good requests (to a closed backend here: 502).
    backend.sock.close()
    assert http_request(port, "/", host="x").status == 502


def test_resetting_upstream_gives_502_and_worker_keeps_serving(forklb_factory, hangup_factory):
    resetter = hangup_factory(reset=True)
    lb, port = _start(forklb_factory, [resetter.port])
    workers = lb.worker_pids()
    assert http_request(port, "/", host="www.example.com").status == 502
    assert lb.worker_pids() == workers
    assert "while reading response header from upstream" in lb.error_log()


def test_get_is_retried_on_next_peer_but_a_sent_post_is_not(forklb_factory, echo,
                                                            hangup_factory):
    closer = hangup_factory(reset=False)
    lb, port = _start(forklb_factory, [closer.port, echo.port])
    # The closer comes first in the schedule: GET moves on to the echo backend.
    r = http_request(port, "/", host="www.example.com")
    assert r.status == 200 and r.header("x-backend") == "echo1"
    assert closer.requests == 1
    # max_fails=1: the closer is out for fail_timeout in this worker, so restart to
    # put it first again for the POST.
    lb.stop()
    lb, port = _start(forklb_factory, [closer.port, echo.port])
    r = http_request(port, "/", host="www.example.com", method="POST", body=b"")
    assert r.status == 502
    assert closer.requests == 2
    assert "upstream prematurely closed connection" in lb.error_log()
