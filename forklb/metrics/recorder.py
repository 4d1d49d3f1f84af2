"""The writer side: what a worker (or the sidecar) adds to its stats slot.

Everything per request is an integer increment on a ``memoryview``: no lock,
no syscall, no allocation beyond the arithmetic.  Offsets of each server block
and upstream peer are computed once when the worker starts.  A process without
a slot (the segment was full) counts into a private buffer nobody reads.

The child finds its slot through :func:`attach`, called right after fork.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from typing import Any

from forklb.http import next_upstream as nu
from forklb.metrics import segment as seg

_METHOD_INDEX = seg.METHOD_INDEX
_STATUS_TABLE = seg.STATUS_TABLE
_NMETHODS = len(seg.METHODS)
_BUCKETS = seg.BUCKETS
_HTTP_5XX = seg.PEER_FAIL + seg.FAILURE_REASONS.index("http_5xx")
# offsets used per request, as module constants (no attribute lookups on seg)
_OTHER_METHOD = seg.OTHER_METHOD
_SRV_DUR, _SRV_IN, _SRV_OUT, _NB = seg.SRV_DUR, seg.SRV_IN, seg.SRV_OUT, seg.NB
_PEER_RESP, _PEER_RETRY, _PEER_TIME = seg.PEER_RESP, seg.PEER_RETRY, seg.PEER_TIME
_attached: tuple[seg.StatsSegment | None, int] = (None, -1)
_current: Recorder | None = None  # this process's recorder, for connected()


def attach(stats: seg.StatsSegment | None, slot: int) -> None:
    """In a freshly forked child: the segment and the slot it writes."""
    global _attached
    _attached = (stats, slot)


def _slot_view() -> tuple[memoryview, int, seg.StatsSegment | None]:
    stats, slot = _attached
    if stats is None or slot < 0:
        private = memoryview(bytearray(8 * seg.SLOT_SIZE)).cast("Q")
        return private, 0, stats
    return stats.values, stats.slot_base(slot), stats


class Recorder:
    """Per-process counting into one slot (built once at worker start)."""

    def __init__(self, servers: list[Any] = (), listeners: dict[int, Any] | None = None,
                 groups: dict[str, Any] | None = None):
        self.v, self.base, stats = _slot_view()
        names_s = stats.servers if stats else seg.Names(seg.MAX_SERVERS)
        names_p = stats.peers if stats else seg.Names(seg.MAX_PEERS)
        b = self.base
        # id(server block) -> offset of its requests area
        self.server_base = {id(s): b + seg.SRV_BASE + names_s.get(seg.server_key(s)) * seg.SRV_SIZE
                            for s in servers}
        # id(Listener) -> its default server's offset (requests rejected before routing)
        self.listener_base = {key: self.server_base.get(id(default), b + seg.SRV_BASE)
                              for key, default in (listeners or {}).items()}
        # upstream name -> per peer index: offset of its area, and of its pool gauge
        self.peer_base: dict[str, list[int]] = {}
        self.pool_gauge: dict[str, list[int]] = {}
        for name, group in (groups or {}).items():
            keys = [names_p.get((name, s.name)) for s in group.servers]
            self.peer_base[name] = [b + seg.PEER_BASE + k * seg.PEER_SIZE for k in keys]
            self.pool_gauge[name] = [b + seg.GAUGE_BASE + seg.G_POOL + k for k in keys]
        self.groups = groups or {}

    # -- connections --
    def accepted(self) -> None:
        """A connection was accepted.  The pool accepts only when it has room for
        it, so every accepted connection is also handled (nginx's two counters
        differ only when it drops connections over worker_connections)."""
        v = self.v
        v[self.base + seg.CONN_ACCEPTED] += 1
        v[self.base + seg.CONN_HANDLED] += 1

    def connection_gauges(self, active: int, reading: int, writing: int, idle: int) -> None:
        g = self.base + seg.GAUGE_BASE
        v = self.v
        v[g + seg.G_ACTIVE], v[g + seg.G_READING] = active, reading
        v[g + seg.G_WRITING], v[g + seg.G_IDLE] = writing, idle

    def pool_gauges(self) -> None:
        """Idle pooled connections per peer (about once a second, not per request)."""
        v = self.v
        for name, group in self.groups.items():
            for off, idle in zip(self.pool_gauge[name], group.idle, strict=False):
                v[off] = len(idle)

    # -- per request (the access-log phase) --
    def request(self, ex: Any) -> None:
        """One finished request: status, method, duration, bytes in and out."""
        v = self.v
        base = self.server_base.get(id(ex.server))
        if base is None:  # rejected before routing: the listener's default server
            base = self.listener_base.get(id(ex.conn.listener), self.base + seg.SRV_BASE)
        status = ex.status
        code = _STATUS_TABLE[status] if 0 <= status < 600 else seg.status_index(status)
        v[base + code * _NMETHODS + _METHOD_INDEX.get(ex.method_b, _OTHER_METHOD)] += 1
        duration = time.time() - ex.start_time
        h = base + _SRV_DUR
        v[h + bisect_left(_BUCKETS, duration)] += 1
        if duration > 0:
            v[h + _NB] += int(duration * 1e6)
        v[base + _SRV_IN] += ex.header_bytes + (ex.content_length or 0)
        v[base + _SRV_OUT] += ex.bytes_sent

    # -- per upstream attempt --
    def upstream_done(self, group: Any, index: int, status: int, started: float,
                      retry: bool) -> None:
        """A peer answered (``started``: monotonic start of the request's first try)."""
        p = self.peer_base[group.name][index]
        v = self.v
        code = _STATUS_TABLE[status] if 0 <= status < 600 else seg.status_index(status)
        v[p + _PEER_RESP + code] += 1
        if status >= 500 and status < 600:
            v[p + _HTTP_5XX] += 1
        if retry:
            v[p + _PEER_RETRY] += 1
        elapsed = time.monotonic() - started
        t = p + _PEER_TIME
        v[t + bisect_left(_BUCKETS, elapsed)] += 1
        if elapsed > 0:
            v[t + _NB] += int(elapsed * 1e6)

    def upstream_failed(self, group: Any, index: int, error: Any, retry: bool) -> None:
        """An attempt failed before the response head (``error``: proxy.UpstreamError)."""
        p = self.peer_base[group.name][index]
        self.v[p + seg.PEER_FAIL + failure_reason(error)] += 1
        if retry:
            self.v[p + seg.PEER_RETRY] += 1

    def connect_time(self, group: Any, index: int, seconds: float) -> None:
        p = self.peer_base[group.name][index] + seg.PEER_CONNECT
        self.v[p + seg.bucket(seconds)] += 1
        self.v[p + seg.NB] += int(seconds * 1e6) if seconds > 0 else 0

    # -- the sidecar's health checker --
    def health_result(self, upstream: str, server: str, passed: bool, changed: bool) -> None:
        stats = _attached[0]
        if stats is None:
            return
        p = self.base + seg.PEER_BASE + stats.peers.get((upstream, server)) * seg.PEER_SIZE
        self.v[p + seg.PEER_HEALTH + (0 if passed else 1)] += 1
        if changed:
            self.v[p + seg.PEER_HEALTH_CHANGED] = int(time.time() * 1000)


def failure_reason(error: Any) -> int:
    """A failed attempt (proxy.UpstreamError) as an index in FAILURE_REASONS: by its
    proxy_next_upstream kind, then, for errors, by nginx's error text."""
    message = error.message
    if error.kind == nu.TIMEOUT:
        name = "timeout"
    elif error.kind == nu.INVALID_HEADER:
        name = "invalid_header"
    elif "refused" in message:
        name = "refused"
    elif "reset" in message or "prematurely closed" in message or "failed (" in message:
        name = "reset"
    else:
        name = "other"
    return seg.FAILURE_REASONS.index(name)


class NullRecorder(Recorder):
    """Counts nothing: ``FORKLB_METRICS=off``, for the bench's metrics scenarios only (the hooks'
    calls remain, so the difference measured is the counting itself)."""

    def __init__(self) -> None:
        super().__init__()

    def accepted(self) -> None:
        pass

    def request(self, ex: Any) -> None:
        pass

    def upstream_done(self, group: Any, index: int, status: int, started: float,
                      retry: bool) -> None:
        pass

    def upstream_failed(self, group: Any, index: int, error: Any, retry: bool) -> None:
        pass


def metrics_recorder(worker: Any) -> Recorder:
    """The worker's recorder, built from its routing tables and upstream groups."""
    global _current
    if os.environ.get("FORKLB_METRICS") == "off":
        return NullRecorder()  # _current stays None: connected() does nothing either
    listeners = {id(lst): lst.vhosts.default for lst in worker.listeners.values()}
    _current = Recorder(list(worker.config.http.servers), listeners, worker.groups)
    return _current


def connected(group: Any, index: int, started: float) -> None:
    """A connection to peer ``index`` of ``group`` opened (``started``: monotonic)."""
    if _current is not None:
        _current.connect_time(group, index, time.monotonic() - started)


def metrics_gauges(worker: Any, interval: float = 1.0) -> None:
    """Greenlet body: connection-state and pool gauges, once a ``interval``.

    A connection is *idle* waiting for its next request, *reading* while a
    request head is arriving, *writing* otherwise (nginx's stub_status terms).
    """
    import gevent

    stats = worker.stats
    while True:
        reading = writing = idle = 0
        for conn in list(worker.connections):
            if conn.idle:
                idle += 1
            elif conn.pending and not conn.pending[0].headers_done:
                reading += 1
            else:
                writing += 1
        stats.connection_gauges(len(worker.connections), reading, writing, idle)
        stats.pool_gauges()
        gevent.sleep(interval)


def health_result(upstream: str, server: str, passed: bool, changed: bool) -> None:
    """One active health check finished (in the sidecar)."""
    global _current
    if _current is None:
        _current = Recorder()
    _current.health_result(upstream, server, passed, changed)
