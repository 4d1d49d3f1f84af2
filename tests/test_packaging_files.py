"""The shipped systemd unit and logrotate rules drive a real forklb correctly."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import psutil
from harness import REPO_ROOT, free_port, http_request, port_is_open, wait_for

UNIT = (REPO_ROOT / "conf" / "forklb.service").read_text()
LOGROTATE = (REPO_ROOT / "conf" / "logrotate.d" / "forklb").read_text()


def _command(line: str, prefix: str) -> list[str]:
    """A unit's forklb command line, pointed at a test prefix and this Python."""
    argv = shlex.split(line.replace("/etc/forklb", prefix))
    assert argv[0] == "/usr/local/bin/forklb", argv
    return [sys.executable, "-m", "forklb", *argv[1:]]


def _directive(text: str, key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", text, re.M)
    assert m, f"{key}= missing"
    return m.group(1)


def test_unit_is_notify_and_reloads_through_the_cli(forklb_factory):
    assert _directive(UNIT, "Type") == "notify"
    assert _directive(UNIT, "KillSignal") == "SIGQUIT"
    port = free_port()
    lb = forklb_factory("events { }\nhttp { access_log off; server { listen 127.0.0.1:"
                        f"{port}; location / {{ return_x; }} }} }}\n")
    prefix = str(lb.prefix)
    conf = lb.prefix / "forklb.conf"  # the unit expects PREFIX/forklb.conf
    env = lb._env()

    def run(key: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_command(_directive(UNIT, key), prefix), cwd=prefix, env=env,
                              capture_output=True, text=True, timeout=30)

    conf.write_text(lb.conf_path.read_text())
    pre = run("ExecStartPre")  # a bad config stops the service from starting
    assert pre.returncode == 1 and 'unknown directive "return_x"' in pre.stderr
    conf.write_text(lb.conf_path.read_text().replace("location / { return_x; }", ""))
    assert run("ExecStartPre").returncode == 0
    start = subprocess.Popen(_command(_directive(UNIT, "ExecStart"), prefix), cwd=prefix,
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_is_open(port), timeout=10,
                 message=lambda: (lb.prefix / "logs" / "error.log").read_text())
        assert http_request(port).status == 404
        workers = {c.pid for c in psutil.Process(start.pid).children()}
        reload = run("ExecReload")
        assert reload.returncode == 0, reload.stderr
        wait_for(lambda: (now := {c.pid for c in psutil.Process(start.pid).children()})
                 and not now & workers, timeout=10, message="workers not replaced by reload")
        assert _directive(UNIT, "PIDFile") == "/etc/forklb/logs/forklb.pid"
        assert (lb.prefix / "logs" / "forklb.pid").read_text().strip() == str(start.pid)
    finally:
        start.send_signal(15)
        start.wait(15)


def test_logrotate_postrotate_reopens_logs(forklb_factory, py_backend_factory):
    backend = py_backend_factory("name", name="b1")
    port = free_port()
    lb = forklb_factory(f"events {{ }}\nhttp {{ upstream a {{ server 127.0.0.1:{backend.port}; }}"
                        f" server {{ listen 127.0.0.1:{port}; access_log logs/access.log; "
                        "location / { proxy_pass http://a; } } }\n")
    shutil.copy(lb.conf_path, lb.prefix / "forklb.conf")
    lb.start(wait_ports=[port])
    http_request(port, "/before")
    access = lb.prefix / "logs" / "access.log"
    wait_for(lambda: access.exists() and "/before" in access.read_text(), timeout=5)
    access.rename(lb.prefix / "logs" / "access.log.1")
    script = re.search(r"postrotate\n(.*?)\n\s*endscript", LOGROTATE, re.S).group(1).strip()
    script = script.replace("/usr/local/bin/forklb", f"{sys.executable} -m forklb")
    script = script.replace("/etc/forklb", str(lb.prefix))
    assert subprocess.run(["sh", "-c", script], env=lb._env(), timeout=30).returncode == 0
    wait_for(access.exists, timeout=5, message="postrotate did not reopen the access log")
    http_request(port, "/after")
    wait_for(lambda: "/after" in access.read_text(), timeout=5)
