"""The sidecar's side: prometheus-client collectors over the stats segment.

One ordinary registry (no multiprocess mode).  At scrape time each collector
sums the counters of every slot that was ever used (:class:`SlotSums`), reads
the current generation's shared upstream state for peer gauges, and psutil
for per-process figures.  New families (VRRP, later) are new collectors
registered beside these.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from forklb import __version__
from forklb.metrics import segment as seg
from forklb.model import Config

STATES = ("up", "down", "draining", "failed", "checking")
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class SlotSums:
    """Sums of one counter offset over all slots ever used (read at scrape time)."""

    def __init__(self, stats: seg.StatsSegment):
        self.v = stats.values
        self.bases = [stats.slot_base(s) for s in stats.used_slots()]

    def total(self, off: int) -> int:
        v = self.v
        return sum(v[b + off] for b in self.bases)

    def many(self, off: int, n: int) -> list[int]:
        """``n`` consecutive counters from ``off``, each summed over the slots."""
        out = [0] * n
        v = self.v
        for b in self.bases:
            row = v[b + off:b + off + n]
            for i in range(n):
                out[i] += row[i]
        return out

    def maximum(self, off: int) -> int:
        v = self.v
        return max((v[b + off] for b in self.bases), default=0)


def histogram(values: list[int]) -> tuple[list[tuple[str, float]], float, int]:
    """(cumulative buckets, sum in seconds, count) of a stored histogram."""
    buckets, acc = [], 0
    for bound, n in zip(seg.BUCKETS, values, strict=False):
        acc += n
        buckets.append((_le(bound), acc))
    count = acc + values[seg.NB - 1]
    buckets.append(("+Inf", count))
    return buckets, values[seg.NB] / 1e6, count


def quantile(values: list[int], q: float) -> float | None:
    """Estimated quantile of a stored histogram (linear within a bucket, as PromQL)."""
    count = sum(values[:seg.NB])
    if not count:
        return None
    rank = q * count
    acc, lower = 0, 0.0
    for bound, n in zip(seg.BUCKETS, values, strict=False):
        if acc + n >= rank and n:
            return lower + (bound - lower) * (rank - acc) / n
        acc += n
        lower = bound
    return seg.BUCKETS[-1]


def _le(bound: float) -> str:
    return repr(float(bound))


def config_hash(config: Config) -> str:
    """sha256 over every file the configuration read (first 16 hex digits)."""
    h = hashlib.sha256()
    for path in config.files:
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(path.encode())
    return h.hexdigest()[:16]


class ForklbCollector(Collector):
    """Every forklb_ family.  ``shared`` and ``config``: the sidecar's generation."""

    def __init__(self, stats: seg.StatsSegment, config: Config, shared: Any, processes: Any):
        self.stats = stats
        self.config = config
        self.shared = shared
        self.processes = processes
        self.hash = config_hash(config)

    def collect(self) -> Iterator[Metric]:
        sums = SlotSums(self.stats)
        yield from self._build_and_config()
        yield from self._http(sums)
        yield from self._connections(sums)
        yield from self._upstream_counters(sums)
        yield from self._upstream_state()
        yield from self._workers()
        yield from self._processes()

    # -- families --
    def _build_and_config(self) -> Iterator[Metric]:
        v = self.stats.values
        info = GaugeMetricFamily("forklb_build_info", "forklb version and Python version; "
                                 "always 1.", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        start = GaugeMetricFamily("forklb_start_time_seconds",
                                  "When the master process started (Unix time).")
        start.add_metric([], v[seg.H_STARTED_MS] / 1000)
        yield start
        reloads = CounterMetricFamily("forklb_config_reloads", "Configuration reloads by "
                                      "result (HUP, -s reload, POST /-/reload).",
                                      labels=["result"])
        reloads.add_metric(["success"], v[seg.H_RELOAD_OK])
        reloads.add_metric(["failure"], v[seg.H_RELOAD_FAILED])
        yield reloads
        last = GaugeMetricFamily("forklb_config_last_reload_successful",
                                 "1 when the last reload (or the start) succeeded, else 0.")
        last.add_metric([], v[seg.H_LAST_RELOAD_RESULT])
        yield last
        when = GaugeMetricFamily("forklb_config_last_reload_success_timestamp_seconds",
                                 "When the running configuration was loaded (Unix time).")
        when.add_metric([], v[seg.H_LAST_RELOAD_OK_MS] / 1000)
        yield when
        cfg = GaugeMetricFamily("forklb_config_info", "The configuration this sidecar's "
                                "generation loaded: main file and hash of all files; always 1.",
                                labels=["file", "hash"])
        cfg.add_metric([self.config.path, self.hash], 1)
        yield cfg

    def _http(self, sums: SlotSums) -> Iterator[Metric]:
        reqs = CounterMetricFamily("forklb_http_requests", "Client requests by server block, "
                                   "status code (class for uncommon codes) and method.",
                                   labels=["server_name", "code", "method"])
        dur = HistogramMetricFamily("forklb_http_request_duration_seconds",
                                    "Time from the request's first byte to the last byte "
                                    "of the response.", labels=["server_name"])
        bytes_in = CounterMetricFamily("forklb_http_received_bytes", "Bytes received from "
                                       "clients (request heads and bodies).",
                                       labels=["server_name"])
        bytes_out = CounterMetricFamily("forklb_http_sent_bytes", "Bytes sent to clients.",
                                        labels=["server_name"])
        # The same by class only, every class always present (as HAProxy's): a series
        # that appears with its first 5xx would hide that 5xx from rate().
        classes = CounterMetricFamily("forklb_http_responses", "Client requests by server "
                                      "block and status class (1xx to 5xx, all always "
                                      "exported).", labels=["server_name", "class"])
        nm = len(seg.METHODS)
        for i, (name,) in enumerate(self.stats.servers.names):
            base = seg.SRV_BASE + i * seg.SRV_SIZE
            counts = sums.many(base, seg.NCODES * nm)
            by_class = dict.fromkeys(CLASSES, 0)
            for c, code in enumerate(seg.CODES):
                for m, method in enumerate(seg.METHODS):
                    n = counts[c * nm + m]
                    if n:
                        reqs.add_metric([name, code, method], n)
                        by_class[code[0] + "xx"] += n
            for cls, n in by_class.items():
                classes.add_metric([name, cls], n)
            buckets, total, _ = histogram(sums.many(base + seg.SRV_DUR, seg.HIST))
            dur.add_metric([name], buckets, total)
            bytes_in.add_metric([name], sums.total(base + seg.SRV_IN))
            bytes_out.add_metric([name], sums.total(base + seg.SRV_OUT))
        yield from (reqs, classes, dur, bytes_in, bytes_out)

    def _connections(self, sums: SlotSums) -> Iterator[Metric]:
        acc = CounterMetricFamily("forklb_connections_accepted", "Client connections accepted.")
        acc.add_metric([], sums.total(seg.CONN_ACCEPTED))
        handled = CounterMetricFamily("forklb_connections_handled",
                                      "Client connections handled.")
        handled.add_metric([], sums.total(seg.CONN_HANDLED))
        g = seg.GAUGE_BASE
        active = GaugeMetricFamily("forklb_connections_active",
                                   "Client connections open now (updated every second).")
        active.add_metric([], sums.total(g + seg.G_ACTIVE))
        state = GaugeMetricFamily("forklb_connections", "Open client connections by state: "
                                  "reading a request head, writing (processing) or idle "
                                  "(keep-alive).", labels=["state"])
        state.add_metric(["reading"], sums.total(g + seg.G_READING))
        state.add_metric(["writing"], sums.total(g + seg.G_WRITING))
        state.add_metric(["idle"], sums.total(g + seg.G_IDLE))
        yield from (acc, handled, active, state)

    def _upstream_counters(self, sums: SlotSums) -> Iterator[Metric]:
        labels = ["upstream", "server"]
        resp = CounterMetricFamily("forklb_upstream_responses", "Responses from upstream "
                                   "servers by status code.", labels=[*labels, "code"])
        fail = CounterMetricFamily("forklb_upstream_failures", "Failed attempts to upstream "
                                   "servers by reason (http_5xx: the server answered 5xx).",
                                   labels=[*labels, "reason"])
        retry = CounterMetricFamily("forklb_upstream_retries", "Attempts on this server that "
                                    "retried a request another server failed.", labels=labels)
        rtime = HistogramMetricFamily("forklb_upstream_response_time_seconds",
                                      "From the first attempt's start to the end of the "
                                      "response ($upstream_response_time).", labels=labels)
        ctime = HistogramMetricFamily("forklb_upstream_connect_time_seconds",
                                      "Time to open a new connection to the server.",
                                      labels=labels)
        checks = CounterMetricFamily("forklb_upstream_health_checks", "Active health checks "
                                     "by result.", labels=[*labels, "result"])
        changed = GaugeMetricFamily("forklb_upstream_health_last_change_timestamp_seconds",
                                    "When the health checker last changed the server's "
                                    "health (Unix time, 0: never).", labels=labels)
        pooled = GaugeMetricFamily("forklb_upstream_idle_connections", "Idle keep-alive "
                                   "connections to the server in the workers' pools.",
                                   labels=labels)
        for i, key in enumerate(self.stats.peers.names):
            key = list(key)
            base = seg.PEER_BASE + i * seg.PEER_SIZE
            codes = sums.many(base + seg.PEER_RESP, seg.NCODES)
            for c, code in enumerate(seg.CODES):
                if codes[c]:
                    resp.add_metric([*key, code], codes[c])
            reasons = sums.many(base + seg.PEER_FAIL, seg.NREASONS)
            for r, reason in enumerate(seg.FAILURE_REASONS):
                fail.add_metric([*key, reason], reasons[r])
            retry.add_metric(key, sums.total(base + seg.PEER_RETRY))
            buckets, total, _ = histogram(sums.many(base + seg.PEER_TIME, seg.HIST))
            rtime.add_metric(key, buckets, total)
            buckets, total, _ = histogram(sums.many(base + seg.PEER_CONNECT, seg.HIST))
            ctime.add_metric(key, buckets, total)
            results = sums.many(base + seg.PEER_HEALTH, len(seg.HEALTH_RESULTS))
            for r, result in enumerate(seg.HEALTH_RESULTS):
                checks.add_metric([*key, result], results[r])
            changed.add_metric(key, sums.maximum(base + seg.PEER_HEALTH_CHANGED) / 1000)
            pooled.add_metric(key, sums.total(seg.GAUGE_BASE + seg.G_POOL + i))
        yield from (resp, fail, retry, rtime, ctime, checks, changed, pooled)

    def _upstream_state(self) -> Iterator[Metric]:
        from forklb.sidecar.api import server_state

        labels = ["upstream", "server"]
        state = GaugeMetricFamily("forklb_upstream_server_state", "1 for the server's current "
                                  "state (up, down, draining, failed, checking).",
                                  labels=[*labels, "state"])
        weight = GaugeMetricFamily("forklb_upstream_server_weight", "The server's weight now.",
                                   labels=labels)
        active = GaugeMetricFamily("forklb_upstream_active_connections", "Connections to the "
                                   "server in use by requests now.", labels=labels)
        checked = GaugeMetricFamily("forklb_upstream_health_last_check_timestamp_seconds",
                                    "When the last health check finished (Unix time, 0: "
                                    "never).", labels=labels)
        backup = GaugeMetricFamily("forklb_upstream_server_backup", "1 for a backup server.",
                                   labels=labels)
        now = time.monotonic()
        for name, upstream in sorted(self.config.http.upstreams.items()):
            view = self.shared.view(name)
            seen: set[str] = set()
            for i, server in enumerate(upstream.servers):
                if server.name in seen:  # further addresses of a "resolve" name
                    continue
                seen.add(server.name)
                key = [name, server.name]
                current = server_state(upstream, view, i, now)
                for s in STATES:
                    state.add_metric([*key, s], 1 if current == s else 0)
                weight.add_metric(key, view.weight[i] or server.weight)
                active.add_metric(key, sum(view.total_conns(j)
                                           for j, other in enumerate(upstream.servers)
                                           if other.name == server.name))
                checked.add_metric(key, view.last_check[i])
                backup.add_metric(key, 1 if server.backup else 0)
        yield from (state, weight, active, checked, backup)

    def _workers(self) -> Iterator[Metric]:
        v = self.stats.values
        workers = GaugeMetricFamily("forklb_workers", "Worker processes by configuration "
                                    "generation and readiness.",
                                    labels=["generation", "ready"])
        counts: dict[tuple[str, str], int] = {}
        for _slot, role, generation, pid, ready in self.stats.rows():
            if role == "worker" and pid:
                key = (str(generation), "1" if ready else "0")
                counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            workers.add_metric(list(key), n)
        yield workers
        restarts = CounterMetricFamily("forklb_worker_restarts", "Children (workers, "
                                       "sidecar) the master replaced, by why the old one died: "
                                       "exited by itself, killed by a signal, or stuck "
                                       "(heartbeat).", labels=["role", "reason"])
        n = len(seg.RESTART_REASONS)
        for role_index, role in enumerate(seg.ROLES[1:], 1):
            for r, reason in enumerate(seg.RESTART_REASONS):
                restarts.add_metric([role, reason], v[seg.H_RESTARTS + role_index * n + r])
        yield restarts

    def _processes(self) -> Iterator[Metric]:
        labels = ["role", "pid"]
        cpu = CounterMetricFamily("forklb_process_cpu_seconds", "CPU time of each forklb "
                                  "process.", labels=[*labels, "mode"])
        rss = GaugeMetricFamily("forklb_process_resident_memory_bytes", "Resident memory of "
                                "each forklb process.", labels=labels)
        fds = GaugeMetricFamily("forklb_process_open_fds", "Open file descriptors of each "
                                "forklb process.", labels=labels)
        conns = GaugeMetricFamily("forklb_process_sockets", "Sockets each forklb process "
                                  "holds (listening and connected; from /proc/PID/fd).",
                                  labels=labels)
        for p in self.processes.snapshot():
            key = [p["role"], str(p["pid"])]
            cpu.add_metric([*key, "user"], p["cpu_user_seconds"])
            cpu.add_metric([*key, "system"], p["cpu_system_seconds"])
            rss.add_metric(key, p["rss_bytes"])
            fds.add_metric(key, p["open_fds"])
            conns.add_metric(key, p.get("sockets", 0))
        yield from (cpu, rss, fds, conns)


def registry(stats: seg.StatsSegment, config: Config, shared: Any,
             processes: Any) -> CollectorRegistry:
    """The sidecar's one registry with the forklb collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ForklbCollector(stats, config, shared, processes))
    return reg
