"""The scenarios, and one measurement of one proxy in one of them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import load
from bench.procs import cpu_seconds, peak_rss_kib, reset_peak_rss, rss_kib
from bench.proxies import Proxy


@dataclass(frozen=True)
class Scenario:
    """One workload: how the proxies are configured and what load is run against them."""

    name: str
    description: str
    kind: str = "wrk"  # "wrk", "upload" or "idle"
    path: str = "/small"
    connections: int = 50
    headers: tuple[str, ...] = ()
    workers: int = 2
    access_log: bool = False
    metrics: bool = True  # forklb's counting of metrics (the sidecar's /metrics)
    bulk: bool = False  # report GB/s: the body size is what matters
    # Restart the proxies before every round: memory a round grew stays in the allocator's
    # hands after the connections close, so a second round on the same processes would
    # measure only the growth beyond the first.
    fresh_each_round: bool = False
    #: Also measured in the same rounds: each proxy with (label, workers, access_log,
    #: metrics) as the row "<proxy> <label>", so that what the scenario changes is priced
    #: within one run (A A' B B' C C' ...) rather than against another scenario minutes apart.
    baseline: tuple[str, int, bool, bool] | None = None
    only: tuple[str, ...] = ()  # the proxies it applies to (empty: all)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("keepalive-small", "keep-alive, 15-byte responses, c=50"),
    Scenario("keepalive-small-c500", "keep-alive, 15-byte responses, c=500", connections=500),
    Scenario("close", "Connection: close, 15-byte responses, c=50",
             headers=("Connection: close",)),
    Scenario("body-64k", "keep-alive, 64 KiB responses, c=50", path="/64k", bulk=True),
    Scenario("body-1m", "keep-alive, 1 MiB responses, c=10", path="/1m", connections=10,
             bulk=True),
    Scenario("upload-1g", "one streamed 1 GiB upload (curl -T) to the sink", kind="upload",
             path="/upload", connections=1, bulk=True),
    Scenario("idle-10k", "10,000 idle keep-alive connections (one request each)",
             kind="idle", connections=10000, fresh_each_round=True),
    Scenario("access-log", "as keepalive-small, access_log on (combined, to a file)",
             access_log=True, baseline=("log off", 2, False, True)),
    Scenario("workers-1", "as keepalive-small, 1 worker (process or thread)", workers=1,
             baseline=("2 workers", 2, False, True)),
    Scenario("metrics", "as keepalive-small; forklb's metrics counting on, against off",
             baseline=("metrics off", 2, False, False), only=("forklb",)),
    Scenario("metrics-log", "as keepalive-small; forklb's metrics and access log on, "
             "against both off", access_log=True,
             baseline=("metrics+log off", 2, False, False), only=("forklb",)),
)

BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class Variant:
    """One row of a scenario: a proxy with the scenario's settings or its baseline's."""

    key: str  # "forklb", or "forklb log off"
    proxy: str
    workers: int
    access_log: bool
    metrics: bool = True


def variants(scenario: Scenario, proxies: list[str]) -> list[Variant]:
    """The rows to measure, each proxy followed by its baseline (if the scenario has one)."""
    out = []
    for name in proxies:
        if scenario.only and name not in scenario.only:
            continue
        out.append(Variant(name, name, scenario.workers, scenario.access_log, scenario.metrics))
        if scenario.baseline:
            label, workers, access_log, metrics = scenario.baseline
            out.append(Variant(f"{name} {label}", name, workers, access_log, metrics))
    return out


@dataclass
class Settings:
    """Run-wide settings from the command line."""

    seconds: float
    warmup: float
    upload_file: Path | None
    idle_conns: int
    workdir: Path
    nofile: int


def warm_up(scenario: Scenario, proxy: Proxy, port: int, st: Settings) -> None:
    """Fill the upstream pools and caches before the first measured round."""
    if scenario.kind == "wrk":
        load.wrk(port, scenario.path, min(scenario.connections, 50), st.warmup, st.workdir,
                 scenario.headers)
    else:
        load.wrk(port, "/small", 10, st.warmup, st.workdir)


def measure(scenario: Scenario, proxy: Proxy, port: int, st: Settings) -> dict[str, Any]:
    """Run the scenario's load once against ``proxy`` and return the figures."""
    pids = proxy.pids()
    workers = proxy.worker_pids()
    reset_peak_rss(workers)
    per_worker_before = proxy.worker_cpu()
    cpu_before = cpu_seconds(pids)
    extra: dict[str, Any] = {}
    if scenario.kind == "idle":
        result, extra = _idle(port, pids, st.idle_conns)
    elif scenario.kind == "upload":
        assert st.upload_file is not None
        result = load.curl_upload(port, scenario.path, st.upload_file)
    else:
        result = load.wrk(port, scenario.path, scenario.connections, st.seconds, st.workdir,
                          scenario.headers)
    cpu_used = cpu_seconds(list(dict.fromkeys(pids + proxy.pids())))
    cpu_used -= cpu_before
    shares = _shares(per_worker_before, proxy.worker_cpu())
    row: dict[str, Any] = {
        "requests": result.requests,
        "seconds": round(result.seconds, 3),
        "rps": round(result.requests / result.seconds, 1) if result.seconds else None,
        "p50_ms": _round(result.p50_ms),
        "p99_ms": _round(result.p99_ms),
        "errors": result.errors,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "cpu_us_per_req": round(cpu_used * 1e6 / max(1, result.requests), 1),
        "peak_rss_kib_per_worker": peak_rss_kib(workers),
        "workers": len(workers),
        # How evenly the work spread: each worker's part of the workers' CPU time.
        "worker_cpu_share": shares,
        "busiest_worker_share": shares[0] if shares else None,
    }
    if scenario.bulk:
        row["gbps"] = round(result.bytes / result.seconds / 1e9, 3) if result.seconds else None
        row["cpu_s_per_gb"] = round(cpu_used / (result.bytes / 1e9), 3) if result.bytes else None
    if scenario.kind != "wrk":  # one upload, or no load at all: no rate, no percentiles
        for key in ("rps", "p50_ms", "p99_ms"):
            row[key] = None
    row.update(extra)
    return row


def _idle(port: int, pids: list[int], count: int) -> tuple[load.LoadResult, dict[str, Any]]:
    """Open ``count`` idle keep-alive connections; RSS growth of the proxy per connection."""
    before = rss_kib(pids)
    started = time.monotonic()
    socks, failed = load.open_idle(port, count)
    opened = time.monotonic() - started
    time.sleep(1.0)  # let the workers settle (greenlets parked, buffers released)
    after = rss_kib(pids)
    load.close_hard(socks)
    time.sleep(1.0)  # let the proxy see the resets before the next proxy's turn
    per_conn = (after - before) / len(socks) if socks else None
    result = load.LoadResult(len(socks), opened, 0, 0, failed)
    return result, {"connections": len(socks), "rss_delta_kib": after - before,
                    "rss_per_conn_kib": _round(per_conn)}


def _shares(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each worker's (or HAProxy thread's) fraction of the CPU time used, largest first."""
    used = [after[k] - before.get(k, 0.0) for k in after]
    total = sum(used)
    if total <= 0:
        return []
    return sorted((round(u / total, 3) for u in used), reverse=True)


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)
