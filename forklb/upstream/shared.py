"""Upstream peer state shared by every process of one generation.

The master maps one anonymous ``MAP_SHARED`` region per generation before it
forks that generation's workers and sidecar, so all of them see the same bytes;
a respawned worker maps the same region again, and a reload starts from a new
one built from the new config.  Reading and writing takes no lock: every field
has a single writer, or tolerates the rare lost update of a racy
read-modify-write.  The one exception is ``max_conns``: checking a peer's count
and adding to it must be one step for all workers, or two of them take a peer's
last free connection at once.  :meth:`UpstreamView.lock` covers that step, as
nginx holds an upstream zone's lock while it chooses a peer.

Per upstream group
    ``ticket``       round-robin position; workers read it, pick
                     ``schedule[ticket % period]`` and write ``ticket + 1``
                     (two racing workers repeat one step, nothing worse).
    ``epoch``        bumped by every write to a peer's fails, admin, health,
                     weight or address (:func:`changed`), so a worker re-reads
                     the peers only when something changed.

Per peer (index = position in ``Upstream.servers``: primaries, then backups)
    ``fails``, ``accessed``, ``checked``
                     nginx's failure accounting (``max_fails``/``fail_timeout``),
                     written by whichever worker saw the failure; times are
                     ``time.monotonic()``, the same clock in every process.
    ``admin``        UP / DRAIN / DOWN, written by the sidecar (runtime API).
    ``health``       UNKNOWN / HEALTHY / UNHEALTHY, written by the sidecar's
                     health checker only.
    ``weight``       runtime weight (0 = the configured one), written by the sidecar.
    ``last_check``   when the health checker last finished a check (wall clock).
    ``absent``, ``family``, ``port``, ``addr``
                     for ``resolve`` servers: the address the sidecar's resolver
                     found for this slot (family 0: the one from the config), or
                     absent when the name has fewer addresses than slots.  A
                     worker reads them when it connects.

Per peer and per worker slot (single writer: that worker)
    ``conns``        connections in use now; a peer's count is the sum of slots.
    ``requests``     requests sent; ``failures`` attempts that failed.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from forklb.model import Upstream, UpstreamServer

# admin states
UP, DRAIN, DOWN = 0, 1, 2
ADMIN_NAMES = {UP: "up", DRAIN: "drain", DOWN: "down"}
# health states
UNKNOWN, HEALTHY, UNHEALTHY = 0, 1, 2
HEALTH_NAMES = {UNKNOWN: "unknown", HEALTHY: "up", UNHEALTHY: "down"}

_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64
_F64 = ctypes.c_double


@dataclass
class UpstreamView:
    """ctypes arrays over one upstream's part of the shared region."""

    name: str
    size: int  # number of peers
    slots: int  # worker slots
    ticket: ctypes.c_uint64
    epoch: ctypes.c_uint64
    fails: ctypes.Array
    accessed: ctypes.Array
    checked: ctypes.Array
    admin: ctypes.Array
    health: ctypes.Array
    weight: ctypes.Array
    last_check: ctypes.Array
    absent: ctypes.Array
    family: ctypes.Array
    port: ctypes.Array
    addr: ctypes.Array  # size * 16 bytes: the packed IPv4/IPv6 address
    conns: ctypes.Array  # slots * size, index slot * size + peer
    requests: ctypes.Array
    failures: ctypes.Array
    # The generation's lock file and this upstream's byte in it (see lock)
    lock_fd: int = -1
    lock_byte: int = 0

    def lock(self) -> None:
        """Wait until no other process holds this upstream's lock, and take it.

        A POSIX record lock on one byte of a memfd inherited from the master:
        the kernel releases it when its holder dies, so a worker killed while
        holding it blocks no one.  Held for a few microseconds, with no
        greenlet switch inside; a process that holds it may take it again."""
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX, 1, self.lock_byte)

    def unlock(self) -> None:
        fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, self.lock_byte)

    def total_conns(self, peer: int) -> int:
        """Connections to ``peer`` in use by all workers now."""
        size, conns = self.size, self.conns
        return sum(conns[slot * size + peer] for slot in range(self.slots))

    def total_requests(self, peer: int) -> int:
        size, requests = self.size, self.requests
        return sum(requests[slot * size + peer] for slot in range(self.slots))

    def total_failures(self, peer: int) -> int:
        size, failures = self.size, self.failures
        return sum(failures[slot * size + peer] for slot in range(self.slots))


class SharedUpstreamState:
    """The shared region of one generation and the views into it."""

    def __init__(self, upstreams: Mapping[str, Upstream], slots: int = 1):
        self.slots = max(1, slots)
        plan: list[tuple[str, int]] = [(name, len(u.servers)) for name, u in
                                       sorted(upstreams.items())]
        # Per peer: 11 eight-byte fields, a 16-byte address, 3 eight-byte counters a slot.
        per_peer = 11 * 8 + 16 + 3 * 8 * self.slots
        total = sum(16 + n * per_peer for _, n in plan) or 8
        self.memory = mmap.mmap(-1, total)  # MAP_SHARED | MAP_ANONYMOUS, zero-filled
        # An empty file whose bytes are lock records, one per upstream (UpstreamView.lock);
        # only max_conns needs it, and without it no process holds one more descriptor.
        self.lock_fd = -1
        if any(server.max_conns for u in upstreams.values() for server in u.servers):
            self.lock_fd = os.memfd_create("forklb-upstream-locks", os.MFD_CLOEXEC)
            weakref.finalize(self, os.close, self.lock_fd)
        self.views: dict[str, UpstreamView] = {}
        offset = 0
        for byte, (name, n) in enumerate(plan):
            view, offset = self._carve(name, n, offset)
            view.lock_fd, view.lock_byte = self.lock_fd, byte
            self.views[name] = view
            for i, server in enumerate(upstreams[name].servers):
                view.absent[i] = server.spare

    def _carve(self, name: str, n: int, offset: int) -> tuple[UpstreamView, int]:
        def array(ctype, count: int):
            nonlocal offset
            arr = (ctype * count).from_buffer(self.memory, offset)
            offset += ctypes.sizeof(arr)
            return arr

        ticket = _U64.from_buffer(self.memory, offset)
        epoch = _U64.from_buffer(self.memory, offset + 8)
        offset += 16
        s = self.slots
        view = UpstreamView(
            name=name, size=n, slots=s, ticket=ticket, epoch=epoch,
            fails=array(_I64, n), accessed=array(_F64, n), checked=array(_F64, n),
            admin=array(_I64, n), health=array(_I64, n), weight=array(_I64, n),
            last_check=array(_F64, n),
            absent=array(_I64, n), family=array(_I64, n), port=array(_I64, n),
            addr=array(ctypes.c_ubyte, n * 16),
            conns=array(_I64, n * s), requests=array(_U64, n * s), failures=array(_U64, n * s),
        )
        return view, offset

    def view(self, name: str) -> UpstreamView:
        return self.views[name]

    def ticket(self, name: str) -> ctypes.c_uint64:
        """The shared ticket counter of upstream ``name`` (read and write ``.value``)."""
        return self.views[name].ticket


def failed_now(server: UpstreamServer, view: UpstreamView, i: int, now: float,
               single: bool) -> bool:
    """nginx's "temporarily disabled": ``max_fails`` failures seen and the
    ``fail_timeout`` window not over yet.  The only server of an upstream never is."""
    if single or not server.max_fails:
        return False
    return view.fails[i] >= server.max_fails and now - view.checked[i] <= server.fail_timeout


def changed(view: UpstreamView) -> None:
    """Tell every worker that peer state changed (call after the write)."""
    view.epoch.value += 1


def set_address(view: UpstreamView, i: int, address: tuple[str, int] | None) -> None:
    """Point slot ``i`` of a ``resolve`` server at ``address`` (None: absent)."""
    if address is None:
        view.absent[i] = 1
        changed(view)
        return
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(family, host)
    view.absent[i] = 1  # readers skip the slot while it changes
    view.addr[i * 16:i * 16 + len(packed)] = list(packed)
    view.port[i] = port
    view.family[i] = family
    view.absent[i] = 0
    changed(view)


def get_address(view: UpstreamView, i: int, configured: tuple[str, int]) -> tuple[str, int]:
    """The address slot ``i`` points at now."""
    family = view.family[i]
    if not family:
        return configured
    size = 16 if family == socket.AF_INET6 else 4
    packed = bytes(view.addr[i * 16:i * 16 + size])
    return socket.inet_ntop(family, packed), view.port[i]
