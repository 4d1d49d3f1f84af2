"""The sidecar's metrics and control endpoints (the WSGI app routes to these).

=======================  ==================================================
``GET /metrics``         Prometheus text; OpenMetrics when ``Accept`` asks
``GET /-/healthy``       200 while the sidecar runs
``GET /-/ready``         200 once a worker accepts connections, else 503
``POST /-/reload``       token; checks the config first (400 with the error
                         when it is bad, nothing changes), then HUP
``GET /status.json``     upstreams with their figures, workers, totals
``GET /status``          the HTML page (JSON for clients that do not accept
                         HTML, as ``/status`` always answered before)
=======================  ==================================================
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.exposition import choose_encoder

from forklb.config import ConfigError
from forklb.metrics import collector
from forklb.metrics import segment as seg

ROUTES = ("/metrics", "/-/healthy", "/-/ready", "/-/reload", "/status.json")
PAGE = Path(__file__).with_name("status.html")
HTTP_5XX = seg.FAILURE_REASONS.index("http_5xx")


class Endpoints:
    """State the endpoints need: the stats segment, the registry, the reload check."""

    def __init__(self, stats: seg.StatsSegment, config: Any, shared: Any, processes: Any,
                 reload_config: Callable[[], Any] | None, master_pid: int):
        self.stats = stats
        self.config = config
        self.shared = shared
        self.processes = processes
        self.registry = collector.registry(stats, config, shared, processes)
        self.reload_config = reload_config
        self.master_pid = master_pid
        self.page = PAGE.read_bytes()  # read before privileges are dropped

    def metrics(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def ready(self) -> bool:
        return any(role == "worker" and pid and ready
                   for _slot, role, _gen, pid, ready in self.stats.rows())

    def reload(self) -> tuple[int, dict[str, Any]]:
        """``forklb -s reload``: refuse a bad config with its error, else HUP the master."""
        if self.reload_config is None:
            return 503, {"error": "reload is not available"}
        try:
            self.reload_config()
        except ConfigError as e:
            return 400, {"error": str(e)}
        os.kill(self.master_pid, signal.SIGHUP)
        return 200, {"status": "reloading"}

    def status(self, base: dict[str, Any]) -> dict[str, Any]:
        """``/status.json``: ``base`` (version, processes) plus upstreams and totals."""
        from forklb.sidecar.api import snapshot

        sums = collector.SlotSums(self.stats)
        ups = snapshot(self.config.http.upstreams, self.shared.views)["upstreams"]
        for name, upstream in ups.items():
            for server in upstream["servers"]:
                i = self.stats.peers.get((name, server["server"]))
                p = seg.PEER_BASE + i * seg.PEER_SIZE
                codes = sums.many(p + seg.PEER_RESP, seg.NCODES)
                fails = sums.many(p + seg.PEER_FAIL, seg.NREASONS)
                times = sums.many(p + seg.PEER_TIME, seg.HIST)
                server["responses"] = sum(codes)
                # Failed attempts, 5xx answers included; attempts: answers plus the
                # attempts that got none.  errors / attempts is the page's error rate.
                server["errors"] = sum(fails)
                server["attempts"] = sum(codes) + sum(fails) - fails[HTTP_5XX]
                server["retries"] = sums.total(p + seg.PEER_RETRY)
                server["p50_seconds"] = collector.quantile(times, 0.5)
                server["p99_seconds"] = collector.quantile(times, 0.99)
        nm = len(seg.METHODS)
        requests = 0
        for i in range(len(self.stats.servers.names)):
            requests += sum(sums.many(seg.SRV_BASE + i * seg.SRV_SIZE, seg.NCODES * nm))
        v = self.stats.values
        return {
            **base,
            "time": time.time(),
            "requests": requests,
            "connections": {
                "accepted": sums.total(seg.CONN_ACCEPTED),
                "active": sums.total(seg.GAUGE_BASE + seg.G_ACTIVE),
            },
            "reloads": {"success": v[seg.H_RELOAD_OK], "failure": v[seg.H_RELOAD_FAILED]},
            "workers": [{"slot": slot, "role": role, "generation": gen, "pid": pid,
                         "ready": ready} for slot, role, gen, pid, ready in self.stats.rows()],
            "upstreams": ups,
        }
