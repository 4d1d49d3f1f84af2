"""grafana/: every dashboard and alert expression works against a real Prometheus.

Debian's prometheus scrapes a running forklb every second while traffic flows
through it (2xx, 5xx, retries off a refusing server, a server marked down, slow
requests, a reload, a worker kill -9, a failed reload); then every PromQL
expression of grafana/forklb-dashboard.json and grafana/alerts.yml is run
through the HTTP API and must be valid and return data.  promtool checks the
config and the rules and runs the rules' unit tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from harness import REPO_ROOT, free_port, http_request, wait_for, wait_port

GRAFANA = REPO_ROOT / "grafana"

CONF = """
worker_processes 2;
error_log logs/error.log notice;
events {{ }}
sidecar {{ listen 127.0.0.1:{side}; }}
http {{
    access_log off;
    upstream app {{
        server 127.0.0.1:{backend};
        server 127.0.0.1:{dead};
        keepalive 4;
        health_check interval=1s timeout=1s fails=1 passes=1;
    }}
    upstream gone {{ server 127.0.0.1:{backend} down; }}
    server {{
        listen 127.0.0.1:{port};
        server_name shop;
        location / {{ proxy_pass http://app; }}
        location /gone {{ proxy_pass http://gone; }}
    }}
}}
"""


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_checks_config_rules_and_rule_unit_tests():
    r = promtool("check", "config", str(GRAFANA / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "rules", str(GRAFANA / "alerts.yml"))
    assert r.returncode == 0 and "6 rules found" in r.stdout, r.stdout + r.stderr
    r = promtool("test", "rules", str(GRAFANA / "alerts_test.yml"))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, annotations, and the
    template variables' label_values() queries (as the PromQL Grafana sends)."""
    dash = json.loads((GRAFANA / "forklb-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        exprs.append(f"group by ({m.group(2)}) ({m.group(1)})")
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    """Grafana's template variables as the dashboard's "All" would send them."""
    for var in ("instance", "upstream", "server"):
        expr = expr.replace(f"${var}", ".*")
    return expr.replace("$__rate_interval", "1m").replace("$__range", "1m")


@pytest.fixture
def prometheus(tmp_path: Path):
    """Start Prometheus scraping the given sidecar port every second; yields query()."""
    procs: list[subprocess.Popen] = []

    def start(target_port: int):
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(GRAFANA / "alerts.yml")],
            "scrape_configs": [{"job_name": "forklb", "static_configs": [
                {"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        r = promtool("check", "config", str(config))
        assert r.returncode == 0, r.stdout + r.stderr
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait_port(port, timeout=40)

        def api(path: str, **params: str) -> dict:
            url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return json.load(resp)
            except urllib.error.HTTPError as e:
                body = e.read()
                try:
                    return json.loads(body)
                except ValueError:  # "Service Unavailable" while it starts
                    return {"status": "error", "error": body.decode(errors="replace"),
                            "data": {"result": []}}

        return api

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _get(port: int, path: str, expect: int) -> None:
    assert http_request(port, path).status == expect


def test_every_dashboard_and_alert_expression_returns_data(forklb_factory, py_backend_factory,
                                                           prometheus):
    backend = py_backend_factory("name", name="b1")
    port, side, dead = free_port(), free_port(), free_port()
    lb = forklb_factory(CONF.format(side=side, backend=backend.port, dead=dead, port=port))
    lb.start(wait_ports=[port, side], workers=2)
    api = prometheus(side)
    wait_for(lambda: api("query", query="forklb_build_info")["data"]["result"], timeout=40,
             message="prometheus does not scrape forklb")

    # Traffic: 2xx, retries off the refusing server (until it is marked failed),
    # 5xx from an upstream whose only server is down, a few slow requests for p99.
    for _ in range(40):
        _get(port, "/", 200)
    # 5xx start here: forklb_http_responses_total{class="5xx"} existed (at 0) before,
    # so rate() sees these very first ones.
    for _ in range(8):
        _get(port, "/gone", 502)
    slow = [threading.Thread(target=_get, args=(port, "/?__delay=1.2", 200)) for _ in range(3)]
    for t in slow:
        t.start()
    # A good reload, then more traffic through the new workers.
    old = lb.worker_pids()
    assert lb.cli("-s", "reload").returncode == 0
    lb.wait_workers_replaced(old, 2)
    for t in slow:
        t.join()
    for _ in range(20):
        _get(port, "/", 200)
    # A worker killed (restart counted), then a reload that fails.
    time.sleep(2)  # a scrape before the restart, so increase() sees it
    os.kill(lb.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: len(lb.worker_pids()) == 2, timeout=10)
    lb.write_conf(lb.conf_path.read_text().replace("events {", "bogus 1;\nevents {"))
    os.kill(lb.master_pid, signal.SIGHUP)  # forklb -s reload would refuse to send it
    wait_for(lambda: api("query", query="forklb_config_last_reload_successful == 0")
             ["data"]["result"], timeout=15, message="the failed reload is not scraped")

    failures = []
    for expr in dashboard_exprs() + alert_exprs():
        query = substitute(expr)
        answer: dict = {}

        def has_data(query=query, answer=answer) -> bool:
            answer.clear()
            answer.update(api("query", query=query))
            return answer.get("status") == "success" and bool(answer["data"]["result"])

        try:
            wait_for(has_data, timeout=5, interval=0.5)
        except AssertionError:
            failures.append(f"{query}\n  -> {answer}")
    assert not failures, "expressions without data:\n" + "\n".join(failures)

    rules = api("rules")["data"]["groups"][0]["rules"]
    assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
