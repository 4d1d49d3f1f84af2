"""Differential tests: forklb.upstream.methods chooses the peers Debian's nginx chooses.

One nginx process tree (master + one worker) runs for the whole module:

* five backend ``server {}`` blocks on free 127.0.0.1 ports, each answering its own
  port number;
* one balancer ``server {}`` per ``upstream {}`` variant, proxying to it and
  reporting ``$upstream_addr`` (every peer tried, in order) in an ``X-Up`` header.
  For each of ``hash $arg_k``, ``hash $arg_k consistent`` and ``ip_hash``: equal
  weights, unequal weights, ``down`` servers, a dead server (a port nobody listens
  on, ``max_fails=0``: its refused connections make nginx retry, which exercises
  the continuation of a request's hashing), and one live server among nine dead
  ones (requests meet more than 20 unusable candidates and nginx hands them to
  round robin).  Plus consistent hashing of ``localhost:P`` vs ``127.0.0.1:P``
  (the text as written is hashed) and empty keys (round robin).

For each request the test replays the choice with the pure method objects: a
cursor per request, ``usable`` = not down and not yet tried, ``next()`` again
after each refused peer, smooth WRR (forklb.upstream.balancer) once the method
returns None; the list of peers must equal nginx's ``X-Up`` exactly.  ip_hash
requests come from varied 127.a.b.c source addresses (all loopback) and ::1.

nginx is required: a missing binary fails the tests (they never skip).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import NGINX_BIN, free_port, kill_tree, port_is_open, wait_for

from forklb.upstream.balancer import SmoothWeightedRoundRobin, swrr_schedule
from forklb.upstream.methods import IpHash, Method, create

BACKENDS = 5
DEAD = 9
KEYS = 240
ADDRESSES = 240


@dataclass
class Variant:
    """One upstream block: method, (written server, weight, flag) per peer."""

    name: str
    method: str  # "hash", "hash consistent", "ip_hash", "least_conn"
    peers: list[tuple[str, int, str]]  # flag: "", "down" or "dead"
    port: int = field(default_factory=free_port)
    port6: int = field(default_factory=free_port)
    #: Round robin nginx falls back to (its state persists across requests).
    rr: SmoothWeightedRoundRobin | None = None
    rehashed: int = 0  # requests on which the model rejected a candidate
    fallbacks: int = 0  # requests handed over to round robin
    _model: Method | None = None

    def __post_init__(self) -> None:
        self.rr = SmoothWeightedRoundRobin([w for _, w, _ in self.peers], max_fails=0)

    def upstream_block(self) -> str:
        directive = {
            "hash": "hash $arg_k;",
            "hash consistent": "hash $arg_k consistent;",
            "ip_hash": "ip_hash;",
            "least_conn": "least_conn;",
        }[self.method]
        lines = [f"    upstream {self.name} {{", f"        {directive}"]
        for server, weight, flag in self.peers:
            extra = {"": "", "down": " down", "dead": " max_fails=0"}[flag]
            lines.append(f"        server {server} weight={weight}{extra};")
        lines.append("    }")
        return "\n".join(lines)

    def model(self) -> Method:
        """The method object, built once: it keeps state across requests as nginx does."""
        if self._model is None:
            servers = [s for s, _, _ in self.peers]
            weights = [w for _, w, _ in self.peers]
            self._model = create(self.method, servers, weights)
        return self._model

    def expected(self, key: object) -> list[int]:
        """Peers nginx should try for ``key``, in order, until a live one answers.

        Replays nginx: a cursor per request, ``next()`` again after each refused
        (dead) peer; once the method says "round robin" (None), smooth WRR over the
        untried, not-down peers, with its state kept across requests as nginx does.
        """
        cursor = self.model().begin(key)
        tried: list[int] = []
        down = {i for i, (_, _, flag) in enumerate(self.peers) if flag == "down"}
        calls = 0
        fell_back = False

        def usable(i: int) -> bool:
            nonlocal calls
            calls += 1
            return i not in down and i not in tried

        while True:
            index = cursor.next(usable, [0] * len(self.peers))  # sequential requests
            if index is None:
                fell_back = True
                assert self.rr is not None
                mask = sum(1 << i for i in {*down, *tried})
                index = self.rr.pick(0.0, mask)
                assert index is not None, f"{self.name}: no peer left for {key!r}"
            tried.append(index)
            if self.peers[index][2] != "dead":
                break
        self.rehashed += calls > len(tried)
        self.fallbacks += fell_back
        return tried


@dataclass
class Nginx:
    backend_ports: list[int]
    dead_ports: list[int]
    variants: dict[str, Variant]
    port_to_index: dict[str, dict[int, int]]


def _variants(ports: list[int], dead: list[int]) -> list[Variant]:
    def srv(i: int, host: str = "127.0.0.1") -> str:
        return f"{host}:{ports[i]}"

    out: list[Variant] = []
    for method, short in (("hash", "h"), ("hash consistent", "ch"), ("ip_hash", "ip")):
        out.append(Variant(f"{short}_equal", method, [(srv(i), 1, "") for i in range(4)]))
        out.append(
            Variant(
                f"{short}_weighted",
                method,
                [
                    (srv(0), 1, ""),
                    (srv(1), 2, ""),
                    (srv(2), 3, ""),
                    (srv(3), 1, ""),
                    (srv(4), 5, ""),
                ],
            )
        )
        out.append(
            Variant(
                f"{short}_down",
                method,
                [
                    (srv(0), 2, ""),
                    (srv(1), 1, "down"),
                    (srv(2), 1, ""),
                    (srv(3), 3, "down"),
                    (srv(4), 1, ""),
                ],
            )
        )
        out.append(
            Variant(
                f"{short}_dead",
                method,
                [
                    (srv(0), 1, ""),
                    (f"127.0.0.1:{dead[0]}", 3, "dead"),
                    (srv(1), 1, ""),
                    (srv(2), 2, ""),
                ],
            )
        )
        # One live peer among nine dead ones: many requests meet more than 20 unusable
        # candidates, nginx switches to round robin for the rest of the request.
        out.append(
            Variant(
                f"{short}_fallback",
                method,
                [(srv(4), 1, "")] + [(f"127.0.0.1:{p}", 3, "dead") for p in dead],
            )
        )
    # Consistent hashing hashes the server text as written: "localhost:P" and
    # "127.0.0.1:P" are different points on the ring although they are the same peer.
    out.append(
        Variant(
            "ch_written",
            "hash consistent",
            [
                (srv(0, "localhost"), 1, ""),
                (srv(1), 2, ""),
                (srv(2, "localhost"), 1, ""),
                (srv(3, "127.0.0.1"), 1, ""),
            ],
        )
    )
    out.append(Variant("ip_three", "ip_hash", [(srv(i), 1, "") for i in range(3)]))
    # least_conn with sequential requests: every usable peer has 0 connections, so each
    # choice is a smooth-WRR round among the untried peers (the dead one included).
    out.append(
        Variant(
            "lc_dead",
            "least_conn",
            [
                (srv(0), 3, ""),
                (f"127.0.0.1:{dead[0]}", 2, "dead"),
                (srv(1), 1, ""),
                (srv(2), 2, ""),
            ],
        )
    )
    # Empty keys: hash falls back to round robin.
    out.append(Variant("h_rr", "hash", [(srv(0), 3, ""), (srv(1), 1, ""), (srv(2), 2, "")]))
    return out


def _config(tmp: Path, ports: list[int], variants: list[Variant], ipv6: bool) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {tmp}/temp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    backends = "\n".join(
        f'    server {{ listen 127.0.0.1:{p}; location / {{ return 200 "{p}"; }} }}' for p in ports
    )
    upstreams = "\n".join(v.upstream_block() for v in variants)
    balancers = []
    for v in variants:
        listen6 = f"        listen [::1]:{v.port6};\n" if ipv6 and v.method == "ip_hash" else ""
        balancers.append(
            f"""\
    server {{
        listen 127.0.0.1:{v.port};
{listen6}        location / {{
            proxy_pass http://{v.name};
            proxy_connect_timeout 3s;
            add_header X-Up $upstream_addr always;
        }}
    }}"""
        )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
{user}pid {tmp}/nginx.pid;
error_log {tmp}/error.log notice;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    default_type text/plain;
{temp}
{backends}
{upstreams}
{chr(10).join(balancers)}
}}
"""


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    assert os.access(NGINX_BIN, os.X_OK), (
        f"nginx binary {NGINX_BIN} not found or not executable: these differential tests "
        "need Debian's nginx (apt-get install nginx-light) or FORKLB_TEST_NGINX"
    )
    tmp = tmp_path_factory.mktemp("nginx-methods")
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "temp" / kind).mkdir(parents=True)
    ports = [free_port() for _ in range(BACKENDS)]
    dead = [free_port() for _ in range(DEAD)]
    variants = _variants(ports, dead)
    ipv6 = _ipv6_loopback()
    conf = tmp / "nginx.conf"
    conf.write_text(_config(tmp, ports, variants, ipv6))
    error_log = tmp / "error.log"

    def diagnostics() -> str:
        text = error_log.read_text(errors="replace") if error_log.exists() else ""
        return f"--- error log:\n{text[-4000:]}\n--- config:\n{conf.read_text()}"

    with open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [NGINX_BIN, "-p", f"{tmp}/", "-c", str(conf), "-e", str(error_log)],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        all_ports = ports + [v.port for v in variants]

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited with {proc.returncode}\n{diagnostics()}")
            return all(port_is_open(p) for p in all_ports)

        wait_for(ready, 15.0, message=diagnostics)
        assert not any(port_is_open(p) for p in dead), "dead ports must refuse connections"
        port_to_index = {
            v.name: {int(s.rsplit(":", 1)[1]): i for i, (s, _, _) in enumerate(v.peers)}
            for v in variants
        }
        yield Nginx(ports, dead, {v.name: v for v in variants}, port_to_index)
    finally:
        kill_tree(proc.pid, popen=proc)


# --------------------------------------------------------------------------- client


def _get(
    port: int,
    path: str,
    source: str | None = None,
    family: int = socket.AF_INET,
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 request (optionally from source address ``source``)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _tried(nginx: Nginx, variant: Variant, headers: dict[str, str]) -> list[int]:
    """Peer indices from ``$upstream_addr`` ("127.0.0.1:P1, 127.0.0.1:P2")."""
    mapping = nginx.port_to_index[variant.name]
    return [mapping[int(a.strip().rsplit(":", 1)[1])] for a in headers["x-up"].split(",")]


def _keys() -> list[str]:
    rng = random.Random(20240611)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~"
    keys = [f"key{i}" for i in range(KEYS // 2)]
    while len(keys) < KEYS - 8:
        keys.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    # $arg_k is the raw, still percent-encoded, value: nginx hashes "a%2Fb", not "a/b".
    keys += ["a%2Fb", "a/b", "%41", "A", "x+y", "x%20y", "1", "0"]
    return keys


def _check_all(
    nginx: Nginx,
    variant: Variant,
    cases: Sequence[tuple[object, Callable[[], tuple[int, dict[str, str], bytes]]]],
) -> None:
    mismatches = []
    seen: set[int] = set()
    for key, send in cases:
        status, headers, body = send()
        assert status == 200, (key, status, headers, body)
        got = _tried(nginx, variant, headers)
        assert int(body) == int(variant.peers[got[-1]][0].rsplit(":", 1)[1])
        want = variant.expected(key)
        seen.update(got)
        if got != want:
            mismatches.append((key, got, want))
    assert not mismatches, (
        f"{variant.name}: {len(mismatches)}/{len(cases)} differ (key, nginx, model): "
        f"{mismatches[:10]}"
    )
    live = {i for i, (_, _, flag) in enumerate(variant.peers) if flag != "down"}
    assert seen == live, f"{variant.name}: only peers {sorted(seen)} were used"
    # The interesting paths really ran: rehashing past unusable peers, and the
    # hand-over to round robin after more than 20 of them.
    flags = {flag for _, _, flag in variant.peers}
    if flags & {"down", "dead"} and variant.method != "least_conn":
        assert variant.rehashed >= 10, (variant.name, variant.rehashed)
    if variant.name.endswith("_fallback"):
        assert len(cases) // 5 <= variant.fallbacks < len(cases), (variant.name, variant.fallbacks)
    else:
        assert variant.fallbacks == 0, (variant.name, variant.fallbacks)


KEY_VARIANTS = [
    "h_equal",
    "h_weighted",
    "h_down",
    "h_dead",
    "h_fallback",
    "ch_equal",
    "ch_weighted",
    "ch_down",
    "ch_dead",
    "ch_fallback",
    "ch_written",
]
IP_VARIANTS = ["ip_equal", "ip_weighted", "ip_down", "ip_dead", "ip_fallback"]


@pytest.mark.parametrize("name", [*KEY_VARIANTS, "lc_dead"])
def test_hash_key_matches_nginx(nginx: Nginx, name: str) -> None:
    variant = nginx.variants[name]
    cases = [(key, lambda key=key: _get(variant.port, f"/?k={key}")) for key in _keys()]
    _check_all(nginx, variant, cases)


def _addresses() -> list[str]:
    rng = random.Random(7)
    addrs = ["127.0.0.1", "127.0.0.200", "127.0.1.1", "127.1.0.1"]
    while len(addrs) < ADDRESSES:
        addrs.append(f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    return addrs


@pytest.mark.parametrize("name", IP_VARIANTS)
def test_ip_hash_matches_nginx(nginx: Nginx, name: str) -> None:
    variant = nginx.variants[name]
    cases = [(addr, lambda addr=addr: _get(variant.port, "/", addr)) for addr in _addresses()]
    _check_all(nginx, variant, cases)


def _port_is_open_v6(port: int) -> bool:
    try:
        with socket.create_connection(("::1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("name", IP_VARIANTS)
def test_ip_hash_ipv6_client_matches_nginx(nginx: Nginx, name: str) -> None:
    assert _ipv6_loopback(), "::1 is needed for the IPv6 ip_hash check"
    variant = nginx.variants[name]
    wait_for(lambda: _port_is_open_v6(variant.port6), 5.0, message="[::1] balancer not up")
    status, headers, _ = _get(variant.port6, "/", "::1", socket.AF_INET6, "::1")
    assert status == 200
    assert _tried(nginx, variant, headers) == variant.expected("::1")


def test_reference_ip_hash_example(nginx: Nginx) -> None:
    """nginx-behaviour.md's example, on real nginx: 3 equal servers."""
    variant = nginx.variants["ip_three"]
    expected = {"127.0.0.1": 2, "127.0.0.200": 2, "127.0.1.1": 0, "127.1.0.1": 1}
    for addr, index in expected.items():
        _, headers, _ = _get(variant.port, "/", addr)
        assert _tried(nginx, variant, headers) == [index], addr
        assert IpHash([1, 1, 1]).pick(addr) == index


def test_empty_key_falls_back_to_round_robin(nginx: Nginx) -> None:
    """No ``k`` argument: the model says "round robin"; nginx runs smooth WRR (3, 1, 2)."""
    variant = nginx.variants["h_rr"]
    assert variant.model().pick("") is None
    assert variant.model().pick(None) is None
    got = []
    for path in ["/", "/?k="] * 6:
        _, headers, _ = _get(variant.port, path)
        got += _tried(nginx, variant, headers)
    assert got == list(swrr_schedule([3, 1, 2]) * 2)


def test_nginx_still_running(nginx: Nginx) -> None:
    """The dead peers were refused (and retried) many times without harming nginx."""
    status, headers, _ = _get(nginx.variants["h_dead"].port, "/?k=alive")
    assert status == 200
    assert headers["x-up"]
