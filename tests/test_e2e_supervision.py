"""Supervision and process set-up: stuck workers, privileges, limits, pid files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

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


def test_worker_priority_is_the_workers_nice_value(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory, "worker_priority -5;")
    master_nice = psutil.Process(lb.master_pid).nice()
    for pid in lb.worker_pids():
        assert psutil.Process(pid).nice() == -5
    assert master_nice == os.getpriority(os.PRIO_PROCESS, 0)  # the master keeps its own
    assert http_request(port).text == "b1\n"


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


def _pids_cgroup(name: str) -> Path:
    """A new cgroup of the pids controller (v1 or v2), for a test to put a process tree
    in and limit its forks; it must exist here, so no pids controller is a failure."""
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and (
                root.name == "pids" or "pids" in _read(root / "cgroup.subtree_control")):
            group = root / name
            group.mkdir()
            return group
    raise AssertionError("no pids cgroup controller (v1 /sys/fs/cgroup/pids or v2 with pids "
                         "enabled) to limit forks with")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_failed_fork_is_logged_and_tried_again(forklb_factory, py_backend_factory):
    """fork() failing (EAGAIN: a process limit, here a cgroup's pids.max) costs the
    master nothing: nginx's alert, the slot tried again each second, a reload refused."""
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=2))
    group = _pids_cgroup(f"forklb-test-{os.getpid()}-{port}")
    try:
        # The master starts inside the group (its tasks, threads included, count there).
        lb._spawn(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *lb.argv()],
                  env=lb._env())
        lb._wait_ready([port], 10)
        victim, other = lb.wait_workers(2)
        wait_for(lambda: "all workers ready" in lb.error_log(), timeout=10)
        tasks = int((group / "pids.current").read_text())
        (group / "pids.max").write_text(f"{tasks - 1}\n")  # room for all but one task
        os.kill(victim, signal.SIGKILL)
        alert = ('fork() failed while spawning "worker process" '
                 "(11: Resource temporarily unavailable)")
        wait_for(lambda: lb.error_log().count(alert) >= 2, timeout=5,
                 message=lambda: f"no retried fork alert:\n{lb.error_log()}")
        assert lb.running and lb.worker_pids() == [other]
        assert http_request(port).text == "b1\n"  # the other worker serves meanwhile

        # A reload (a new generation, same config) whose workers cannot be forked
        # keeps the running one.
        os.kill(lb.master_pid, signal.SIGHUP)
        wait_for(lambda: "new workers failed to start; keeping the running configuration"
                 in lb.error_log(), timeout=10, message=lambda: lb.error_log())
        assert lb.worker_pids() == [other]

        (group / "pids.max").write_text("max\n")  # the limit lifted: the slot refills
        new = wait_for(lambda: [p for p in lb.worker_pids() if p != other], timeout=5,
                       message=lambda: f"no worker forked again:\n{lb.error_log()}")
        assert other in lb.worker_pids() and victim not in new
        wait_for(lambda: all(http_request(port).text == "b1\n" for _ in range(4)), timeout=5)
    finally:
        lb.stop()
        wait_for(lambda: not _read(group / "cgroup.procs").strip(), timeout=10,
                 message=lambda: f"tasks left in {group}: {_read(group / 'cgroup.procs')}")
        group.rmdir()
