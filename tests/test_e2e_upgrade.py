"""Binary upgrade (USR2, WINCH, QUIT), systemd readiness and socket activation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from harness import free_port, http_request, pid_alive, proxy_conf, wait_for
from load import LoadClient


def _lb(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=2))
    lb.start(wait_ports=[port], workers=2)
    return lb, port


def _new_master(lb, old_pid: int) -> int:
    return wait_for(lambda: (p := lb.read_pid_file()) not in (None, old_pid) and p, timeout=10,
                    message=lambda: f"no new pid in pid file\n{lb.error_log()}")


def test_usr2_then_quit_under_load_loses_nothing(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    old = lb.master_pid
    keepalive = LoadClient(port, threads=3).start()
    closing = LoadClient(port, threads=2, close=True).start()
    try:
        time.sleep(0.5)
        os.kill(old, signal.SIGUSR2)
        new = _new_master(lb, old)
        assert lb.pid_path.with_name("forklb.pid.oldbin").read_text().strip() == str(old)
        # Both masters serve on the same sockets until the old one is told to go.
        wait_for(lambda: len([c for c in _children(new) if "worker" in c]) == 2, timeout=10)
        time.sleep(0.5)
        os.kill(old, signal.SIGQUIT)
        wait_for(lambda: not pid_alive(old), timeout=15, message="old master did not exit")
        time.sleep(0.5)
    finally:
        keepalive.stop()
        closing.stop()
    try:
        assert keepalive.failures == [] and closing.failures == []
        assert keepalive.ok > 50 and closing.ok > 20
        assert lb.read_pid_file() == new
        assert not lb.pid_path.with_name("forklb.pid.oldbin").exists()
        assert http_request(port).text == "b1\n"
        # The new master answers to the CLI as usual.
        assert lb.cli("-s", "stop").returncode == 0
        wait_for(lambda: not pid_alive(new), timeout=10)
    finally:
        if pid_alive(new):
            os.kill(new, signal.SIGKILL)


def _children(pid: int) -> list[str]:
    import psutil

    try:
        return [" ".join(c.cmdline()) for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def test_failed_upgrade_restores_pid_file_and_keeps_serving(forklb_factory,
                                                            py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    old = lb.master_pid
    # The new binary reads the (now broken) config and exits 1.
    lb.write_conf(lb.conf_path.read_text().replace("proxy_pass", "proxy_pas"))
    os.kill(old, signal.SIGUSR2)
    wait_for(lambda: "new binary process" in lb.error_log() and "keeps serving"
             in lb.error_log(), timeout=10, message=lb.error_log)
    assert lb.read_pid_file() == old
    assert not lb.pid_path.with_name("forklb.pid.oldbin").exists()
    assert http_request(port).text == "b1\n"


def test_winch_stops_workers_and_hup_brings_them_back(forklb_factory, py_backend_factory):
    lb, port = _lb(forklb_factory, py_backend_factory)
    workers = lb.worker_pids()
    os.kill(lb.master_pid, signal.SIGWINCH)
    wait_for(lambda: not any(pid_alive(p) for p in workers) and not lb.worker_pids(),
             timeout=10, message="workers still running after WINCH")
    time.sleep(1.0)
    assert lb.worker_pids() == []  # not respawned
    assert lb.running
    os.kill(lb.master_pid, signal.SIGHUP)
    lb.wait_workers(2, timeout=10)
    wait_for(lambda: http_request(port).status == 200, timeout=5)


def test_systemd_notify_ready(forklb_factory, py_backend_factory, tmp_path):
    path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(10)
    try:
        backend = py_backend_factory("name", name="b1")
        port = free_port()
        lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=2),
                            env={"NOTIFY_SOCKET": path})
        lb.start(wait_ports=[port])
        message = notify.recv(4096).decode()
        assert "READY=1" in message
        assert f"MAINPID={lb.master_pid}" in message
        lb.cli("-s", "stop")
        assert "STOPPING=1" in notify.recv(4096).decode()
    finally:
        notify.close()


def test_systemd_socket_activation(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=2))
    # Like systemd: the socket is fd 3, LISTEN_PID is the service's own pid.
    code = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
            "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
            "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(listener.fileno()),
                             *lb.argv()[1:]], pass_fds=(listener.fileno(),), cwd=lb.prefix,
                            env=lb._env(), stderr=subprocess.PIPE, text=True)
    listener.close()  # only the forklb master holds it now
    try:
        wait_for(lambda: lb.read_pid_file() == proc.pid, timeout=10,
                 message=lambda: lb.error_log())
        wait_for(lambda: _ok(port), timeout=10, message=lambda: lb.error_log())
        assert "bind()" not in lb.error_log()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def _ok(port: int) -> bool:
    try:
        return http_request(port).status == 200
    except OSError:
        return False


def test_usr2_then_quit_under_wrk_keepalive_and_close(nginx_backend_factory, forklb_factory):
    from load import start_wrk, wrk_result

    backend = nginx_backend_factory("web01")
    port = free_port()
    lb = forklb_factory(proxy_conf(port=port, backend=backend.port, workers=2))
    lb.start(wait_ports=[port], workers=2)
    old = lb.master_pid
    runs = [start_wrk(port, seconds=8, connections=10, close=close) for close in (False, True)]
    new = None
    try:
        time.sleep(1.5)
        os.kill(old, signal.SIGUSR2)
        new = _new_master(lb, old)
        wait_for(lambda: len([c for c in _children(new) if "worker" in c]) == 2, timeout=10)
        time.sleep(1.0)
        os.kill(old, signal.SIGQUIT)
        wait_for(lambda: not pid_alive(old), timeout=15, message="old master did not exit")
    finally:
        results = [wrk_result(w) for w in runs]
        if new is not None:
            os.kill(new, signal.SIGTERM)
            wait_for(lambda: not pid_alive(new), timeout=10)
    for r in results:
        assert r.requests > 500, r.output
        assert r.errors == 0, r.output
