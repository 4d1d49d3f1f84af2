"""The sidecar process: supervised like a worker, reports every process's resources."""

from __future__ import annotations

import json
import os
import signal
import time

from harness import free_port, http_request, pid_alive, proxy_conf, wait_for


def _lb(forklb_factory, py_backend_factory, with_sidecar=True):
    backend = py_backend_factory("name", name="b1")
    port, side = free_port(), free_port()
    block = f"sidecar {{ listen 127.0.0.1:{side}; }}" if with_sidecar else ""
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=2, main=block))
    lb.start(wait_ports=[port] + ([side] if with_sidecar else []), workers=2)
    return lb, port, side


def _status(port: int) -> dict:
    r = http_request(port, "/status")
    assert r.status == 200 and r.header("content-type") == "application/json"
    return json.loads(r.body)


def _sidecars(lb) -> list[int]:
    from harness import _child_pids_matching

    return _child_pids_matching(lb.master_pid, "sidecar process")


def test_status_reports_cpu_rss_and_fds_of_every_process(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory)
    for _ in range(20):
        http_request(port)
    def four() -> dict | None:
        status = _status(side)
        return status if len(status["processes"]) == 4 else None

    status = wait_for(four, timeout=5, message="status does not list 4 processes")
    roles = sorted(p["role"] for p in status["processes"])
    assert roles == ["master", "sidecar", "worker", "worker"]
    assert status["master_pid"] == lb.master_pid
    workers = {p["pid"]: p for p in status["processes"] if p["role"] == "worker"}
    assert set(workers) == set(lb.worker_pids())
    for p in status["processes"]:
        assert p["rss_bytes"] > 1_000_000
        assert p["open_fds"] > 3
        assert p["cpu_user_seconds"] + p["cpu_system_seconds"] > 0
    page = http_request(side, "/")
    assert page.status == 200 and b"<table>" in page.body
    assert http_request(side, "/nothing").status == 404


def test_sidecar_is_respawned_and_follows_reloads(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory)
    (first,) = wait_for(lambda: _sidecars(lb), timeout=5)
    os.kill(first, signal.SIGKILL)
    t0 = time.monotonic()
    (second,) = wait_for(lambda: [p for p in _sidecars(lb) if p != first], timeout=3,
                         interval=0.02)
    assert time.monotonic() - t0 < 1.0
    wait_for(lambda: _status(side)["master_pid"] == lb.master_pid, timeout=5)
    assert lb.cli("-s", "reload").returncode == 0
    wait_for(lambda: not pid_alive(second) and len(_sidecars(lb)) == 1, timeout=10,
             message="the old sidecar did not leave on reload")
    assert _status(side)["master_pid"] == lb.master_pid
    assert http_request(port).status == 200


def test_no_sidecar_block_no_sidecar(forklb_factory, py_backend_factory):
    lb, port, _ = _lb(forklb_factory, py_backend_factory, with_sidecar=False)
    time.sleep(0.5)
    assert _sidecars(lb) == []
    assert http_request(port).status == 200
