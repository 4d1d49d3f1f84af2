"""Active health checks and the runtime API, through real processes under load."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from harness import free_port, http_request, wait_for
from load import LoadClient

TOKEN = "s3cret-token"

CONF = """
worker_processes 2;
error_log logs/error.log notice;
events {{ }}
sidecar {{
    listen 127.0.0.1:{side};
    admin_token_file conf/token;
    {access}
}}
http {{
    access_log off;
    upstream www_pools {{
        {health}
        server 127.0.0.1:{b1};
        server 127.0.0.1:{b2};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://www_pools; }}
    }}
}}
"""


@pytest.fixture
def cluster(nginx_backend_factory, forklb_factory):
    def make(health: str = "", access: str = ""):
        b1 = nginx_backend_factory("web01")
        b2 = nginx_backend_factory("web02")
        port, side = free_port(), free_port()
        lb = forklb_factory(CONF.format(side=side, access=access, health=health, b1=b1.port,
                                        b2=b2.port, port=port))
        (lb.prefix / "conf" / "token").write_text(TOKEN + "\n")
        lb.start(wait_ports=[port, side], workers=2)
        return lb, port, side, b1, b2

    return make


def _api(side: int, method: str = "GET", path: str = "/api/upstreams", body=None,
         token: str | None = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{side}{path}", method=method)
    if body is not None:
        request.data = body if isinstance(body, bytes) else json.dumps(body).encode()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _servers(side: int) -> dict[str, dict]:
    status, body = _api(side)
    assert status == 200
    return {s["address"]: s for s in body["upstreams"]["www_pools"]["servers"]}


def test_health_checks_take_a_dead_backend_out_and_bring_it_back(cluster):
    lb, port, side, b1, b2 = cluster("health_check interval=1s timeout=1s fails=2 passes=2;")
    dead = f"127.0.0.1:{b2.port}"
    wait_for(lambda: _servers(side)[dead]["health"] == "up", timeout=5)
    clients = LoadClient(port, threads=3, host="x").start()
    try:
        b2.stop()
        t0 = time.monotonic()
        wait_for(lambda: _servers(side)[dead]["state"] == "failed", timeout=4,
                 message=lambda: str(_servers(side)))
        assert time.monotonic() - t0 <= 3.0
        wait_for(lambda: _servers(side)[dead]["health"] == "down",
                 timeout=3.5 - (time.monotonic() - t0), message="health checks missed it")
        before = _servers(side)[dead]["requests"]
        time.sleep(1.5)
        assert _servers(side)[dead]["requests"] == before  # no traffic while it is down
        b2.start()
        t1 = time.monotonic()
        wait_for(lambda: _servers(side)[dead]["state"] == "up", timeout=5,
                 message=lambda: f"{_servers(side)}\n{lb.error_log()[-1500:]}")
        assert time.monotonic() - t1 <= 2 * 1 + 1 + 0.5  # passes * interval + 1 s
        wait_for(lambda: _servers(side)[dead]["requests"] > before, timeout=5,
                 message=lambda: f"{before} {_servers(side)}")
    finally:
        clients.stop()
    assert clients.failures == [], clients.failures[:5]
    log = lb.error_log()
    assert f'upstream server {dead} in "www_pools" is down: connect refused (2 checks)' in log
    assert f'upstream server {dead} in "www_pools" is up (2 checks)' in log


def test_drain_under_load_loses_nothing_and_stops_new_requests(cluster):
    lb, port, side, b1, b2 = cluster()
    drained = f"127.0.0.1:{b2.port}"
    clients = LoadClient(port, threads=4, host="x").start()
    try:
        time.sleep(1.0)
        status, _ = _api(side, "PATCH", f"/api/upstreams/www_pools/servers/{drained}",
                         {"state": "drain"})
        assert status == 200
        wait_for(lambda: _servers(side)[drained]["active"] == 0, timeout=5)
        before = _servers(side)[drained]["requests"]
        time.sleep(1.5)
        after = _servers(side)[drained]
        assert after["requests"] == before and after["state"] == "draining"
    finally:
        clients.stop()
    assert clients.failures == [], clients.failures[:5]
    assert clients.ok > 100
    # Back up: it gets requests again, through the CLI this time.
    r = lb.cli("upstream", "up", "www_pools", drained)
    assert r.returncode == 0, r.stderr
    assert "up" in r.stdout
    bodies = {http_request(port, "/", host="x").text.strip() for _ in range(6)}
    assert bodies == {"web01", "web02"}


def test_weight_change_applies_to_all_workers_without_reload(cluster):
    lb, port, side, b1, b2 = cluster()
    workers = lb.worker_pids()
    r = lb.cli("upstream", "set-weight", "www_pools", f"127.0.0.1:{b1.port}", "3")
    assert r.returncode == 0, r.stderr
    bodies = [http_request(port, "/", host="x").text.strip() for _ in range(40)]
    assert bodies.count("web01") == 30, bodies
    assert lb.worker_pids() == workers
    listing = lb.cli("upstream", "list")
    assert listing.returncode == 0 and "web" not in listing.stderr
    assert f"127.0.0.1:{b1.port}" in listing.stdout


@pytest.mark.parametrize(("method", "path", "body", "token", "status"), [
    ("PATCH", "/api/upstreams/nope/servers/127.0.0.1:1", {"state": "down"}, TOKEN, 404),
    ("PATCH", "/api/upstreams/www_pools/servers/127.0.0.1:1", {"state": "down"}, TOKEN, 404),
    ("PATCH", "/api/upstreams/www_pools/servers/{b1}", b"{not json", TOKEN, 400),
    ("PATCH", "/api/upstreams/www_pools/servers/{b1}", {"state": "sleepy"}, TOKEN, 400),
    ("PATCH", "/api/upstreams/www_pools/servers/{b1}", {"weight": 0}, TOKEN, 400),
    ("PATCH", "/api/upstreams/www_pools/servers/{b1}", {"state": "down"}, None, 401),
    ("PATCH", "/api/upstreams/www_pools/servers/{b1}", {"state": "down"}, "wrong", 401),
])
def test_api_errors_change_nothing(cluster, method, path, body, token, status):
    lb, port, side, b1, b2 = cluster()
    before = _servers(side)
    code, reply = _api(side, method, path.format(b1=f"127.0.0.1:{b1.port}"), body, token)
    assert code == status and "error" in reply
    now = _servers(side)
    for address in before:
        assert now[address]["state"] == before[address]["state"] == "up"
        assert now[address]["weight"] == before[address]["weight"]


def test_clients_outside_allow_get_403(cluster):
    lb, port, side, b1, b2 = cluster(access="allow 127.0.0.2; deny all;")
    # From 127.0.0.1 (denied) and from 127.0.0.2 (allowed).
    assert _api(side)[0] == 403
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    sock.connect(("127.0.0.1", side))
    sock.sendall(b"GET /api/upstreams HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200")


def test_retried_attempts_leave_no_connection_counted(nginx_backend_factory, forklb_factory):
    """A request retried on the next peer (the first refused the connection) releases
    the peer it tried first: the API shows no connection in use once the requests are
    answered (least_conn and max_conns read these counts).  The refusing peer is the
    first one: a release of the wrong index lands on another peer's count."""
    live = nginx_backend_factory("web01")
    dead = free_port()  # nothing listens: connect() is refused
    port, side = free_port(), free_port()
    conf = CONF.replace("server 127.0.0.1:{b1};", "server 127.0.0.1:{b1} max_fails=0;")
    lb = forklb_factory(conf.format(side=side, access="", health="", b1=dead, b2=live.port,
                                    port=port))
    (lb.prefix / "conf" / "token").write_text(TOKEN + "\n")
    lb.start(wait_ports=[port, side], workers=2)
    for _ in range(12):
        assert http_request(port, "/").status == 200
    servers = _servers(side)
    assert servers[f"127.0.0.1:{dead}"]["failures"] >= 1  # retries did happen
    assert [s["active"] for s in servers.values()] == [0, 0], servers
    assert servers[f"127.0.0.1:{live.port}"]["requests"] == 12
