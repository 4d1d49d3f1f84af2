"""access_log's buffer=, flush=, gzip and if= parameters, on a real forklb.

The written file is what is checked: when lines reach it (a buffer without
flush= is written only when full, on reopen and at exit, as nginx's), and what
they hold (a gzip log is gzip members that ``gzip.decompress`` reads at any
time, as ``zcat`` does).
"""

from __future__ import annotations

import gzip
import time

from harness import free_port, http_request, raw_exchange, wait_for


def _start(forklb_factory, access_log: str, log_format: str = "$request_uri"):
    """forklb answering 200 at / with ``access_log``; its format ``f`` is ``log_format``."""
    port = free_port()
    lb = forklb_factory(f"""
worker_processes 1;
events {{ }}
http {{
    log_format f '{log_format}';
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; {access_log} }}
    }}
}}
""")
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def _get(port: int, *paths: str) -> None:
    for path in paths:
        assert http_request(port, path).status == 200


def test_gzip_log_is_readable_gzip_members(forklb_factory):
    lb, port = _start(forklb_factory, "access_log logs/a.log.gz f gzip=6 flush=200ms;")
    log = lb.path("logs/a.log.gz")
    _get(port, "/one", "/two")
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 5)
    time.sleep(0.5)  # the next flush would start a second member
    _get(port, "/three")
    wait_for(lambda: gzip.decompress(log.read_bytes()).count(b"\n") == 3, 5)
    data = log.read_bytes()
    assert data[:2] == b"\x1f\x8b"  # gzip, not text
    assert data.count(b"\x1f\x8b\x08") >= 2  # a member per write
    assert gzip.decompress(data) == b"/one\n/two\n/three\n"


def test_buffer_without_flush_waits_until_reopen(forklb_factory):
    """nginx writes a buffer= log only when the buffer is full, on reopen and at
    exit: no timer (forklb's default buffering has one, every second)."""
    lb, port = _start(forklb_factory, "access_log logs/a.log f buffer=64k;")
    log = lb.path("logs/a.log")
    _get(port, "/held")
    time.sleep(2.5)
    assert log.read_bytes() == b""
    assert lb.cli("-s", "reopen").returncode == 0
    wait_for(lambda: log.read_bytes() == b"/held\n", 5)


def test_small_buffer_is_written_when_the_next_line_would_not_fit(forklb_factory):
    # lines "/0000000001\n" are 12 bytes: a 30-byte buffer holds two
    lb, port = _start(forklb_factory, "access_log logs/a.log f buffer=30;")
    log = lb.path("logs/a.log")
    _get(port, *(f"/{i:010d}" for i in range(1, 6)))
    wait_for(lambda: log.read_bytes().count(b"\n") == 4, 5)
    assert log.read_bytes() == b"".join(f"/{i:010d}\n".encode() for i in range(1, 5))
    lb.stop()
    assert log.read_bytes().count(b"\n") == 5  # the last line, at exit


def test_condition_keeps_requests_out(forklb_factory):
    lb, port = _start(forklb_factory, "access_log logs/a.log f if=$arg_log;")
    log = lb.path("logs/a.log")
    _get(port, "/a?log=1", "/b", "/c?log=0", "/d?log=", "/e?log=yes")
    wait_for(lambda: log.read_bytes().count(b"\n") == 2, 5)
    time.sleep(1.2)  # a second flush adds nothing
    assert log.read_bytes() == b"/a?log=1\n/e?log=yes\n"


def test_absolute_form_request_is_logged_as_received(forklb_factory):
    """$request is the request line the client sent (nginx's r->request_line),
    $request_uri the path forklb goes on with."""
    lb, port = _start(forklb_factory, "access_log logs/a.log f;",
                      log_format="$request|$request_uri|$host")
    reply = raw_exchange(port, b"GET http://Example.org:8080/x?a=1 HTTP/1.1\r\nHost: other\r\n"
                               b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    log = lb.path("logs/a.log")
    wait_for(lambda: log.read_bytes() != b"", 5)
    assert log.read_bytes() == b"GET http://Example.org:8080/x?a=1 HTTP/1.1|/x?a=1|example.org\n"
