"""The seed scenario end to end: forklb as lb01 in front of two Debian nginx web servers."""

from __future__ import annotations

import threading
from collections import Counter

from harness import HttpClient, free_port, http_request

LB01 = """
worker_processes 2;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream www_pools {{
        server 127.0.0.1:{web01} weight={w1};
        server 127.0.0.1:{web02} weight={w2};
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name www.chaoge.com;
        location / {{ proxy_pass http://www_pools; }}
    }}
}}
"""


def _bodies(port: int, n: int) -> Counter:
    return Counter(http_request(port, "/", host="www.chaoge.com").text.strip() for _ in range(n))


def _start(nginx_backend_factory, forklb_factory, w1=1, w2=1):
    web01 = nginx_backend_factory("chaoge_www_121")
    web02 = nginx_backend_factory("chaoge_www_122")
    port = free_port()
    conf = LB01.format(web01=web01.port, web02=web02.port, port=port, w1=w1, w2=w2)
    lb = forklb_factory(conf)
    lb.start(wait_ports=[port], workers=2)
    return lb, port, conf


def test_alternates_between_the_two_web_servers(nginx_backend_factory, forklb_factory):
    lb, port, _ = _start(nginx_backend_factory, forklb_factory)
    seq = [http_request(port, "/", host="www.chaoge.com").text.strip() for _ in range(6)]
    assert seq == ["chaoge_www_121", "chaoge_www_122"] * 3


def test_100_requests_split_evenly_then_3_to_1_after_reload(nginx_backend_factory,
                                                             forklb_factory):
    lb, port, conf = _start(nginx_backend_factory, forklb_factory)
    counts = _bodies(port, 100)
    assert abs(counts["chaoge_www_121"] - 50) <= 5, counts
    assert abs(counts["chaoge_www_122"] - 50) <= 5, counts
    assert sum(counts.values()) == 100

    old = lb.worker_pids()
    lb.write_conf(conf.replace("weight=1;\n        server", "weight=3;\n        server", 1))
    # Load runs across the reload: no request may fail.
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        # A well-behaved keep-alive client: a new connection after "Connection: close".
        client = HttpClient(port, host="www.chaoge.com")
        try:
            while not stop.is_set():
                try:
                    r = client.get("/")
                except Exception as e:  # noqa: BLE001 - any failure is the finding
                    failures.append(repr(e))
                    return
                if r.status != 200:
                    failures.append(f"status {r.status}")
                if (r.header("connection") or "").lower() == "close":
                    client.close()
                    client = HttpClient(port, host="www.chaoge.com")
        finally:
            client.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        result = lb.cli("-s", "reload")
        assert result.returncode == 0, result.stderr
        lb.wait_workers_replaced(old, 2, timeout=15)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures, failures[:5]

    counts = _bodies(port, 200)
    assert abs(counts["chaoge_www_121"] - 150) <= 10, counts
    assert abs(counts["chaoge_www_122"] - 50) <= 10, counts
    assert sum(counts.values()) == 200
