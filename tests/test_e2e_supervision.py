"""Supervision and process set-up: stuck workers, privileges, limits, pid files."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
from harness import free_port, http_request, pid_alive, proxy_conf, wait_for


def _lb(forklb_factory, py_backend_factory, main="", workers=2):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=workers,
                                   main=main))
    lb.start(wait_ports=[port], workers=workers)
    return lb, port


def test_stuck_worker_is_killed_and_replaced(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory, "worker_timeout 1s;")
    wait_for(lambda: "all workers ready" in lb.error_log(), timeout=10)
    victim, other = lb.worker_pids()
    os.kill(victim, signal.SIGSTOP)  # its event loop stops turning
    try:
        wait_for(lambda: not pid_alive(victim), timeout=5, message="stuck worker not killed")
        wait_for(lambda: len([p for p in lb.worker_pids() if p not in (victim, other)]) == 1,
                 timeout=3, message="no replacement")
    finally:
        if pid_alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert "is stuck (event loop silent for" in lb.error_log()
    assert other in lb.worker_pids()  # healthy workers are left alone
    assert http_request(port).status == 200


def test_user_directive_drops_worker_privileges(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory, "user nobody nogroup;")
    nobody = psutil.Process(lb.worker_pids()[0])

    def dropped(pid: int) -> bool:  # titles are set before root is given up: wait for it
        uids, gids = psutil.Process(pid).uids(), psutil.Process(pid).gids()
        return uids.real == uids.effective == gids.real == gids.effective == 65534

    for pid in lb.worker_pids():
        wait_for(lambda pid=pid: dropped(pid), timeout=5, message=f"worker {pid} still root")
    assert psutil.Process(lb.master_pid).uids().effective == 0
    assert nobody.is_running()
    assert http_request(port).text == "b1\n"


def test_rlimit_and_cpu_affinity(forklb_factory, py_backend_factory):
    usable = sorted(psutil.Process().cpu_affinity())
    lb, _ = _lb(forklb_factory, py_backend_factory,
                "worker_rlimit_nofile 2048; worker_cpu_affinity auto;", workers=len(usable))
    seen = []
    for pid in lb.worker_pids():
        proc = psutil.Process(pid)
        assert proc.rlimit(psutil.RLIMIT_NOFILE) == (2048, 2048)
        affinity = proc.cpu_affinity()
        assert len(affinity) == 1
        seen.append(affinity[0])
    assert sorted(seen) == usable  # one CPU each, all of them used


def test_low_port_without_the_privilege_is_a_clear_error(forklb_factory):
    # Root without CAP_NET_BIND_SERVICE is refused low ports like any other user.
    lb = forklb_factory("events { }\nhttp { access_log off; server { listen 127.0.0.1:81; } }\n")
    r = subprocess.run(["setpriv", "--inh-caps=-net_bind_service",
                        "--bounding-set=-net_bind_service", *lb.argv()], cwd=lb.prefix,
                       env=lb._env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert ("forklb: [emerg] bind() to 127.0.0.1:81 failed (13: Permission denied); "
            "ports below 1024 need root (or CAP_NET_BIND_SERVICE)") in r.stderr
    assert not lb.pid_path.exists()


def test_signal_to_a_foreign_pid_is_refused(forklb_factory):
    lb = forklb_factory("events { }\n")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lb.pid_path.parent.mkdir(parents=True, exist_ok=True)
        lb.pid_path.write_text(f"{sleeper.pid}\n")
        r = lb.cli("-s", "stop")
        assert r.returncode == 1
        assert f"pid {sleeper.pid} in" in r.stderr and "is not a forklb master" in r.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None  # nothing was sent to it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_pid_file_is_replaced(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port))
    dead = subprocess.Popen(["true"])
    dead.wait()
    lb.pid_path.parent.mkdir(parents=True, exist_ok=True)
    lb.pid_path.write_text(f"{dead.pid}\n")
    lb.start(wait_ports=[port], workers=1)
    assert lb.read_pid_file() == lb.master_pid


def test_unwritable_pid_path_is_a_clear_error(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port,
                                   main="pid /proc/forklb/forklb.pid;"))
    r = lb.cli(timeout=20)
    assert r.returncode == 1
    assert 'forklb: [emerg] open() "/proc/forklb/forklb.pid" failed' in r.stderr


def test_unwritable_error_log_is_a_clear_error(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port,
                                   error_log="/proc/forklb/error.log"))
    r = lb.cli(timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip() == ('forklb: [emerg] open() "/proc/forklb/error.log" failed '
                                "(2: No such file or directory)")
