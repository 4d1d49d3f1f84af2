"""proxy_http_version: 1.1 with upstream keep-alive (default), 1.0 with Connection: close."""

from __future__ import annotations

from harness import HttpClient, free_port, http_request, proxy_conf, raw_exchange


def _start(forklb_factory, backend, directives=""):
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, error_log=None,
                                   location=directives))
    lb.start(wait_ports=[port], workers=1)
    return port


def _upstream_headers(resp) -> dict[str, str]:
    return {name.lower(): value for name, value in resp.json()["headers"]}


def test_default_is_http_1_1_on_a_kept_connection(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo")
    port = _start(forklb_factory, echo)
    with HttpClient(port) as c:
        first, second = c.get("/"), c.get("/")
    assert first.json()["version"] == "HTTP/1.1"
    assert "connection" not in _upstream_headers(first)
    assert first.json()["client"] == second.json()["client"]  # same upstream connection


def test_1_0_sends_http_1_0_and_closes(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo")
    port = _start(forklb_factory, echo, "proxy_http_version 1.0;")
    with HttpClient(port) as c:
        first, second = c.get("/"), c.get("/")  # the client side stays keep-alive
    assert first.json()["version"] == "HTTP/1.0"
    assert _upstream_headers(first)["connection"] == "close"
    assert first.json()["client"] != second.json()["client"]  # a new connection each time
    r = http_request(port, "/", method="POST", body=b"abc")
    assert (r.status, r.json()["body"]) == (200, "abc")  # Content-Length bodies pass


def test_1_0_refuses_chunked_bodies_with_411(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo")
    port = _start(forklb_factory, echo, "proxy_http_version 1.0;")
    reply = raw_exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                               b"\r\n3\r\nabc\r\n0\r\n\r\n", timeout=10)
    assert reply.startswith(b"HTTP/1.1 411 "), reply
    # with 1.1 the same request streams through, re-chunked
    port11 = _start(forklb_factory, echo)
    reply = raw_exchange(port11, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n", timeout=10)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert b'"body": "abc"' in reply
