"""``return`` (redirects, text, 444) and ``client_max_body_size`` (413), end to end."""

from __future__ import annotations

from harness import free_port, http_request, raw_exchange


def _lb(forklb_factory, echo_port: int, server_extra: str = ""):
    port = free_port()
    lb = forklb_factory(f"""
        worker_processes 1;
        events {{ }}
        http {{
            access_log off;
            default_type text/plain;
            client_max_body_size 1k;
            upstream app {{ server 127.0.0.1:{echo_port}; }}
            server {{
                listen 127.0.0.1:{port};
                server_name www.example.com;
                {server_extra}
                location / {{ proxy_pass http://app; }}
                location = /old {{ return 301 /new?from=$uri; }}
                location = /ext {{ return https://example.org/x; }}
                location = /hello {{ return 200 "hello $remote_addr\\n"; }}
                location = /teapot {{ return 418; }}
                location = /drop {{ return 444; }}
                location /big/ {{ proxy_pass http://app; client_max_body_size 8k; }}
                location /any/ {{ proxy_pass http://app; client_max_body_size 0; }}
            }}
        }}""")
    lb.start(wait_ports=[port], workers=1)
    return lb, port


def test_return_redirects_text_codes_and_444(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo")
    lb, port = _lb(forklb_factory, echo.port)
    r = http_request(port, "/old", host="www.example.com")
    assert r.status == 301
    assert r.header("location") == f"http://www.example.com:{port}/new?from=/old"
    r = http_request(port, "/ext", host="www.example.com")
    assert r.status == 302 and r.header("location") == "https://example.org/x"
    r = http_request(port, "/hello", host="www.example.com")
    assert r.status == 200 and r.text == "hello 127.0.0.1\n"
    assert r.header("content-type") == "text/plain"
    r = http_request(port, "/teapot", host="www.example.com")
    # nginx has no page for 418: an empty body without Content-Type
    assert r.status == 418 and r.body == b"" and not r.has_header("content-type")
    assert raw_exchange(port, b"GET /drop HTTP/1.1\r\nHost: a\r\n\r\n", timeout=3) == b""
    assert http_request(port, "/x", host="www.example.com").status == 200  # still proxying


def test_server_level_return_wins_over_locations(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo")
    lb, port = _lb(forklb_factory, echo.port, "return 301 https://www.example.com$request_uri;")
    for path in ("/", "/hello", "/a/b?c=1"):
        r = http_request(port, path, host="www.example.com")
        assert r.status == 301 and r.header("location") == f"https://www.example.com{path}"


def test_client_max_body_size(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo")
    lb, port = _lb(forklb_factory, echo.port)
    ok = http_request(port, "/up", method="POST", host="h", body=b"x" * 1024)
    assert ok.status == 200 and ok.json()["body_len"] == 1024
    r = http_request(port, "/up", method="POST", host="h", body=b"x" * 1025)
    assert r.status == 413
    assert "client intended to send too large body: 1025 bytes" in lb.error_log()
    assert http_request(port, "/big/", method="POST", host="h", body=b"x" * 8000).status == 200
    assert http_request(port, "/any/", method="POST", host="h",
                        body=b"x" * 300_000).status == 200
    # A chunked body that grows past the limit while it streams.
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    raw = (b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunk * 2 + b"0\r\n\r\n")
    assert raw_exchange(port, raw, timeout=5).startswith(b"HTTP/1.1 413")
    assert http_request(port, "/up", host="h").status == 200  # the worker goes on


def test_return_config_errors(forklb_factory):
    lb = forklb_factory("events { }\nhttp { server { location / { return abc; } } }\n")
    r = lb.cli("-t")
    assert r.returncode == 1 and 'invalid return code "abc"' in r.stderr
    lb = forklb_factory("events { }\nhttp { server { location / { return 200 $nope; } } }\n",
                        name="second")
    r = lb.cli("-t")
    assert r.returncode == 1 and 'unknown "nope" variable' in r.stderr


def test_proxy_hide_header_and_proxy_pass_header(forklb_factory, py_backend_factory):
    echo = py_backend_factory("echo", name="echo1")
    port = free_port()
    lb = forklb_factory(f"""
        worker_processes 1;
        events {{ }}
        http {{
            access_log off;
            upstream app {{ server 127.0.0.1:{echo.port}; }}
            server {{
                listen 127.0.0.1:{port};
                location / {{ proxy_pass http://app; }}
                location /hide/ {{ proxy_pass http://app; proxy_hide_header X-Backend; }}
                location /pass/ {{ proxy_pass http://app; proxy_pass_header Server; }}
            }}
        }}""")
    lb.start(wait_ports=[port], workers=1)
    r = http_request(port, "/")
    assert r.header("server") == "forklb" and r.header("x-backend") == "echo1"
    assert len(r.header_list("server")) == 1 and len(r.header_list("date")) == 1
    r = http_request(port, "/hide/")
    assert r.status == 200 and not r.has_header("x-backend")
    r = http_request(port, "/pass/")
    assert r.header("server").startswith("BaseHTTP")  # the backend's own Server header
    assert len(r.header_list("server")) == 1 and r.header("x-backend") == "echo1"


def test_allow_deny_by_address_and_cidr(forklb_factory, py_backend_factory):
    import socket

    echo = py_backend_factory("echo")
    port = free_port()
    lb = forklb_factory(f"""
        worker_processes 1;
        events {{ }}
        http {{
            access_log off;
            deny 127.0.0.9;
            upstream app {{ server 127.0.0.1:{echo.port}; }}
            server {{
                listen 127.0.0.1:{port};
                location / {{ proxy_pass http://app; }}
                location /inner/ {{ proxy_pass http://app; allow 127.0.0.0/30; deny all; }}
            }}
        }}""")
    lb.start(wait_ports=[port], workers=1)

    def status(path: str, source: str) -> int:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        return int(data.split(b" ", 2)[1])

    assert status("/", "127.0.0.1") == 200
    assert status("/", "127.0.0.9") == 403  # http level
    assert status("/inner/", "127.0.0.2") == 200
    assert status("/inner/", "127.0.0.9") == 403  # the location's own list
    assert status("/inner/", "127.0.0.5") == 403  # outside 127.0.0.0/30: deny all
    assert "access forbidden by rule, client: 127.0.0.9" in lb.error_log()


def test_keepalive_requests_and_client_timeouts(forklb_factory, py_backend_factory):
    import socket
    import time

    from harness import HttpClient

    echo = py_backend_factory("echo")
    port = free_port()
    lb = forklb_factory(f"""
        worker_processes 1;
        events {{ }}
        http {{
            access_log off;
            keepalive_requests 3;
            client_header_timeout 1s;
            client_body_timeout 1s;
            upstream app {{ server 127.0.0.1:{echo.port}; }}
            server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://app; }} }}
        }}""")
    lb.start(wait_ports=[port], workers=1)

    with HttpClient(port) as client:
        answers = [client.get("/").header("connection") for _ in range(3)]
        assert answers == ["keep-alive", "keep-alive", "close"]
        assert client.server_closed(timeout=2)

    # A header trickled one byte every 0.3 s: the 1 s deadline is not extended, and
    # the connection is closed (as nginx does) although bytes keep coming.
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(0.05)
    t0 = time.monotonic()
    closed_at = None
    for byte in b"GET / HTTP/1.1\r\nHost: slow\r\nX-Long: " + b"a" * 30:
        try:
            sock.sendall(bytes([byte]))
            time.sleep(0.3)
            if sock.recv(65536) == b"":
                closed_at = time.monotonic() - t0
                break
        except TimeoutError:
            continue
        except OSError:
            closed_at = time.monotonic() - t0
            break
    sock.close()
    assert closed_at is not None and 0.9 < closed_at < 2.0, closed_at

    # A body that stops arriving: the connection is closed after the idle timeout.
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
    t0 = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()
    assert 0.8 < time.monotonic() - t0 < 3.0
