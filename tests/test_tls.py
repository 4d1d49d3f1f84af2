"""TLS termination: ``listen ... ssl`` and the ``ssl_*`` directives.

Unit tests load configs from ``tmp_path`` (messages compared by hand with
``nginx -t`` of Debian's nginx 1.22 where marked).  End-to-end tests run real
forklb workers with throwaway certificates made by the ``openssl`` CLI, and
talk to them with Python's ``ssl`` and with ``curl -k``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from harness import HttpClient, _Reader, free_port, raw_exchange, wait_for

from forklb.config import ConfigError, load
from forklb.http import tls as tls_mod
from forklb.model import Listen, Tls

# -- certificates ---------------------------------------------------------------


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC certificate for ``name`` (CN and subjectAltName)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl CLI is needed (apt-get install openssl)"
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: make_cert(directory, name) for name in ("a.test", "b.test")}


# -- unit: directives and loading -------------------------------------------------


def load_text(tmp_path: Path, text: str):
    (tmp_path / "nginx.conf").write_text(text)
    return load("nginx.conf", prefix=str(tmp_path))


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


def conf(servers: str, http_extra: str = "") -> str:
    return "events {}\nhttp {\n" + http_extra + "\n" + servers + "\n}\n"


@pytest.fixture
def local_certs(tmp_path: Path, certs) -> tuple[str, str]:
    """a.test's certificate and key copied next to the config, as relative names."""
    for src in certs["a.test"]:
        shutil.copy(src, tmp_path / src.name)
    return "a.test.crt", "a.test.key"


def test_listen_ssl_with_default_server_and_defaults(tmp_path, local_certs) -> None:
    cert, key = local_certs
    config = load_text(tmp_path, conf(
        "server { listen 127.0.0.1:443 ssl default_server backlog=9; listen 8080; }",
        f"ssl_certificate {cert}; ssl_certificate_key {key};"))
    server = config.http.servers[0]
    assert server.listens == (Listen("127.0.0.1", 443, True, 9, True),
                              Listen("0.0.0.0", 8080, False, 511, False))
    assert config.ssl_addresses() == {("127.0.0.1", 443)}
    # Relative names resolve against the config's directory (nginx's conf prefix).
    assert server.tls == Tls(((str(tmp_path / cert), str(tmp_path / key)),),
                             ("TLSv1.2", "TLSv1.3"), "HIGH:!aNULL:!MD5", False)


def test_ssl_settings_inherit_and_override(tmp_path, local_certs) -> None:
    cert, key = local_certs
    config = load_text(tmp_path, conf(
        "server { listen 443 ssl; server_name a; }\n"
        "server { listen 443 ssl; server_name b; ssl_protocols TLSv1.3 TLSv1.2 TLSv1.3;\n"
        " ssl_ciphers ECDHE+AESGCM; ssl_prefer_server_ciphers on; }",
        f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1 TLSv1.2;"))
    a, b = config.http.servers
    assert a.tls.protocols == ("TLSv1", "TLSv1.2")
    assert (b.tls.protocols, b.tls.ciphers, b.tls.prefer_server_ciphers) == (
        ("TLSv1.2", "TLSv1.3"), "ECDHE+AESGCM", True)
    assert a.tls.certificates == b.tls.certificates


def test_no_certificate_for_ssl_listen_names_the_server(tmp_path) -> None:
    # nginx -t: no "ssl_certificate" is defined for the "listen ... ssl" directive in F:L
    text = conf("server {\n listen 80;\n}\nserver {\n listen 443 ssl;\n}")
    err = load_error(tmp_path, text)
    assert str(err) == ('no "ssl_certificate" is defined for the "listen ... ssl" directive '
                        "in nginx.conf:7")


def test_ssl_on_any_listen_makes_the_address_ssl(tmp_path, local_certs) -> None:
    # nginx -t: the first (default) server has no certificate, the second says "ssl"
    cert, key = local_certs
    text = conf(f"server {{ listen 443; }}\nserver {{ listen 443 ssl; ssl_certificate {cert}; "
                f"ssl_certificate_key {key}; }}")
    err = load_error(tmp_path, text)
    assert (err.message, err.line) == (
        'no "ssl_certificate" is defined for the "listen ... ssl" directive', 4)


def test_only_the_default_server_needs_a_certificate(tmp_path, local_certs) -> None:
    cert, key = local_certs
    config = load_text(tmp_path, conf(
        f"server {{ listen 443 ssl; ssl_certificate {cert}; ssl_certificate_key {key}; }}\n"
        "server { listen 443; server_name other; }"))
    assert config.http.servers[1].tls is None


@pytest.mark.parametrize(
    ("directives", "message"),
    [
        ("ssl_certificate {cert};", 'no "ssl_certificate_key" is defined for certificate '
                                    '"{cert}"'),
        ("ssl_certificate /nonexistent.pem; ssl_certificate_key {key};",
         'cannot load certificate "/nonexistent.pem": BIO_new_file() failed '
         "(2: No such file or directory)"),
        ("ssl_certificate {cert}; ssl_certificate_key /nonexistent.key;",
         'cannot load certificate key "/nonexistent.key": BIO_new_file() failed '
         "(2: No such file or directory)"),
        ("ssl_certificate {key}; ssl_certificate_key {key};",
         'cannot load certificate "{dir}/{key}": PEM_read_bio_X509_AUX() failed (SSL: '),
        ("ssl_certificate {cert}; ssl_certificate_key {cert};",
         'cannot load certificate key "{dir}/{cert}": PEM_read_bio_PrivateKey() failed (SSL: '),
        ("ssl_certificate {cert}; ssl_certificate_key {key}; ssl_ciphers FOO;",
         'SSL_CTX_set_cipher_list("FOO") failed (SSL: '),
        ("ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.4;",
         'invalid value "TLSv1.4"'),
        ("ssl_certificate {cert}; ssl_certificate_key {key}; ssl_prefer_server_ciphers maybe;",
         'invalid value "maybe" in "ssl_prefer_server_ciphers" directive, it must be "on" or '
         '"off"'),
    ],
)
def test_ssl_directive_errors(tmp_path, local_certs, directives: str, message: str) -> None:
    cert, key = local_certs
    body = directives.format(cert=cert, key=key).replace("; ", ";\n")
    text = conf("server {\nlisten 443 ssl;\n" + body + "\n}")
    err = load_error(tmp_path, text)
    expected = message.format(cert=cert, key=key, dir=tmp_path)
    assert err.message.startswith(expected), err.message
    # Every message points at the directive it is about (nginx gives no line for
    # the merge-time ones; forklb does).
    word = next(w for w in ("ciphers", "protocols", "prefer", "_key /", "_key " + cert,
                            "certificate /", "certificate " + key, "certificate " + cert)
                if w in body)
    assert err.line == next(i for i, line in enumerate(text.splitlines(), 1) if word in line)


def test_mismatched_key_is_refused(tmp_path, certs) -> None:
    (cert, _), (_, other_key) = certs["a.test"], certs["b.test"]
    err = load_error(tmp_path, conf(f"server {{ listen 443 ssl; ssl_certificate {cert}; "
                                    f"ssl_certificate_key {other_key}; }}"))
    assert err.message.startswith(f'SSL_CTX_use_PrivateKey("{other_key}") failed (SSL: ')


def test_bad_certificate_fails_even_without_ssl_listen(tmp_path) -> None:
    # nginx loads every configured certificate, used or not.
    err = load_error(tmp_path, conf("server { listen 80; }",
                                    "ssl_certificate /no/c.pem; ssl_certificate_key /no/k.pem;"))
    assert err.message.startswith('cannot load certificate "/no/c.pem"')


@pytest.mark.parametrize("place", ["location / { ssl_certificate c.pem; }", "upstream u { "
                                   "server 127.0.0.1; ssl_protocols TLSv1.2; }"])
def test_ssl_directives_not_allowed_elsewhere(tmp_path, place: str) -> None:
    text = conf("server { listen 80; " + place + " }" if place.startswith("loc") else place)
    assert load_error(tmp_path, text).message.endswith('directive is not allowed here')


def test_sidecar_listen_refuses_ssl(tmp_path) -> None:
    err = load_error(tmp_path, "events {}\nsidecar {\nlisten 127.0.0.1:9999 ssl;\n}\n")
    assert (err.message, err.line) == ('the sidecar does not support the "ssl" parameter', 3)


@pytest.mark.parametrize(
    ("protocols", "low", "high", "off"),
    [
        (("TLSv1.3",), ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3, 0),
        (("TLSv1.2", "TLSv1.3"), ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, 0),
        (("TLSv1", "TLSv1.2"), ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_2, ssl.OP_NO_TLSv1_1),
    ],
)
def test_build_context_protocols(certs, protocols, low, high, off) -> None:
    cert, key = certs["a.test"]
    ctx = tls_mod.build_context(Tls(((str(cert), str(key)),), protocols))
    assert (ctx.minimum_version, ctx.maximum_version) == (low, high)
    assert ctx.options & ssl.OP_NO_TLSv1_1 == off


# -- end to end -----------------------------------------------------------------

E2E = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    client_header_timeout {header_timeout};
    ssl_certificate {a_cert};
    ssl_certificate_key {a_key};
    {http_extra}
    upstream app {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        listen 127.0.0.1:{plain};
        server_name a.test;
        {a_extra}
        location / {{
            proxy_pass http://app;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Https $https;
        }}
        location = /redirect {{ return 302 /elsewhere; }}
        location = /vars {{ return 200 "$ssl_protocol|$ssl_server_name|$ssl_cipher|$https\n"; }}
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name b.test;
        ssl_certificate {b_cert};
        ssl_certificate_key {b_key};
        location / {{ return 200 "b $scheme\\n"; }}
    }}
}}
"""


def start_lb(forklb_factory, py_backend_factory, certs, header_timeout="60s", http_extra="",
             a_extra=""):
    backend = py_backend_factory("echo", name="echo1")
    port, plain = free_port(), free_port()
    (a_cert, a_key), (b_cert, b_key) = certs["a.test"], certs["b.test"]
    lb = forklb_factory(E2E.format(
        header_timeout=header_timeout, a_cert=a_cert, a_key=a_key, b_cert=b_cert, b_key=b_key,
        http_extra=http_extra, a_extra=a_extra, backend=backend.port, port=port, plain=plain))
    lb.start(wait_ports=[port, plain], workers=1)
    return lb, port, plain


def client_context(certs, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """Trusts the two throwaway certificates (so the peer's subject is readable)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    for cert, _key in certs.values():
        ctx.load_verify_locations(cafile=str(cert))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class TlsClient(HttpClient):
    """The harness's keep-alive client over one TLS connection."""

    def __init__(self, port: int, ctx: ssl.SSLContext, host: str = "a.test",
                 sni: str | None = None, timeout: float = 10.0) -> None:
        self.port = port
        self.host = host
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=sni)
        self._reader = _Reader(self.sock)

    def peer_cn(self) -> str:
        subject = dict(pair[0] for pair in self.sock.getpeercert()["subject"])
        return subject["commonName"]


def echoed(resp) -> dict[str, str]:
    return {name.lower(): value for name, value in resp.json()["headers"]}


def test_get_post_and_keepalive_over_tls(forklb_factory, py_backend_factory, certs) -> None:
    lb, port, plain = start_lb(forklb_factory, py_backend_factory, certs)
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        first = c.get("/x?y=1")
        assert first.status == 200, first
        assert c.peer_cn() == "a.test"
        h = echoed(first)
        assert (h["x-forwarded-proto"], h["x-https"], h["host"]) == ("https", "on", "a.test")
        body = os.urandom(300_000)
        r = c.request("POST", "/upload", body=body)
        assert r.status == 200 and r.json()["body_len"] == len(body)
        for i in range(5):  # several requests on the one TLS connection
            r = c.get(f"/k{i}")
            assert r.status == 200 and r.json()["path"] == f"/k{i}"
            assert r.header("connection") != "close"
        r = c.get("/redirect")
        assert r.header("location") == f"https://a.test:{port}/elsewhere"
    # The same server on a plain address: $scheme is http there, $https empty.
    with HttpClient(plain, host="a.test") as c:
        h = echoed(c.get("/"))
        assert (h["x-forwarded-proto"], h.get("x-https")) == ("http", None)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("curl")
    assert exe, "curl is needed (apt-get install curl)"
    return subprocess.run([exe, "-sS", "-k", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=30)


def test_curl_get_and_post(forklb_factory, py_backend_factory, certs, tmp_path) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    url = f"https://127.0.0.1:{port}/c"
    r = curl("-H", "Host: a.test", url)
    assert r.returncode == 0, r.stderr
    assert echoed_json(r.stdout)["x-forwarded-proto"] == "https"
    data = tmp_path / "body.bin"
    data.write_bytes(b"z" * 70_000)
    r = curl("-H", "Host: a.test", "--data-binary", f"@{data}", url)
    assert r.returncode == 0, r.stderr
    assert '"body_len": 70000' in r.stdout and '"method": "POST"' in r.stdout
    # Two URLs on one curl command: the connection is reused.
    r = curl("-v", "-H", "Host: a.test", url, url)
    assert r.returncode == 0 and "Re-using existing connection" in r.stderr, r.stderr


def echoed_json(text: str) -> dict[str, str]:
    import json

    return {name.lower(): value for name, value in json.loads(text)["headers"]}


def test_sni_picks_the_servers_certificate(forklb_factory, py_backend_factory, certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    ctx = client_context(certs)
    with TlsClient(port, ctx, host="b.test", sni="b.test") as c:
        assert c.peer_cn() == "b.test"
        assert c.get("/").text == "b https\n"
    with TlsClient(port, ctx, host="a.test", sni="a.test") as c:
        assert c.peer_cn() == "a.test"
        assert c.get("/").status == 200
    # No SNI, or a name no server has: the default server's certificate.
    for sni in (None, "unknown.test"):
        with TlsClient(port, ctx, host="b.test", sni=sni) as c:
            assert c.peer_cn() == "a.test"
            assert c.get("/").text == "b https\n"  # Host still routes the request
    r = curl("-v", "--resolve", f"b.test:{port}:127.0.0.1", f"https://b.test:{port}/")
    assert r.returncode == 0 and r.stdout == "b https\n", r.stderr
    assert "CN=b.test" in r.stderr


def test_tls13_only_refuses_a_tls12_client(forklb_factory, py_backend_factory, certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs,
                                http_extra="ssl_protocols TLSv1.3;")
    with pytest.raises(ssl.SSLError):
        TlsClient(port, client_context(certs, ssl.TLSVersion.TLSv1_2), sni="a.test")
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.sock.version() == "TLSv1.3"
        assert c.get("/").status == 200
    r = curl("--tls-max", "1.2", f"https://127.0.0.1:{port}/")
    assert r.returncode == 35, (r.returncode, r.stderr)  # CURLE_SSL_CONNECT_ERROR


def test_default_protocols_refuse_tls11(forklb_factory, py_backend_factory, certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.sock.version() == "TLSv1.3"
    ctx = client_context(certs, ssl.TLSVersion.TLSv1_2)
    with TlsClient(port, ctx, sni="a.test") as c:
        assert c.sock.version() == "TLSv1.2"
        assert c.get("/").status == 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is, on purpose
        ctx = client_context(certs, ssl.TLSVersion.TLSv1_1)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.raises(ssl.SSLError):
        TlsClient(port, ctx, sni="a.test")


def test_plain_http_on_the_ssl_port_gets_nginx_400(forklb_factory, py_backend_factory,
                                                      certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    out = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", timeout=10)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), out
    assert b"Connection: close" in head
    assert b"<title>400 The plain HTTP request was sent to HTTPS port</title>" in body
    # The worker is fine afterwards.
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.get("/").status == 200


def test_stalled_handshake_is_closed_after_client_header_timeout(
        forklb_factory, py_backend_factory, certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs, header_timeout="1s")
    silent = socket.create_connection(("127.0.0.1", port))
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    started = time.monotonic()
    try:
        for sock in (silent, partial):
            sock.settimeout(20)
            assert sock.recv(1024) in (b"", b"\x15\x03\x01\x00\x02\x02\x28")  # EOF (or alert)
        assert time.monotonic() - started < 15
    finally:
        silent.close()
        partial.close()
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.get("/").status == 200


def test_missing_certificate_fails_the_config_test(forklb_factory, certs) -> None:
    port = free_port()
    text = ("events { }\nhttp {\n    access_log off;\n    server {\n"
            f"        listen 127.0.0.1:{port} ssl;\n    }}\n}}\n")
    lb = forklb_factory(text)
    r = lb.cli("-t")
    assert r.returncode == 1
    assert (f'no "ssl_certificate" is defined for the "listen ... ssl" directive in '
            f"{lb.conf_path}:4") in r.stderr, r.stderr


def test_reload_with_a_bad_key_keeps_the_old_config(forklb_factory, py_backend_factory,
                                                     certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    workers = lb.worker_pids()
    good = lb.conf_path.read_text()
    _a_cert, a_key = certs["a.test"]
    lb.write_conf(good.replace(f"ssl_certificate_key {a_key};",
                               "ssl_certificate_key /nonexistent/a.key;"))
    r = lb.cli("-s", "reload")
    assert r.returncode == 1
    assert 'cannot load certificate key "/nonexistent/a.key"' in r.stderr, r.stderr
    # A HUP that reaches the master anyway is logged and not applied.
    os.kill(lb.master_pid, signal.SIGHUP)
    wait_for(lambda: 'cannot load certificate key "/nonexistent/a.key"' in lb.error_log(),
             timeout=10, message=lb.error_log)
    assert lb.worker_pids() == workers
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.peer_cn() == "a.test"
        assert c.get("/").status == 200


def test_alpn_and_ssl_variables(forklb_factory, py_backend_factory, certs) -> None:
    lb, port, plain = start_lb(forklb_factory, py_backend_factory, certs)
    ctx = client_context(certs)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with TlsClient(port, ctx, sni="a.test") as c:
        assert c.sock.selected_alpn_protocol() == "http/1.1"  # no h2: HTTP/1.1, as nginx
        protocol, name, cipher, https = c.get("/vars").text.rstrip("\n").split("|")
        assert (protocol, name, cipher, https) == ("TLSv1.3", "a.test", c.sock.cipher()[0], "on")
    with HttpClient(plain, host="a.test") as c:
        assert c.get("/vars").text == "|||\n"


STATIC = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
    }}
}}
"""


def test_static_files_over_tls(forklb_factory, certs, tmp_path) -> None:
    """Files go through the TLS socket, never sendfile() on its descriptor (nginx turns
    sendfile off on SSL connections): a body written around TLS would be garbage."""
    root = tmp_path / "www"
    root.mkdir()
    big = os.urandom(3 * 1024 * 1024 + 5)
    (root / "big.bin").write_bytes(big)
    (root / "small.txt").write_text("small\n")
    port = free_port()
    cert, key = certs["a.test"]
    lb = forklb_factory(STATIC.format(port=port, cert=cert, key=key, root=root))
    lb.start(wait_ports=[port], workers=1)
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.get("/small.txt").body == b"small\n"
        r = c.get("/big.bin")
        assert r.status == 200 and r.body == big
        assert c.request("HEAD", "/big.bin").header("content-length") == str(len(big))
        assert c.get("/small.txt").body == b"small\n"  # the connection is still in step


def test_graceful_stop_closes_idle_tls_connections(forklb_factory, py_backend_factory,
                                                   certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.get("/").status == 200
        time.sleep(1.5)  # idle long enough to be closed at once on QUIT
        os.kill(lb.master_pid, signal.SIGQUIT)
        assert c.server_closed(timeout=15)
    wait_for(lambda: not lb.running, timeout=20, message=lb.diagnostics)
    assert "Traceback" not in lb.stderr() + lb.error_log()


def test_reload_with_a_new_certificate_serves_it(forklb_factory, py_backend_factory,
                                                 certs) -> None:
    lb, port, _plain = start_lb(forklb_factory, py_backend_factory, certs)
    old = lb.worker_pids()
    (a_cert, a_key), (b_cert, b_key) = certs["a.test"], certs["b.test"]
    text = lb.conf_path.read_text()
    text = text.replace(f"ssl_certificate {a_cert};", f"ssl_certificate {b_cert};", 1)
    lb.write_conf(text.replace(f"ssl_certificate_key {a_key};",
                               f"ssl_certificate_key {b_key};", 1))
    assert lb.cli("-s", "reload").returncode == 0
    lb.wait_workers_replaced(old, 1)
    with TlsClient(port, client_context(certs), sni="a.test") as c:
        assert c.peer_cn() == "b.test"
        assert c.get("/").status == 200
