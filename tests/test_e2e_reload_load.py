"""Reloads and crashes under real load: no client may notice (wrk and threaded clients)."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from harness import free_port, wait_for
from load import LoadClient, start_wrk, wrk_result

CONF = """
worker_processes 2;
error_log logs/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    # no client reconnects during a test (nginx's default closes every 1000 requests):
    # a connection opened just as a worker is killed would be counted by no snapshot
    keepalive_requests 100000;
    upstream www_pools {{
        server 127.0.0.1:{b1} weight={w1};
        server 127.0.0.1:{b2} weight=1;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://www_pools; }}
    }}
}}
"""


@pytest.fixture
def cluster(nginx_backend_factory, forklb_factory):
    b1 = nginx_backend_factory("web01")
    b2 = nginx_backend_factory("web02")
    port = free_port()

    def conf(w1: int) -> str:
        return CONF.format(b1=b1.port, b2=b2.port, port=port, w1=w1)

    lb = forklb_factory(conf(1))
    lb.start(wait_ports=[port], workers=2)
    return lb, port, conf


@pytest.mark.parametrize("close", [False, True], ids=["keepalive", "connection-close"])
def test_reload_every_second_under_wrk_loses_nothing(cluster, close):
    lb, port, conf = cluster
    wrk = start_wrk(port, seconds=20, connections=20, close=close)
    before_last: set[int] = set()
    try:
        for i in range(18):
            time.sleep(1.0)
            lb.write_conf(conf(3 if i % 2 == 0 else 1))
            lb.remember_tree()
            before_last = {c.pid for c in psutil.Process(lb.master_pid).children()}
            assert lb.cli("-s", "reload").returncode == 0
    finally:
        result = wrk_result(wrk)
    assert result.requests > 1000, result.output
    assert result.errors == 0, result.output

    def settled() -> bool:
        log = lb.error_log()
        newest = re.findall(r"starting generation (\d+)", log)[-1]
        pids = lb.worker_pids()
        return (f"generation {newest} ready" in log and len(pids) == 2
                and not before_last & set(pids))

    wait_for(settled, timeout=15, message=lambda: f"workers: {lb.worker_pids()}\n"
             f"{lb.error_log()[-2000:]}")
    time.sleep(1.0)
    assert len(lb.worker_pids()) == 2  # no older generation left behind


def test_killed_worker_under_load_costs_only_its_own_requests(cluster):
    lb, port, _ = cluster
    clients = LoadClient(port, threads=6).start()
    try:
        time.sleep(1.0)
        victim, survivor = lb.worker_pids()
        victim_conns = len(psutil.Process(victim).net_connections(kind="tcp"))
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: len(lb.worker_pids()) == 2 and victim not in lb.worker_pids(),
                 timeout=2, interval=0.02, message="worker not replaced")
        assert time.monotonic() - t0 < 1.0
        time.sleep(1.0)
    finally:
        clients.stop()
    assert clients.ok > 100
    # At most one failed request per client connection the dead worker held.
    assert len(clients.failures) <= min(6, victim_conns), clients.failures


def test_quick_reloads_keep_at_most_two_generations_and_apply_the_last(cluster):
    lb, port, conf = cluster
    master = psutil.Process(lb.master_pid)
    lb.write_conf(conf(3))
    assert lb.cli("-s", "reload").returncode == 0
    lb.write_conf(conf(5))
    assert lb.cli("-s", "reload").returncode == 0
    most = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        most = max(most, len(master.children()))
        time.sleep(0.01)
    assert most <= 4, f"{most} workers at once: more than two generations of 2"
    assert len(lb.worker_pids()) == 2
    # No orphans: every forklb worker on the machine that came from this test's
    # master is still its child (none re-parented to init).
    for proc in psutil.process_iter(["ppid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("forklb: worker process") and proc.info["ppid"] == 1:
            raise AssertionError(f"orphaned worker {proc.pid}")
    # The newest file (weights 5:1) is what serves: 6 requests, 5 to web01.
    from harness import http_request

    bodies = [http_request(port, "/").text.strip() for _ in range(6)]
    assert bodies.count("web01") == 5, bodies
