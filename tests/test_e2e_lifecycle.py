"""Master and worker lifecycle: start-up errors, stop, respawn, master death."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
from harness import (
    HttpClient,
    free_port,
    http_request,
    pid_alive,
    port_is_open,
    proxy_conf,
    wait_for,
    wait_port_closed,
)


def _lb(forklb_factory, py_backend_factory, workers=2):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=workers))
    lb.start(wait_ports=[port], workers=workers)
    return lb, port


def test_busy_port_is_a_clear_startup_error(forklb_factory):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        lb = forklb_factory(proxy_conf(port=port, backend=9))
        r = lb.cli()
        assert r.returncode == 1
        assert (f"forklb: [emerg] bind() to 127.0.0.1:{port} failed (98: Address already in use)"
                in r.stderr)
        assert not lb.path("logs/forklb.pid").exists()
    finally:
        holder.close()


def test_stop_frees_port_and_ends_every_process(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    pids = [lb.master_pid, *lb.worker_pids()]
    assert http_request(port).status == 200
    r = lb.cli("-s", "stop")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10,
             message="processes still alive after -s stop")
    wait_port_closed(port, timeout=5)
    assert not lb.pid_path.exists()


def test_quit_finishes_in_flight_request(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory, workers=1)
    client = HttpClient(port, timeout=15)
    client.send(b"GET /?__delay=5.0 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)  # the request is in flight at the backend
    t_quit = time.monotonic()
    assert lb.cli("-s", "quit").returncode == 0
    r = client.read_response()
    assert r.status == 200 and r.text == "b1\n"
    assert r.header("connection") == "close"
    wait_for(lambda: not lb.running, timeout=10, message="master did not exit after QUIT")
    assert time.monotonic() - t_quit >= 4.5  # it waited for the slow request
    assert not port_is_open(port)


def test_killed_worker_is_replaced_within_one_second(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    victim, survivor = lb.worker_pids()
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    new = wait_for(lambda: [p for p in lb.worker_pids() if p not in (victim, survivor)],
                   timeout=3, interval=0.02, message="no replacement worker")
    assert time.monotonic() - t0 < 1.0
    assert survivor in lb.worker_pids()
    assert len(new) == 1
    wait_for(lambda: all(http_request(port).status == 200 for _ in range(4)), timeout=5)
    assert "exited on signal 9 (SIGKILL)" in lb.error_log()


def test_workers_exit_when_master_is_killed(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    workers = lb.worker_pids()
    os.kill(lb.master_pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=2.0,
             message="workers outlived their master")


def test_process_titles_name_each_role(forklb_factory, py_backend_factory):
    lb, _ = _lb(forklb_factory, py_backend_factory)
    assert " ".join(psutil.Process(lb.master_pid).cmdline()).startswith(
        "forklb: master process")
    for pid in lb.worker_pids():
        assert " ".join(psutil.Process(pid).cmdline()).startswith("forklb: worker process")


def test_worker_processes_auto_uses_usable_cpus(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers="auto"))
    expected = len(psutil.Process().cpu_affinity())
    lb.start(wait_ports=[port], workers=expected)
    assert len(lb.worker_pids()) == expected


def test_master_never_imports_gevent(forklb_factory, py_backend_factory):
    lb, _ = _lb(forklb_factory, py_backend_factory, workers=1)
    maps = open(f"/proc/{lb.master_pid}/maps").read()
    assert "gevent" not in maps  # no gevent extension module mapped in the master
    worker_maps = open(f"/proc/{lb.worker_pids()[0]}/maps").read()
    assert "gevent" in worker_maps


def test_worker_dying_at_boot_is_fatal_with_clear_error(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port,
                                   access_log="/proc/forbidden/access.log"))
    r = lb.cli()
    assert r.returncode == 1
    assert "worker process exited on start-up" in r.stderr


def test_reopen_starts_new_log_files(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port,
                                   access_log="logs/access.log"))
    lb.start(wait_ports=[port], workers=1)
    access = lb.path("logs/access.log")
    http_request(port, "/first")
    wait_for(lambda: access.exists() and "/first" in access.read_text(), timeout=5)
    access.rename(lb.path("logs/access.log.1"))
    assert lb.cli("-s", "reopen").returncode == 0
    wait_for(access.exists, timeout=5, message="access.log not reopened")
    http_request(port, "/second")
    wait_for(lambda: "/second" in access.read_text(), timeout=5)
    assert "/second" not in lb.path("logs/access.log.1").read_text()


def test_daemon_on_detaches_and_stops(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, main="daemon on;"))
    r = lb.cli(timeout=10)  # returns once the master has detached
    assert r.returncode == 0, r.stderr
    pid = wait_for(lb.read_pid_file, timeout=5, message="no pid file")
    try:
        assert wait_for(lambda: port_is_open(port), timeout=5)
        assert http_request(port).text == "b1\n"
    finally:
        assert lb.cli("-s", "stop").returncode == 0
    wait_for(lambda: not pid_alive(pid), timeout=10, message="daemon master still alive")
    wait_port_closed(port, timeout=5)


def test_reload_moves_listener_and_closes_the_old_address(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    new_port = free_port()
    old = lb.worker_pids()
    lb.write_conf(lb.conf_path.read_text().replace(f"127.0.0.1:{port}",
                                                   f"127.0.0.1:{new_port}"))
    assert lb.cli("-s", "reload").returncode == 0
    lb.wait_workers_replaced(old, 2)
    assert http_request(new_port).text == "b1\n"
    wait_port_closed(port, timeout=10)


def test_worker_shutdown_timeout_bounds_a_reload(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port,
                                   main="worker_shutdown_timeout 1s;"))
    lb.start(wait_ports=[port], workers=1)
    (old,) = lb.worker_pids()
    client = HttpClient(port, timeout=15)
    client.send(b"GET /?__delay=6 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    assert lb.cli("-s", "reload").returncode == 0
    wait_for(lambda: not pid_alive(old), timeout=6, message="old worker outlived its timeout")
    assert time.monotonic() - t0 < 4.0  # 1 s shutdown timeout, not the 6 s request
    assert client.server_closed(timeout=2)
    assert "worker_shutdown_timeout" in lb.error_log()
    assert http_request(port).status == 200
