"""Smoke test of the benchmark harness (``python -m bench``), with forklb only.

Runs a tiny real benchmark (Debian nginx backends, the upload sink, forklb, wrk, curl) and
checks that ``results.json`` holds sane figures, plus unit checks of the report's
arithmetic. The numbers themselves are not judged: only that they were measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))

from bench import report  # noqa: E402


def _run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(out), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.exists(), f"no results.json\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def test_quick_run_against_forklb_writes_sane_results(tmp_path: Path) -> None:
    proc, results = _run_bench(
        tmp_path, "--proxy", "forklb",
        "--scenario", "keepalive-small,upload-1g,idle-10k,access-log,metrics",
        "--duration", "1", "--warmup", "1", "--upload-mib", "64", "--idle-conns", "300")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "== keepalive-small" in proc.stdout and "forklb" in proc.stdout

    meta = results["meta"]
    assert meta["rounds"] == 1 and meta["duration_s"] == 1
    assert "nginx" in meta["versions"]["nginx"]
    scen = results["scenarios"]
    assert set(scen) == {"keepalive-small", "upload-1g", "idle-10k", "access-log", "metrics"}

    ka = scen["keepalive-small"]["proxies"]["forklb"]
    assert len(ka["runs"]) == 1
    m = ka["median"]
    assert m["requests"] > 100 and m["rps"] > 50
    assert m["errors"] == 0
    assert 0 < m["p50_ms"] <= m["p99_ms"]
    assert 0 < m["cpu_us_per_req"] < 100_000
    assert m["workers"] == 2
    assert len(ka["runs"][0]["worker_cpu_share"]) == 2
    assert 0.5 <= m["busiest_worker_share"] <= 1.0
    assert 5_000 < m["peak_rss_kib_per_worker"] < 1_000_000
    # Only forklb ran: no ratio to nginx.
    assert scen["keepalive-small"]["ratio_forklb_nginx"] == {}

    up = scen["upload-1g"]["proxies"]["forklb"]["median"]
    assert up["errors"] == 0 and up["requests"] == 1
    assert up["gbps"] > 0 and up["cpu_s_per_gb"] > 0

    idle = scen["idle-10k"]["proxies"]["forklb"]["median"]
    assert idle["connections"] == 300 and idle["errors"] == 0
    assert idle["rss_per_conn_kib"] is not None and idle["rss_per_conn_kib"] < 1024

    # access-log measures its "log off" twin in the same rounds; the cost is derived.
    logged = scen["access-log"]["proxies"]
    assert set(logged) == {"forklb", "forklb log off"}
    assert all(p["median"]["rps"] > 50 and p["median"]["errors"] == 0 for p in logged.values())
    assert -1 < results["derived"]["forklb"]["access_log_cost"] < 1

    # metrics: forklb with its workers' counting on, and off (FORKLB_METRICS=off).
    counted = scen["metrics"]["proxies"]
    assert set(counted) == {"forklb", "forklb metrics off"}
    assert all(p["median"]["rps"] > 50 and p["median"]["errors"] == 0 for p in counted.values())
    assert -1 < results["derived"]["forklb"]["metrics_cost"] < 1


def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--scenario", "nope", "--output",
         str(tmp_path / "r.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "unknown scenario 'nope'" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_medians_ratios_and_derived_figures() -> None:
    runs = [{"rps": 10.0, "p99_ms": 3.0}, {"rps": 30.0, "p99_ms": None}, {"rps": 20.0}]
    assert report.medians(runs) == {"rps": 20.0, "p99_ms": 3.0}

    by_proxy = {"forklb": {"median": {"rps": 30.0, "gbps": None, "p99_ms": 4.0}},
                "nginx": {"median": {"rps": 40.0, "gbps": 1.0, "p99_ms": 2.0}}}
    assert report.ratios(by_proxy) == {"rps": 0.75, "p99_ms": 2.0}
    assert report.ratios({"forklb": by_proxy["forklb"]}) == {}

    def scen(main: float, baseline_key: str, baseline: float) -> dict:
        return {"proxies": {"forklb": {"median": {"rps": main}},
                            baseline_key: {"median": {"rps": baseline}}}}

    derived = report.derived({"access-log": scen(96.0, "forklb log off", 100.0),
                              "workers-1": scen(60.0, "forklb 2 workers", 100.0),
                              "keepalive-small": scen(1.0, "forklb log off", 1e9)})
    assert derived == {"forklb": {"access_log_cost": 0.04, "workers_2_over_1": pytest.approx(
        100 / 60, abs=1e-3)}}
