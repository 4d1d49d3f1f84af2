"""proxy_next_upstream, _tries and _timeout end to end, compared with Debian's nginx.

Backends are real processes (tests/backend_server.py) answering a fixed status and
body. ``server A max_fails=0; server B backup;`` makes every request try A first
and B only as the next upstream, so each outcome is deterministic. The access log
(``$upstream_addr``, ``$upstream_status``) shows which peers a request tried.
"""

from __future__ import annotations

import socket
import time

import pytest
from harness import SocketBackend, free_port, http_request, proxy_block, wait_for

FORKLB = """
worker_processes 1;
error_log logs/error.log warn;
events {{ }}
http {{
    log_format up '$status "$upstream_addr" "$upstream_status"';
    access_log logs/up.log up;
{block}
}}
"""


def _servers(*entries: str) -> str:
    return " ".join(f"server {e};" for e in entries)


def _forklb(forklb_factory, servers: str, directives: str):
    port = free_port()
    block = proxy_block(port=port, servers=servers, directives=directives)
    lb = forklb_factory(FORKLB.format(block=block))
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def _nginx(nginx_backend_factory, servers: str, directives: str, log=None) -> int:
    """Debian's nginx as the balancer, with the same upstream and location (and the
    same access log format, written to ``log``, a path)."""
    port = free_port()
    fmt = ""
    if log is not None:
        fmt = "log_format up '$status \"$upstream_addr\" \"$upstream_status\"';"
        directives += f" access_log {log} up;"
    nginx_backend_factory("unused", extra_servers=fmt + proxy_block(
        port=port, servers=servers, directives=directives))
    return port


def _log_lines(lb, count: int) -> list[str]:
    """The first ``count`` lines of forklb's access log (flushed every second)."""
    return _file_lines(lb.path("logs/up.log"), count)


def _file_lines(path, count: int) -> list[str]:
    """The first ``count`` lines of an access log, waiting for them: a proxy writes
    the line after the response went out, so the client can be first."""
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= count, 10,
             message=lambda: f"access log: {path.read_text() if path.exists() else '-'}")
    return path.read_text().splitlines()[:count]


def _outcome(port: int, method: str = "GET") -> tuple[int, str]:
    r = http_request(port, "/", method=method)
    return r.status, r.text.strip()


@pytest.fixture
def named(py_backend_factory):
    """``named(name, status)`` -> a started backend answering ``status`` with body ``name``."""
    return lambda name, status=200: py_backend_factory("name", name=name, status=status)


def test_503_goes_to_next_when_listed_same_as_nginx(forklb_factory, nginx_backend_factory,
                                                    named):
    a, b = named("a", 503), named("b")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{b.port} backup")
    listed = "proxy_next_upstream error timeout http_503;"
    lb, port = _forklb(forklb_factory, servers, listed)
    assert [_outcome(port) for _ in range(3)] == [(200, "b")] * 3
    ngx = _nginx(nginx_backend_factory, servers, listed)
    assert _outcome(ngx) == (200, "b")
    line = _log_lines(lb, 1)[0]
    assert line == f'200 "127.0.0.1:{a.port}, 127.0.0.1:{b.port}" "503, 200"'


def test_503_passed_through_when_not_listed(forklb_factory, nginx_backend_factory, named):
    a, b = named("a", 503), named("b")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{b.port} backup")
    lb, port = _forklb(forklb_factory, servers, "")
    assert _outcome(port) == (503, "a")
    assert _outcome(_nginx(nginx_backend_factory, servers, "")) == (503, "a")


def test_last_try_passes_the_upstream_response_with_its_body(forklb_factory,
                                                             nginx_backend_factory, named):
    a, b = named("a-down", 503), named("b-down", 503)
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{b.port} backup")
    listed = "proxy_next_upstream http_503;"
    lb, port = _forklb(forklb_factory, servers, listed)
    r = http_request(port, "/")
    assert (r.status, r.text, r.header("x-backend")) == (503, "b-down\n", "b-down")
    assert _outcome(_nginx(nginx_backend_factory, servers, listed)) == (503, "b-down")
    assert _log_lines(lb, 1)[0].endswith('"503, 503"')


def test_tries_limit(forklb_factory, nginx_backend_factory, named, tmp_path):
    backends = [named(f"s{i}", 503) for i in range(4)]
    servers = _servers(*(f"127.0.0.1:{b.port} max_fails=0" for b in backends))
    listed = "proxy_next_upstream http_503; proxy_next_upstream_tries 2;"
    lb, port = _forklb(forklb_factory, servers, listed)
    assert _outcome(port)[0] == 503
    assert _log_lines(lb, 1)[0].endswith('"503, 503"')  # two tries, not four
    nginx_log = tmp_path / "nginx-up.log"
    assert _outcome(_nginx(nginx_backend_factory, servers, listed, log=nginx_log))[0] == 503
    assert _file_lines(nginx_log, 1)[0].endswith('"503, 503"')


def test_without_tries_limit_every_peer_once(forklb_factory, named):
    backends = [named(f"s{i}", 503) for i in range(3)]
    servers = _servers(*(f"127.0.0.1:{b.port} max_fails=0" for b in backends))
    lb, port = _forklb(forklb_factory, servers, "proxy_next_upstream http_503;")
    assert _outcome(port)[0] == 503
    line = _log_lines(lb, 1)[0]
    assert line.endswith('"503, 503, 503"')
    assert sorted(line.split('"')[1].split(", ")) == sorted(f"127.0.0.1:{b.port}"
                                                              for b in backends)


def test_timeout_limit_from_the_first_attempt(forklb_factory, nginx_backend_factory, named,
                                              tmp_path):
    """Each peer answers 503 after 1 s; with a 1.5 s limit the second answer is the last."""
    backends = [named(f"s{i}", 503) for i in range(4)]
    servers = _servers(*(f"127.0.0.1:{b.port} max_fails=0" for b in backends))
    listed = "proxy_next_upstream http_503; proxy_next_upstream_timeout 1500ms;"
    lb, port = _forklb(forklb_factory, servers, listed)
    r = http_request(port, "/?__delay=1", timeout=30)
    assert r.status == 503
    assert _log_lines(lb, 1)[0].endswith('"503, 503"')
    nginx_log = tmp_path / "nginx-up.log"
    ngx = _nginx(nginx_backend_factory, servers, listed, log=nginx_log)
    assert http_request(ngx, "/?__delay=1", timeout=30).status == 503
    assert _file_lines(nginx_log, 1)[0].endswith('"503, 503"')


@pytest.mark.parametrize("listed, expected", [
    ("proxy_next_upstream http_503;", (503, "a")),
    ("proxy_next_upstream http_503 non_idempotent;", (200, "b")),
])
def test_post_retried_only_with_non_idempotent(forklb_factory, nginx_backend_factory, named,
                                               listed, expected):
    a, b = named("a", 503), named("b")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{b.port} backup")
    lb, port = _forklb(forklb_factory, servers, listed)
    assert _outcome(port, "POST") == expected
    assert _outcome(port, "GET") == (200, "b")  # GET is retried either way
    assert _outcome(_nginx(nginx_backend_factory, servers, listed), "POST") == expected


def test_refused_post_is_retried_and_error_must_be_listed(forklb_factory, named):
    dead = free_port()  # nothing listens: connect() is refused, nothing was sent
    b = named("b")
    servers = _servers(f"127.0.0.1:{dead} max_fails=0", f"127.0.0.1:{b.port} backup")
    lb, port = _forklb(forklb_factory, servers, "")
    assert _outcome(port, "POST") == (200, "b")
    lb2, port2 = _forklb(forklb_factory, servers, "proxy_next_upstream http_503;")
    assert _outcome(port2, "GET")[0] == 502  # error not listed: not retried


@pytest.mark.parametrize("listed, expected", [
    ("", (404, "a")),
    ("proxy_next_upstream http_404;", (200, "b")),
])
def test_404_retried_only_when_listed(forklb_factory, nginx_backend_factory, named, listed,
                                      expected):
    a, b = named("a", 404), named("b")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{b.port} backup")
    lb, port = _forklb(forklb_factory, servers, listed)
    assert _outcome(port) == expected
    assert _outcome(_nginx(nginx_backend_factory, servers, listed)) == expected


@pytest.mark.parametrize("status, counted", [(503, True), (429, True), (404, False)])
def test_max_fails_counts_5xx_and_429_not_404(forklb_factory, nginx_backend_factory, named,
                                              tmp_path, status, counted):
    """After a retried 503/429, A is out for fail_timeout; after a retried 404 it is not."""
    a, b = named("a", status), named("b")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=1 fail_timeout=60s",
                       f"127.0.0.1:{b.port} backup")
    listed = f"proxy_next_upstream http_{status};"
    lb, port = _forklb(forklb_factory, servers, listed)
    nginx_log = tmp_path / "nginx-up.log"
    ngx = _nginx(nginx_backend_factory, servers, listed, log=nginx_log)
    for balancer_port in (port, ngx):
        assert _outcome(balancer_port) == (200, "b")
        assert _outcome(balancer_port) == (200, "b")
    second = _log_lines(lb, 2)[1]
    tried_a = f"127.0.0.1:{a.port}" in second
    assert tried_a is not counted, second
    assert _file_lines(nginx_log, 2)[1] == second  # nginx: the same peers tried


def test_post_body_that_came_with_the_head_is_sent_again(forklb_factory, nginx_backend_factory,
                                                         named, py_backend_factory):
    """A small body arrives with the request head: forklb keeps it and can replay it, as
    nginx replays its buffered bodies."""
    a, echo = named("a", 503), py_backend_factory("echo", name="echo")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{echo.port} backup")
    listed = "proxy_next_upstream http_503 non_idempotent;"
    lb, port = _forklb(forklb_factory, servers, listed)
    for balancer_port in (port, _nginx(nginx_backend_factory, servers, listed)):
        r = http_request(balancer_port, "/", method="POST", body=b"payload=1")
        assert r.status == 200
        assert (r.json()["backend"], r.json()["body"]) == ("echo", "payload=1")


class GarbageBackend(SocketBackend):
    """Reads a request and answers a response head with a malformed header line."""

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(5)
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad\x01Header\r\n\r\nok")
        except OSError:
            pass


class BigHeadBackend(SocketBackend):
    """Answers with a response head that never ends: 200 KiB of header lines."""

    threaded = True

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(5)
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for i in range(200):
                conn.sendall(b"X-Filler-%03d: %s\r\n" % (i, b"f" * 1000))
        except OSError:
            pass


# An invalid response head: its backend, and forklb's error log message
BAD_HEADS = {
    "malformed line": (GarbageBackend, "upstream sent invalid header"),
    # over 64 KiB (nginx: over proxy_buffer_size), not collected without bound
    "endless": (BigHeadBackend,
                "upstream sent too big header while reading response header from upstream"),
}


@pytest.mark.parametrize("head", sorted(BAD_HEADS))
@pytest.mark.parametrize("listed, expected", [
    ("", (502, None)),
    ("proxy_next_upstream invalid_header;", (200, "b")),
])
def test_invalid_header_retried_only_when_listed(forklb_factory, nginx_backend_factory,
                                                 named, head, listed, expected):
    backend, message = BAD_HEADS[head]
    bad, b = backend(), named("b")
    try:
        servers = _servers(f"127.0.0.1:{bad.port} max_fails=0", f"127.0.0.1:{b.port} backup")
        lb, port = _forklb(forklb_factory, servers, listed)
        status, body = _outcome(port)
        assert status == expected[0]
        if expected[1]:
            assert body == expected[1]
        assert message in lb.error_log()
        assert _outcome(_nginx(nginx_backend_factory, servers, listed))[0] == expected[0]
    finally:
        bad.stop()


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Smuggled: 1\r\n\r\nEVIL!"
BIG = 128 * 1024  # over splice.MIN_BODY: relayed without the parser
PAST_THE_END = {
    # (the reply, the bytes after it, sent with it or 0.2 s later, its body, the warning)
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", SMUGGLED, 0, "ok",
               'upstream sent more data than specified in "Content-Length" header'),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                SMUGGLED, 0, "ok", "upstream sent data after final chunk"),
    "large": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"b" * BIG, SMUGGLED,
              0, "b" * BIG, 'upstream sent more data than specified in "Content-Length" header'),
    "while idle": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", SMUGGLED, 0.2, "ok", None),
}


class PastTheEndBackend(SocketBackend):
    """Answers every request with a reply followed by bytes it was not asked for."""

    threaded = True

    def __init__(self, mode: str) -> None:
        self.reply, self.extra, self.later = PAST_THE_END[mode][:3]
        super().__init__()

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(5)
        try:
            while conn.recv(65536):
                if self.later:
                    conn.sendall(self.reply)
                    time.sleep(self.later)
                    conn.sendall(self.extra)
                else:
                    conn.sendall(self.reply + self.extra)
        except OSError:
            pass


@pytest.mark.parametrize("mode", sorted(PAST_THE_END))
def test_bytes_after_a_response_are_never_served(forklb_factory, nginx_backend_factory, mode):
    """What an upstream sends past the end of a response (a second reply smuggled
    behind it, at once or while the connection is idle in the pool) reaches no client:
    the connection is not reused, and nginx's warning is logged, as nginx does."""
    backend = PastTheEndBackend(mode)
    body, warning = PAST_THE_END[mode][3:]
    try:
        servers = _servers(f"127.0.0.1:{backend.port}")
        lb, port = _forklb(forklb_factory, servers, "")
        for balancer in (port, _nginx(nginx_backend_factory, servers, "")):
            for _ in range(3):
                r = http_request(balancer, "/", timeout=10)
                assert (r.status, r.text, r.header("X-Smuggled")) == (200, body, None)
                time.sleep(0.3)  # "while idle": the extra bytes arrive in the pool
        if warning:
            assert f"{warning} while reading upstream" in lb.error_log()
    finally:
        backend.stop()


@pytest.mark.parametrize("listed, statuses", [
    ("", '"504, 504"'),  # default error timeout: the backup is tried too
    ("proxy_next_upstream error;", '"504"'),
])
def test_timeout_retried_only_when_listed(forklb_factory, named, listed, statuses):
    a, b = named("a"), named("b")
    servers = _servers(f"127.0.0.1:{a.port} max_fails=0", f"127.0.0.1:{b.port} backup")
    lb, port = _forklb(forklb_factory, servers, listed + " proxy_read_timeout 1s;")
    assert http_request(port, "/?__delay=3", timeout=30).status == 504
    assert _log_lines(lb, 1)[0].endswith(statuses)
