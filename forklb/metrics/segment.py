"""The master's stats segment: exact counters that survive respawns and reloads.

One anonymous ``MAP_SHARED`` mapping, created by the master once, before its
first fork, and kept for the master's whole life (not per generation).  It
holds unsigned 64-bit integers only:

``header``
    written by the master only: reloads by result, restarts by reason, the
    time of the last good reload, and one row per *stats slot* (pid, role,
    generation, ready).
``slots``
    one region per stats slot.  The master hands a free slot to every child it
    forks (worker or sidecar) and takes it back when it reaps the child.  The
    child is the slot's only writer, so there is no lock: a counter is a plain
    ``+= 1`` on a ``memoryview`` cast to ``'Q'``.  Counters are cumulative: the
    next child in the slot goes on adding to them, so a kill -9 loses nothing
    and totals only ever go up.  The slot's *gauge* part (connections open now,
    idle pooled connections) is zeroed by the master when it reaps the owner.

Label sets come from the config (server blocks, upstream peers).  The master
keeps one name table per kind, :class:`Names`, that only grows: a reload adds
new names at new indices and keeps the old ones (so counts of a server block
removed from the config stay, unchanged).  Children inherit the table as it is
when they fork, which always includes their own generation's names.  The table
has a fixed capacity; names beyond it share the last index ("other").

Values that are not counts are stored as integers too: durations in
microseconds, timestamps in milliseconds since the epoch.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left

# Histogram bounds in seconds, the same for every histogram (1 ms ... 30 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NB = len(BUCKETS) + 1  # + the overflow (+Inf) bucket
HIST = NB + 1  # buckets, then the sum in microseconds

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OTHER")
METHOD_INDEX = {m.encode(): i for i, m in enumerate(METHODS[:-1])}
OTHER_METHOD = len(METHODS) - 1

# Exact codes for the common ones, the class ("5xx") for the rest: a bounded set.
KNOWN_CODES = (101, 200, 201, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408,
               413, 414, 429, 431, 444, 499, 500, 502, 503, 504)
CODES = tuple(str(c) for c in KNOWN_CODES) + ("1xx", "2xx", "3xx", "4xx", "5xx")
CODE_INDEX = {c: i for i, c in enumerate(KNOWN_CODES)}
CLASS_BASE = len(KNOWN_CODES) - 1  # CLASS_BASE + status // 100
NCODES = len(CODES)

FAILURE_REASONS = ("refused", "timeout", "reset", "invalid_header", "http_5xx", "other")
NREASONS = len(FAILURE_REASONS)
HEALTH_RESULTS = ("pass", "fail")

MAX_SERVERS = 64  # server-block keys
MAX_PEERS = 256  # (upstream, server) keys

# -- one slot's counters, as offsets from the slot's start --
CONN_ACCEPTED, CONN_HANDLED = 0, 1
SRV_BASE = 2
# per server key: requests[code][method], duration histogram, bytes in, bytes out
SRV_REQ = 0
SRV_DUR = NCODES * len(METHODS)
SRV_IN = SRV_DUR + HIST
SRV_OUT = SRV_IN + 1
SRV_SIZE = SRV_OUT + 1
PEER_BASE = SRV_BASE + MAX_SERVERS * SRV_SIZE
# per peer key: responses[code], failures[reason], retries, response and connect
# histograms, health-check results, last health change (ms, the sidecar writes it)
PEER_RESP = 0
PEER_FAIL = PEER_RESP + NCODES
PEER_RETRY = PEER_FAIL + NREASONS
PEER_TIME = PEER_RETRY + 1
PEER_CONNECT = PEER_TIME + HIST
PEER_HEALTH = PEER_CONNECT + HIST
PEER_HEALTH_CHANGED = PEER_HEALTH + len(HEALTH_RESULTS)
PEER_SIZE = PEER_HEALTH_CHANGED + 1
GAUGE_BASE = PEER_BASE + MAX_PEERS * PEER_SIZE
# gauges (zeroed when the slot's owner is reaped)
G_ACTIVE, G_READING, G_WRITING, G_IDLE = 0, 1, 2, 3
G_POOL = 4  # + peer key: idle pooled connections to that peer
GAUGE_SIZE = G_POOL + MAX_PEERS
SLOT_SIZE = GAUGE_BASE + GAUGE_SIZE

# -- the header (master only) --
H_RELOAD_OK, H_RELOAD_FAILED, H_LAST_RELOAD_OK_MS, H_LAST_RELOAD_RESULT, H_STARTED_MS = range(5)
RESTART_REASONS = ("exited", "killed", "stuck")
ROLES = ("", "worker", "sidecar")
H_RESTARTS = 5  # [role][reason]
H_ROWS = H_RESTARTS + len(ROLES) * len(RESTART_REASONS)
ROW_PID, ROW_ROLE, ROW_GENERATION, ROW_READY, ROW_USED = range(5)
ROW_SIZE = 5


def status_index(status: int) -> int:
    """Index of ``status`` in :data:`CODES` (0, no response at all, counts as 499)."""
    i = CODE_INDEX.get(status)
    if i is not None:
        return i
    if 100 <= status < 600:
        return CLASS_BASE + status // 100
    return CODE_INDEX[499]


# status_index for every status a response can have, looked up per request
STATUS_TABLE = tuple(status_index(s) for s in range(600))


def bucket(seconds: float) -> int:
    """Histogram bucket of a duration: the first bound it does not exceed."""
    return bisect_left(BUCKETS, seconds)


class Names:
    """A name → index table that only grows (capacity: the last index is shared)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.index: dict[tuple[str, ...], int] = {}
        self.names: list[tuple[str, ...]] = []

    def add(self, key: tuple[str, ...]) -> int:
        i = self.index.get(key)
        if i is None:
            if len(self.names) >= self.capacity - 1:
                key = ("other",) * len(key)
                i = self.index.get(key)
                if i is not None:
                    return i
            i = self.index[key] = len(self.names)
            self.names.append(key)
        return i

    def get(self, key: tuple[str, ...]) -> int:
        i = self.index.get(key)
        if i is None:
            return self.index.get(("other",) * len(key), self.capacity - 1)
        return i


def server_key(server) -> tuple[str]:
    """A server block's label: its first name, else its first listen address."""
    if server.names and server.names[0]:
        return (server.names[0],)
    if server.listens:
        listen = server.listens[0]
        return (f"{listen.host}:{listen.port}",)
    return ("_",)


class StatsSegment:
    """The master's mapping and its name tables (see the module docstring)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.header_size = H_ROWS + slots * ROW_SIZE
        self.memory = mmap.mmap(-1, 8 * (self.header_size + slots * SLOT_SIZE))
        self.values = memoryview(self.memory).cast("Q")
        self.servers = Names(MAX_SERVERS)
        self.peers = Names(MAX_PEERS)
        self.child_slot = -1  # the slot of the child being forked (read in the child)

    def register(self, config) -> None:
        """Give every server block and upstream peer of ``config`` an index."""
        for server in config.http.servers:
            self.servers.add(server_key(server))
        for name, upstream in sorted(config.http.upstreams.items()):
            for server in upstream.servers:
                self.peers.add((name, server.name))

    # -- slots --
    def slot_base(self, slot: int) -> int:
        return self.header_size + slot * SLOT_SIZE

    def row(self, slot: int) -> int:
        return H_ROWS + slot * ROW_SIZE

    def acquire(self, role: str, generation: int) -> int:
        """A free slot for a child about to be forked (-1: none left, it will not count)."""
        v = self.values
        for slot in range(self.slots):
            r = self.row(slot)
            if not v[r + ROW_ROLE]:
                v[r + ROW_ROLE] = ROLES.index(role)
                v[r + ROW_GENERATION] = generation
                v[r + ROW_READY] = 0
                v[r + ROW_PID] = 0
                v[r + ROW_USED] = 1
                return slot
        return -1

    def started(self, slot: int, pid: int) -> None:
        if slot >= 0:
            self.values[self.row(slot) + ROW_PID] = pid

    def ready(self, slot: int) -> None:
        if slot >= 0:
            self.values[self.row(slot) + ROW_READY] = 1

    def release(self, slot: int) -> None:
        """The slot's owner was reaped: zero its gauges, free the slot (counters stay)."""
        if slot < 0:
            return
        v = self.values
        base = self.slot_base(slot) + GAUGE_BASE
        v[base:base + GAUGE_SIZE] = memoryview(bytes(8 * GAUGE_SIZE)).cast("Q")
        r = self.row(slot)
        v[r + ROW_PID] = v[r + ROW_READY] = v[r + ROW_ROLE] = 0

    def rows(self) -> list[tuple[int, str, int, int, bool]]:
        """(slot, role, generation, pid, ready) of every occupied slot."""
        v = self.values
        out = []
        for slot in range(self.slots):
            r = self.row(slot)
            if v[r + ROW_ROLE]:
                out.append((slot, ROLES[v[r + ROW_ROLE]], v[r + ROW_GENERATION], v[r + ROW_PID],
                            bool(v[r + ROW_READY])))
        return out

    def used_slots(self) -> list[int]:
        """Slots that ever had an owner (the only ones with counts)."""
        v = self.values
        return [s for s in range(self.slots) if v[self.row(s) + ROW_USED]]

    # -- master's own counters --
    def loaded(self, now: float) -> None:
        """The first configuration is loaded: it counts as the last good one."""
        v = self.values
        v[H_STARTED_MS] = v[H_LAST_RELOAD_OK_MS] = int(now * 1000)
        v[H_LAST_RELOAD_RESULT] = 1

    def reloaded(self, ok: bool, now: float) -> None:
        v = self.values
        v[H_RELOAD_OK if ok else H_RELOAD_FAILED] += 1
        v[H_LAST_RELOAD_RESULT] = 1 if ok else 0
        if ok:
            v[H_LAST_RELOAD_OK_MS] = int(now * 1000)

    def restarted(self, role: str, reason: str) -> None:
        """The master replaces a child of ``role`` that died for ``reason``."""
        i = ROLES.index(role) * len(RESTART_REASONS) + RESTART_REASONS.index(reason)
        self.values[H_RESTARTS + i] += 1
