"""Sidecar metrics: exact counters across reloads and kill -9, the control endpoints.

Real forklb processes, real backends, scraped over HTTP and parsed with
prometheus-client's own parser.
"""

from __future__ import annotations

import os
import signal
import subprocess

from harness import HttpClient, free_port, http_request, wait_for
from prometheus_client.parser import text_string_to_metric_families

CONF = """
worker_processes 2;
error_log logs/error.log notice;
events {{ }}
sidecar {{
    listen 127.0.0.1:{side};
    {sidecar_extra}
}}
http {{
    access_log off;
    upstream app {{ server 127.0.0.1:{backend}; server 127.0.0.1:{dead} max_fails=0; }}
    server {{
        listen 127.0.0.1:{port};
        server_name {name};
        location / {{ proxy_pass http://app; }}
        location /fixed {{ return 204; }}
    }}
}}
"""


def scrape(side: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = http_request(side, "/metrics")
    assert r.status == 200, r
    assert r.header("content-type").startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == want for k, want in labels.items()))


def _lb(forklb_factory, py_backend_factory, name="example", sidecar_extra="", token=None):
    backend = py_backend_factory("name", name="b1")
    port, side, dead = free_port(), free_port(), free_port()
    lb = forklb_factory(CONF.format(side=side, backend=backend.port, dead=dead, port=port,
                                    name=name, sidecar_extra=sidecar_extra))
    if token is not None:
        lb.path("token").write_text(token + "\n")  # admin_token_file is relative to the prefix
    lb.start(wait_ports=[port, side], workers=2)
    return lb, port, side


def _drive(port: int, n: int) -> None:
    """``n`` requests: keep-alive ones on two connections, some Connection: close."""
    clients = [HttpClient(port), HttpClient(port)]
    try:
        for i in range(n):
            if i % 5 == 4:
                assert http_request(port, "/fixed").status == 204
            else:
                assert clients[i % 2].get("/").status == 200
    finally:
        for c in clients:
            c.close()


def test_request_counter_is_exact_across_reload_and_kill9(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory)

    def requests_are(n: int) -> bool:
        return total(scrape(side), "forklb_http_requests_total") == n

    _drive(port, 100)
    wait_for(lambda: requests_are(100), timeout=5,
             message=lambda: f"requests_total {total(scrape(side), 'forklb_http_requests_total')}")
    samples = scrape(side)
    assert total(samples, "forklb_http_requests_total", code="204") == 20
    assert total(samples, "forklb_http_requests_total", code="200", method="GET",
                 server_name="example") == 80
    assert total(samples, "forklb_http_request_duration_seconds_count") == 100
    assert total(samples, "forklb_upstream_responses_total", upstream="app") == 80

    # A reload that renames the server block: the old name keeps its count.
    old = lb.worker_pids()
    lb.write_conf(lb.conf_path.read_text().replace("server_name example;",
                                                   "server_name renamed;"))
    assert lb.cli("-s", "reload").returncode == 0
    lb.wait_workers_replaced(old, 2)
    _drive(port, 50)
    wait_for(lambda: requests_are(150), timeout=5)
    samples = scrape(side)
    assert total(samples, "forklb_http_requests_total", server_name="example") == 100
    assert total(samples, "forklb_http_requests_total", server_name="renamed") == 50
    assert total(samples, "forklb_config_reloads_total", result="success") == 1

    # kill -9 a worker: what it counted stays, its replacement goes on counting.
    victim = lb.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(lb.worker_pids()) == 2 and victim not in lb.worker_pids(), timeout=10)
    assert requests_are(150)
    _drive(port, 50)
    wait_for(lambda: requests_are(200), timeout=5)
    samples = scrape(side)
    assert total(samples, "forklb_worker_restarts_total", role="worker", reason="killed") == 1
    assert total(samples, "forklb_connections_accepted_total") >= 200 * 1 / 5


def test_upstream_failures_retries_and_state(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory)
    for _ in range(10):
        assert http_request(port, "/").status == 200
    samples = wait_for(lambda: (s := scrape(side)) and
                       total(s, "forklb_upstream_responses_total") == 10 and s, timeout=5)
    dead = [dict(lbl)["server"] for (n, lbl), v in samples.items()
            if n == "forklb_upstream_failures_total" and dict(lbl)["reason"] == "refused" and v]
    assert len(dead) == 1
    refused = total(samples, "forklb_upstream_failures_total", reason="refused")
    assert refused >= 2  # round robin (max_fails=0) keeps sending some to the refusing peer
    assert total(samples, "forklb_upstream_retries_total") == refused
    assert total(samples, "forklb_upstream_server_state", server=dead[0], state="up") == 1
    assert total(samples, "forklb_upstream_connect_time_seconds_count") >= 1
    assert total(samples, "forklb_upstream_response_time_seconds_count") == 10
    assert total(samples, "forklb_build_info") == 1
    assert total(samples, "forklb_workers", generation="1", ready="1") == 2


def test_health_ready_status_json_and_openmetrics(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory)
    assert http_request(side, "/-/healthy").status == 200
    # Worker processes exist before they accept: ready follows their "R" to the master.
    wait_for(lambda: http_request(side, "/-/ready").status == 200, timeout=10)
    http_request(port, "/")
    # The worker counts in its log phase, just after the response went out.
    status = wait_for(lambda: (st := http_request(side, "/status.json").json())["requests"]
                      and st, timeout=5)
    servers = status["upstreams"]["app"]["servers"]
    assert len(servers) == 2
    assert sorted(s["responses"] for s in servers) == [0, 1]
    answered = next(s for s in servers if s["responses"])
    assert answered["state"] == "up" and answered["p50_seconds"] > 0
    assert status["requests"] == 1
    om = http_request(side, "/metrics",
                      headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.header("content-type").startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    assert http_request(side, "/status", headers={"Accept": "text/html"}).header(
        "content-type").startswith("text/html")


def test_metrics_outside_allow_is_403(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory,
                         sidecar_extra="allow 10.0.0.0/8; deny all;")
    r = http_request(side, "/metrics")
    assert r.status == 403
    assert http_request(side, "/status.json").status == 403


def test_reload_endpoint_needs_token_and_refuses_bad_config(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory,
                         sidecar_extra="admin_token_file token;", token="s3cret")
    assert http_request(side, "/-/reload", method="POST").status == 401
    assert http_request(side, "/-/reload", method="POST",
                        headers={"Authorization": "Bearer wrong"}).status == 401
    auth = {"Authorization": "Bearer s3cret"}
    good = lb.conf_path.read_text()
    lb.write_conf(good.replace("location /fixed", "location /fixed { bogus_directive 1; }\n"
                               "        location /other"))
    old = lb.worker_pids()
    r = http_request(side, "/-/reload", method="POST", headers=auth)
    assert r.status == 400
    assert 'unknown directive "bogus_directive"' in r.json()["error"]
    assert "forklb.conf:" in r.json()["error"]
    assert sorted(lb.worker_pids()) == sorted(old)
    lb.write_conf(good.replace("return 204", "return 202"))
    r = http_request(side, "/-/reload", method="POST", headers=auth)
    assert r.status == 200, r
    lb.wait_workers_replaced(old, 2)
    wait_for(lambda: http_request(port, "/fixed").status == 202, timeout=10)
    new_side = wait_for(lambda: scrape(side), timeout=5)
    assert total(new_side, "forklb_config_reloads_total", result="success") == 1


def test_promtool_check_metrics_is_clean(forklb_factory, py_backend_factory):
    lb, port, side = _lb(forklb_factory, py_backend_factory)
    for path in ("/", "/fixed", "/"):
        http_request(port, path)
    text = http_request(side, "/metrics").body
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r
