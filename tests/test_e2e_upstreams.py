"""Upstream groups end to end: real forklb (2 workers) in front of real backends.

Acceptance items of the upstreams issue: smooth WRR shared by the workers, max_fails /
fail_timeout with one probe per window, backup servers, least_conn, hash / consistent
hash / ip_hash (checked against forklb.upstream.methods and Debian's nginx), max_conns.

Backends are Debian nginx (``NginxBackend``: a fixed body per server), plus two small
in-process helpers: a threaded HTTP backend that sleeps and counts concurrent requests,
and a listener that resets every connection it accepts (so each attempt is an error)
and records when.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from harness import LOCALHOST, HttpClient, build_request, free_port, wait_for, wait_port

from forklb.upstream import methods

CONF = """
worker_processes 2;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    log_format who '$pid $upstream_addr $status';
{upstreams}
    server {{
        listen 127.0.0.1:{port};
        server_name lb;
{locations}
    }}
}}
"""


# --------------------------------------------------------------------------- helpers


class ThreadedBackend:
    """In-process HTTP/1.1 backend answering ``NAME\\n`` after ``delay`` seconds.

    Counts requests being processed: a request is active from when its head has been
    read until just before its response is written, an interval inside forklb's use
    of the connection, so ``max_active`` bounds from below what forklb had in flight.
    """

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.total = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with backend.lock:
                    backend.active += 1
                    backend.total += 1
                    backend.max_active = max(backend.max_active, backend.active)
                try:
                    if backend.delay:
                        time.sleep(backend.delay)
                finally:
                    with backend.lock:
                        backend.active -= 1
                body = (backend.name + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.server = Server((LOCALHOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def threaded_backend() -> Iterator:
    created: list[ThreadedBackend] = []

    def factory(name: str, delay: float = 0.0) -> ThreadedBackend:
        backend = ThreadedBackend(name, delay)
        created.append(backend)
        return backend

    yield factory
    for backend in created:
        backend.stop()


def get(port: int, path: str = "/", source: str | None = None,
        timeout: float = 5.0) -> tuple[int, str]:
    """One request on a new connection (from ``source`` if given): (status, body)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((LOCALHOST, port))
        sock.sendall(build_request("GET", path, "lb", connection="close"))
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("latin-1").strip()


def concurrent_gets(port: int, clients: int, each: int) -> Counter:
    """``clients`` threads doing ``each`` requests; (status, body) counts, no errors."""
    results: list[tuple[int, str]] = []
    errors: list[str] = []

    def client() -> None:
        for _ in range(each):
            try:
                results.append(get(port))
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    return Counter(results)


def upstream_block(name: str, directive: str, servers: list[str]) -> str:
    lines = "".join(f"        server {s};\n" for s in servers)
    return f"    upstream {name} {{\n        {directive}\n{lines}    }}\n"


def start_lb(forklb_factory, upstreams: str, locations: str):
    port = free_port()
    lb = forklb_factory(CONF.format(upstreams=upstreams, port=port, locations=locations))
    lb.start(wait_ports=[port], workers=2)
    return lb, port


def access_pids(lb, count: int) -> Counter:
    """Worker pids from logs/who.log once it has ``count`` lines (flushed every second)."""
    path = lb.path("logs/who.log")

    def lines() -> list[str]:
        text = path.read_text() if path.exists() else ""
        got = text.splitlines()
        return got if len(got) >= count else []

    found = wait_for(lines, 10, message=f"{path} has fewer than {count} lines")
    return Counter(int(line.split()[0]) for line in found)


# --------------------------------------------------------------------------- round robin


def test_weights_5_1_1_one_sequence_for_both_workers(nginx_backend_factory, forklb_factory):
    backends = [nginx_backend_factory(name) for name in "abc"]
    servers = [f"127.0.0.1:{b.port} weight={w}" for b, w in zip(backends, (5, 1, 1),
                                                                strict=True)]
    lb, port = start_lb(forklb_factory, upstream_block("app", "", servers),
                        "        location / { proxy_pass http://app; "
                        "access_log logs/who.log who; }")
    seq = []
    for _ in range(700):
        status, body = get(port)
        assert status == 200
        seq.append(body)
    assert Counter(seq) == {"a": 500, "b": 100, "c": 100}
    assert "".join(seq) == "aabacaa" * 100  # sequential requests: exactly the schedule
    # Both workers served: the exact split is the shared ticket's doing.
    pids = access_pids(lb, 700)
    assert len(pids) == 2 and sorted(pids) == sorted(lb.worker_pids()), pids

    # One keep-alive connection (one worker) sees the schedule, repeating.
    with HttpClient(port, host="lb") as client:
        bodies = []
        for _ in range(21):
            r = client.get("/")
            assert r.status == 200
            bodies.append(r.text.strip())
    assert "".join(bodies) == "aabacaa" * 3


# --------------------------------------------------------------------------- max_fails


def test_max_fails_2_fail_timeout_3s_one_probe(nginx_backend_factory, forklb_factory,
                                               hangup_factory):
    good = nginx_backend_factory("good")
    bad = hangup_factory()
    servers = [f"127.0.0.1:{bad.port} max_fails=2 fail_timeout=3s", f"127.0.0.1:{good.port}"]
    lb, port = start_lb(forklb_factory, upstream_block("app", "", servers),
                        "        location / { proxy_pass http://app; }")
    statuses: Counter = Counter()
    bodies: Counter = Counter()
    deadline = time.monotonic() + 15
    disabled_at = None
    while time.monotonic() < deadline:
        status, body = get(port)
        statuses[status] += 1
        bodies[body] += 1
        if disabled_at is None and len(bad.accepts) >= 2:
            disabled_at = bad.accepts[1]
            deadline = disabled_at + 5.0  # the probe is due ~3 s later, the next ~6 s later
        time.sleep(0.02)
    assert disabled_at is not None, "the refusing server never got two attempts"
    assert statuses == {200: sum(statuses.values())}, statuses  # retries hid every failure
    assert set(bodies) == {"good"}
    after = [t - disabled_at for t in bad.accepts[2:]]
    assert len(after) == 1, f"expected exactly one probe, got attempts at {after}"
    assert 2.5 <= after[0] <= 5.0, after
    assert sum(statuses.values()) > 150  # traffic kept flowing during the whole window


# --------------------------------------------------------------------------- backup


def test_backup_only_when_no_primary_is_usable(nginx_backend_factory, forklb_factory):
    p1, p2, backup = (nginx_backend_factory(n) for n in ("p1", "p2", "backup"))
    dead1, dead2 = free_port(), free_port()  # nothing listens there: refused
    upstreams = (
        upstream_block("ok", "", [f"127.0.0.1:{p1.port}", f"127.0.0.1:{p2.port}",
                                  f"127.0.0.1:{backup.port} backup"])
        + upstream_block("dead", "", [f"127.0.0.1:{dead1}", f"127.0.0.1:{dead2}",
                                      f"127.0.0.1:{backup.port} backup"])
    )
    locations = ("        location /ok { proxy_pass http://ok; }\n"
                 "        location /dead { proxy_pass http://dead; }")
    lb, port = start_lb(forklb_factory, upstreams, locations)
    ok = Counter(get(port, "/ok") for _ in range(30))
    assert ok == {(200, "p1"): 15, (200, "p2"): 15}
    dead = Counter(get(port, "/dead") for _ in range(30))
    assert dead == {(200, "backup"): 30}


# --------------------------------------------------------------------------- least_conn


def test_least_conn_prefers_the_fast_backend(threaded_backend, forklb_factory):
    fast = threaded_backend("fast")
    slow = threaded_backend("slow", delay=0.2)
    servers = [f"127.0.0.1:{fast.port}", f"127.0.0.1:{slow.port}"]
    lb, port = start_lb(forklb_factory, upstream_block("app", "least_conn;", servers),
                        "        location / { proxy_pass http://app; }")
    counts = concurrent_gets(port, clients=20, each=10)
    assert sum(counts.values()) == 200
    assert set(counts) <= {(200, "fast"), (200, "slow")}, counts
    assert counts[(200, "fast")] >= 4 * counts[(200, "slow")], counts
    assert fast.total + slow.total == 200


# --------------------------------------------------------------------------- hash methods

HASH_WEIGHTS = (1, 2, 1, 3)
HASH_LOCATIONS = """\
        location /h {{ proxy_pass http://{p}h; }}
        location /ch {{ proxy_pass http://{p}ch; }}
        location /ip {{ proxy_pass http://{p}ip; }}
        location /hx {{ proxy_pass http://{p}hx; }}"""


def _hash_keys() -> list[str]:
    keys = [f"user{n}" for n in range(80)]
    keys += [f"a%2Fb{n}" for n in range(10)]  # $arg_k is the raw, still encoded value
    keys += [f"x+y-{n}" for n in range(10)]
    return keys


def _sources() -> list[str]:
    return [f"127.{n % 13}.{(n * 7) % 251}.{n % 3 + 1}" for n in range(100)]


def _hash_upstreams(prefix: str, servers: list[str]) -> str:
    return (upstream_block(f"{prefix}h", "hash $arg_k;", servers)
            + upstream_block(f"{prefix}ch", "hash $arg_k consistent;", servers)
            + upstream_block(f"{prefix}ip", "ip_hash;", servers)
            + upstream_block(f"{prefix}hx", "hash $http_x_key;", servers))


@pytest.fixture
def hash_setup(nginx_backend_factory, forklb_factory):
    """forklb and Debian nginx balancing over the same four backends."""
    backends = [nginx_backend_factory(f"b{i}") for i in range(4)]
    written = [f"127.0.0.1:{b.port}" for b in backends]
    servers = [f"{w} weight={weight}" for w, weight in zip(written, HASH_WEIGHTS, strict=True)]
    lb, port = start_lb(forklb_factory, _hash_upstreams("", servers),
                        HASH_LOCATIONS.format(p=""))
    nginx_port = free_port()
    nginx_lb = nginx_backend_factory(
        "unused", name="nginx-lb",
        extra_servers=_hash_upstreams("n", servers) + (
            f"    server {{\n        listen 127.0.0.1:{nginx_port};\n"
            f"{HASH_LOCATIONS.format(p='n')}\n    }}\n"))
    wait_port(nginx_port)
    models = {m: methods.create(m, written, list(HASH_WEIGHTS))
              for m in ("hash", "hash consistent", "ip_hash")}
    names = [f"b{i}" for i in range(4)]
    return port, nginx_port, models, names, nginx_lb


@pytest.mark.parametrize(("path", "method"), [("/h", "hash"), ("/ch", "hash consistent")])
def test_hash_matches_methods_and_nginx(hash_setup, path, method):
    port, nginx_port, models, names, _ = hash_setup
    seen = Counter()
    for key in _hash_keys():
        expected = names[models[method].pick(key)]
        assert get(port, f"{path}?k={key}") == (200, expected), key
        assert get(nginx_port, f"{path}?k={key}") == (200, expected), key
        seen[expected] += 1
    assert len(seen) == 4, seen


def test_ip_hash_matches_methods_and_nginx(hash_setup):
    port, nginx_port, models, names, _ = hash_setup
    seen = Counter()
    for source in _sources():
        expected = names[models["ip_hash"].pick(source)]
        assert get(port, "/ip", source=source) == (200, expected), source
        assert get(nginx_port, "/ip", source=source) == (200, expected), source
        seen[expected] += 1
    assert len(seen) == 4, seen


def _get_with_key_header(port: int, key: bytes) -> tuple[int, str]:
    """GET /hx with ``X-Key: <key>`` (raw bytes: obs-text is allowed in header values)."""
    with socket.create_connection((LOCALHOST, port), timeout=5) as sock:
        sock.sendall(b"GET /hx HTTP/1.1\r\nHost: lb\r\nX-Key: " + key
                     + b"\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("latin-1").strip()


def test_hash_header_key_ascii(hash_setup):
    port, nginx_port, models, names, _ = hash_setup
    for n in range(30):
        key = f"session-{n}".encode()
        expected = names[models["hash"].pick(key)]
        assert _get_with_key_header(nginx_port, key) == (200, expected)
        assert _get_with_key_header(port, key) == (200, expected)


def test_hash_header_key_with_non_ascii_bytes(hash_setup):
    port, nginx_port, models, names, _ = hash_setup
    mismatches = []
    for n in range(20):
        key = f"caf\u00e9-{n}".encode()  # UTF-8 bytes in a header value
        expected = names[models["hash"].pick(key)]  # nginx hashes the bytes as received
        assert _get_with_key_header(nginx_port, key) == (200, expected)
        got = _get_with_key_header(port, key)
        if got != (200, expected):
            mismatches.append((key, got, expected))
    assert not mismatches, mismatches


# --------------------------------------------------------------------------- max_conns


def test_max_conns_1_never_exceeded(nginx_backend_factory, threaded_backend, forklb_factory):
    fast = nginx_backend_factory("fast")
    slow = threaded_backend("slow", delay=0.15)
    servers = [f"127.0.0.1:{slow.port} max_conns=1", f"127.0.0.1:{fast.port}"]
    lb, port = start_lb(forklb_factory, upstream_block("app", "", servers),
                        "        location / { proxy_pass http://app; }")
    counts = concurrent_gets(port, clients=12, each=8)
    assert set(counts) <= {(200, "fast"), (200, "slow")}, counts
    assert sum(counts.values()) == 96
    assert slow.total >= 3, (slow.total, counts)  # it was used, one at a time
    assert slow.max_active == 1, slow.max_active
