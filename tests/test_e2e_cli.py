"""The forklb command line against real files and a real running master."""

from __future__ import annotations

from harness import free_port, http_request, wait_for

BASIC = """
events {{ }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root html; }}
    }}
}}
"""


def test_t_reports_ok(forklb_factory):
    lb = forklb_factory(BASIC.format(port=free_port()))
    r = lb.cli("-t")
    assert r.returncode == 0
    assert f"the configuration file {lb.conf_path} syntax is ok" in r.stderr
    assert f"configuration file {lb.conf_path} test is successful" in r.stderr


def test_t_names_file_line_and_directive_of_a_misspelling(forklb_factory):
    conf = "events { }\nhttp {\n    server {\n        locaton / { }\n    }\n}\n"
    lb = forklb_factory(conf)
    r = lb.cli("-t")
    assert r.returncode == 1
    assert f'forklb: [emerg] unknown directive "locaton" in {lb.conf_path}:4' in r.stderr
    assert f"configuration file {lb.conf_path} test failed" in r.stderr


def test_relative_conf_path_is_shown_as_given(forklb_factory):
    lb = forklb_factory("events { }\nhttp { server { locaton / { } } }\n")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "forklb", "-t", "-c", "conf/forklb.conf"],
                       cwd=lb.prefix, env=lb._env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert 'unknown directive "locaton" in conf/forklb.conf:2' in r.stderr


def test_T_dumps_every_file(forklb_factory):
    port = free_port()
    lb = forklb_factory(BASIC.format(port=port).replace("access_log off;",
                                                        "include mime.types; access_log off;"))
    r = lb.cli("-T")
    assert r.returncode == 0
    assert f"# configuration file {lb.conf_path}:" in r.stdout
    assert "mime.types:" in r.stdout and "text/html" in r.stdout


def test_g_directives_errors_say_command_line(forklb_factory):
    lb = forklb_factory(BASIC.format(port=free_port()))
    assert lb.cli("-t", "-g", "worker_processes 3;").returncode == 0
    r = lb.cli("-t", "-g", "worker_processes 3; bogus 1;")
    assert r.returncode == 1
    assert 'unknown directive "bogus" in command line' in r.stderr


def test_signal_when_not_running_says_so_plainly(forklb_factory):
    lb = forklb_factory(BASIC.format(port=free_port()))
    r = lb.cli("-s", "reload")
    assert r.returncode == 1
    assert "forklb is not running (no pid file" in r.stderr
    assert "forklb.pid)" in r.stderr
    assert "invalid PID" not in r.stderr


def test_version(forklb_factory):
    lb = forklb_factory(BASIC.format(port=free_port()))
    r = lb.cli("-v")
    assert r.returncode == 0 and r.stderr.startswith("forklb version: forklb/")


def test_bad_reload_is_refused_and_old_config_keeps_serving(forklb_factory, tmp_path):
    port = free_port()
    lb = forklb_factory(BASIC.format(port=port))
    (lb.prefix / "html").mkdir()
    (lb.prefix / "html" / "index.html").write_text("v1\n")
    lb.start(wait_ports=[port], workers=1)
    workers = lb.worker_pids()
    good = BASIC.format(port=port)
    lb.write_conf(good.replace("root html;", "rooot html;"))
    r = lb.cli("-s", "reload")
    assert r.returncode == 1
    assert 'unknown directive "rooot"' in r.stderr
    # Nothing was sent: same workers, same answers.
    assert lb.worker_pids() == workers
    assert http_request(port).text == "v1\n"

    # A bad config that reaches the master anyway (kill -HUP) is logged, not applied.
    import os
    import signal

    os.kill(lb.master_pid, signal.SIGHUP)
    wait_for(lambda: 'unknown directive "rooot"' in lb.error_log(), timeout=5,
             message=lb.error_log)
    assert lb.worker_pids() == workers
    assert http_request(port).text == "v1\n"


def test_second_master_on_same_pid_file_is_refused(forklb_factory):
    port = free_port()
    lb = forklb_factory(BASIC.format(port=port))
    lb.start(wait_ports=[port], workers=1)
    r = lb.cli()
    assert r.returncode == 1
    assert f"forklb is already running (pid {lb.master_pid}" in r.stderr
