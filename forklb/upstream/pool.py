"""A worker's view of one upstream group: peer choice, shared state, idle connections.

Each worker owns one :class:`UpstreamGroup` per ``upstream`` block.  Peer state
that must agree between workers (failures, connection counts, admin and health
states, the round-robin position) lives in the generation's shared memory
(:mod:`forklb.upstream.shared`); the smooth-WRR weight arithmetic used around
failures stays local, as in nginx.

Choosing, per request (:class:`Choice`, nginx's per-request peer data):

* with ``ip_hash``/``hash``/``least_conn``/``random`` the method's cursor picks
  among the usable primaries (:mod:`forklb.upstream.methods`), and hands over to
  round robin when it gives up, as nginx does;
* round robin, in the steady state (nothing failed, nothing tried, no
  ``max_conns`` reached), indexes one period of smooth WRR over the peers that
  are in service with the shared ticket, so every worker follows one sequence;
  otherwise it runs smooth WRR over the usable peers;
* when no primary is usable, the backups (round robin and least_conn only).

Idle keep-alive connections to each peer wait in a LIFO stack (the most
recently used is the least likely to have been closed by the server), at most
``keepalive`` for the whole group, as nginx's ``keepalive N``.

Runs inside a gevent worker: sockets here are gevent's (monkey-patched).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from forklb.model import Upstream, show_address
from forklb.upstream import methods
from forklb.upstream.balancer import SmoothWeightedRoundRobin, swrr_schedule
from forklb.upstream.shared import (
    DOWN,
    DRAIN,
    UNHEALTHY,
    UpstreamView,
    changed,
    failed_now,
    get_address,
)


class UpstreamGroup:
    def __init__(self, upstream: Upstream, view: UpstreamView, slot: int):
        self.name = upstream.name
        self.servers = upstream.servers
        self.size = len(upstream.servers)
        self.primaries = upstream.primaries
        self.addresses = [s.address for s in upstream.servers]
        self.dynamic = [s.resolve for s in upstream.servers]
        self.seen = list(self.addresses)  # last address used, per peer
        self.labels = [show_address(*a) for a in self.addresses]  # for logs, per peer
        self.view = view
        self.base = slot * self.size  # this worker's slots in the per-worker arrays
        self.keepalive = upstream.keepalive
        self.idle: list[list[socket.socket]] = [[] for _ in upstream.servers]
        self.idle_count = 0
        # nginx never marks the only server of an upstream as failed.
        self.single = self.size == 1
        self.configured_weights = tuple(s.weight for s in upstream.servers)
        self._weights: tuple[int, ...] = ()
        self._schedules: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
        self.balancing = upstream.balancing
        self.limited = [i for i, srv in enumerate(upstream.servers) if srv.max_conns]
        # Cached reading of the shared peer state, redone when view.epoch moves or a
        # failure window ends: the steady-state primaries (-1: not steady).
        self._epoch = -1
        self._recheck_at = 0.0
        self._steady = -1
        self._pristine: tuple[int, ...] | None = None  # see steady_pick
        self._rebuild(self.configured_weights)

    # -- weights can change at run time (the sidecar's API writes view.weight) --
    def _rebuild(self, weights: tuple[int, ...]) -> None:
        p = self.primaries
        s = self.servers
        self._weights = weights
        self.rr = SmoothWeightedRoundRobin(list(weights[:p]))
        self.backup_rr = SmoothWeightedRoundRobin(list(weights[p:])) if p < self.size else None
        peers = self.rr.peers + (self.backup_rr.peers if self.backup_rr else [])
        for peer, server in zip(peers, s, strict=True):
            peer.max_fails, peer.fail_timeout = server.max_fails, server.fail_timeout
        self.method = self.backup_method = None
        b = self.balancing
        if b.method != "round_robin":
            name = {"hash": "hash consistent" if b.consistent else "hash",
                    "random": "random two" if b.two else "random"}.get(b.method, b.method)
            self.method = methods.create(name, [x.name for x in s[:p]], list(weights[:p]),
                                         peers=self.rr.peers)
            if b.method == "least_conn" and self.backup_rr is not None:
                self.backup_method = methods.LeastConn(self.backup_rr.peers, with_backup=True)

    def current_weights(self) -> tuple[int, ...]:
        view = self.view
        weights = tuple(view.weight[i] or self.configured_weights[i] for i in range(self.size))
        if weights != self._weights:
            self._rebuild(weights)
        return weights

    def refresh(self, now: float) -> None:
        """Re-read the shared peer state if it changed since the last request.

        Most requests find the same epoch and no failure window ending, and
        skip the per-peer reads entirely.
        """
        epoch = self.view.epoch.value
        if epoch == self._epoch and now < self._recheck_at:
            return
        self._epoch = epoch
        self.current_weights()
        mask, recheck = 0, float("inf")
        view = self.view
        for i in range(self.primaries):
            if not self.in_service(i):
                continue
            if self.failed_now(i, now):
                mask = -1
                recheck = min(recheck, view.checked[i] + self.servers[i].fail_timeout)
            elif mask >= 0:
                mask |= 1 << i
        self._steady = mask
        self._recheck_at = recheck
        # Plain round robin with no failure on record and no max_conns: the first
        # try needs neither a Choice nor the probe bookkeeping (steady_pick).
        pristine = (mask > 0 and self.method is None and not self.limited
                    and not any(view.fails[i] for i in range(self.primaries)))
        self._pristine = self.schedule(mask, self._weights) if pristine else None

    # -- state of one peer --
    def address(self, i: int) -> tuple[str, int]:
        """Where peer ``i`` is now (a ``resolve`` server's slots follow DNS)."""
        if not self.dynamic[i]:
            return self.addresses[i]
        now = get_address(self.view, i, self.addresses[i])
        if now != self.seen[i]:  # moved: idle connections go to the old address
            self.seen[i] = now
            self.drop_idle(i)
        return now

    def label(self, i: int) -> str:
        if not self.dynamic[i]:
            return self.labels[i]
        return show_address(*self.address(i))

    def in_service(self, i: int) -> bool:
        """Not down by config, by the admin API (down or drain) or by health checks,
        and (``resolve``) holding an address."""
        view = self.view
        return (not self.servers[i].down and view.admin[i] not in (DOWN, DRAIN)
                and view.health[i] != UNHEALTHY and not view.absent[i])

    def failed_now(self, i: int, now: float) -> bool:
        return failed_now(self.servers[i], self.view, i, now, self.single)

    def conns(self, i: int) -> int:
        return self.view.total_conns(i)

    def below_max_conns(self, i: int) -> bool:
        limit = self.servers[i].max_conns
        return not limit or self.view.total_conns(i) < limit

    # -- per request --
    def steady_pick(self) -> int:
        """The peer of a request's first try when nothing needs deciding: round
        robin, no failure on record (so no probe to time), no ``max_conns``.  It
        is the next step of the shared schedule, as :class:`Choice` would take
        it.  -1 otherwise: a Choice decides (:meth:`start`).
        """
        if self.view.epoch.value != self._epoch:
            self.refresh(time.monotonic())
        schedule = self._pristine
        if schedule is None:
            return -1
        ticket = self.view.ticket
        n = ticket.value
        ticket.value = n + 1
        return schedule[n % len(schedule)]

    def start(self, ex: Any, tried: int = -1) -> Choice:
        """The peer choice for ``ex``; ``tried``: a peer its first try already
        took (from :meth:`steady_pick`)."""
        choice = Choice(self, ex)
        if tried >= 0:
            choice.tried = 1 << tried
        return choice

    def pick(self, choice: Choice) -> int | None:
        """The next peer of ``choice``, acquired; None when none is left.

        With ``max_conns`` in the group, choosing and counting the connection
        are one step under the upstream's lock, for all workers together
        (:meth:`UpstreamView.lock`): without it two workers could both see a
        peer's last connection free and both take it."""
        if not self.limited:
            return self._take(choice)
        view = self.view
        view.lock()
        try:
            return self._take(choice)
        finally:
            view.unlock()

    def _take(self, choice: Choice) -> int | None:
        index = choice.next()
        if index is not None:
            self.acquire(index)
        return index

    def acquire(self, i: int) -> None:
        """Peer ``i`` gets a request from this worker (counts for least_conn, max_conns)."""
        view = self.view
        view.conns[self.base + i] += 1
        view.requests[self.base + i] += 1

    def release(self, i: int) -> None:
        self.view.conns[self.base + i] -= 1

    def failed(self, i: int) -> None:
        """nginx's accounting of a failed attempt (error, timeout, invalid header)."""
        view = self.view
        view.failures[self.base + i] += 1
        if self.single:
            return
        now = time.monotonic()
        view.fails[i] += 1
        view.accessed[i] = now
        view.checked[i] = now
        changed(view)
        rr, j = (self.rr, i) if i < self.primaries else (self.backup_rr, i - self.primaries)
        rr.penalize(j)

    def succeeded(self, i: int) -> None:
        """A success after fail_timeout (a probe) clears the failures."""
        view = self.view
        if view.fails[i] and view.accessed[i] < view.checked[i]:
            view.fails[i] = 0
            changed(view)

    def schedule(self, mask: int, weights: tuple[int, ...]) -> tuple[int, ...]:
        """One smooth-WRR period over the primaries in ``mask`` (cached)."""
        key = (mask, weights)
        sched = self._schedules.get(key)
        if sched is None:
            members = [i for i in range(self.primaries) if mask >> i & 1]
            sched = tuple(members[j] for j in swrr_schedule([weights[i] for i in members]))
            self._schedules[key] = sched
        return sched

    # -- idle keep-alive connections --
    def take_idle(self, index: int) -> socket.socket | None:
        stack = self.idle[index]
        if stack:
            self.idle_count -= 1
            return stack.pop()
        return None

    def give_back(self, index: int, sock: socket.socket) -> None:
        """Keep ``sock`` for reuse; when the group holds enough, the oldest idle
        connection to this peer goes instead (nginx keeps the most recent)."""
        stack = self.idle[index]
        if self.idle_count >= self.keepalive:
            if not stack or not self.keepalive:
                sock.close()
                return
            stack.pop(0).close()
            self.idle_count -= 1
        stack.append(sock)
        self.idle_count += 1

    def drop_idle(self, index: int) -> None:
        """Close every idle connection to peer ``index``."""
        stack = self.idle[index]
        self.idle_count -= len(stack)
        while stack:
            stack.pop().close()

    def close_idle(self) -> None:
        for stack in self.idle:
            while stack:
                stack.pop().close()
        self.idle_count = 0


class Choice:
    """The peers tried for one request, and the method's per-request state."""

    __slots__ = ("group", "tried", "cursor", "now", "handed_over")

    def __init__(self, group: UpstreamGroup, ex: Any):
        self.group = group
        self.tried = 0
        self.now = time.monotonic()
        self.handed_over = False  # the method gave up: round robin from now on
        self.cursor = None
        group.refresh(self.now)  # a weight changed at run time rebuilds the method first
        method = group.method
        if method is not None:
            b = group.balancing
            key: str | bytes | None = None
            if b.method == "ip_hash":
                key = ex.remote_addr
            elif b.method == "hash":
                key = _raw(b.key.render(ex)) if b.key is not None else b""
            self.cursor = method.begin(key)

    def usable(self, i: int) -> bool:
        g = self.group
        return (not self.tried >> i & 1 and g.in_service(i) and not g.failed_now(i, self.now)
                and g.below_max_conns(i))

    def next(self) -> int | None:
        """The next peer to try, or None when none is left ("no live upstreams")."""
        g = self.group
        index = None
        if self.cursor is not None and not self.handed_over:
            index = self.cursor.next(self.usable, g.conns)
            if index is None:
                self.handed_over = True
        if index is None:
            index = self._round_robin()
        if index is None and g.backup_rr is not None:
            index = self._backup()
        if index is not None:
            self._picked(index)
        return index

    def _round_robin(self) -> int | None:
        # (no lambda or generator here: their cells would be made on every call)
        g = self.group
        mask = g._steady
        if not self.tried and mask > 0 and (not g.limited or self._below_limits(mask)):
            sched = g.schedule(mask, g._weights)
            ticket = g.view.ticket
            n = ticket.value
            ticket.value = n + 1
            return sched[n % len(sched)]
        return self._smooth()

    def _below_limits(self, mask: int) -> bool:
        g = self.group
        return all(g.below_max_conns(i) for i in g.limited if mask >> i & 1)

    def _smooth(self) -> int | None:
        """Not the steady state (a failure, a retry, a max_conns limit): smooth WRR."""
        p = self.group.primaries
        return self.group.rr.choose(lambda i: i < p and self.usable(i))

    def _backup(self) -> int | None:
        g = self.group
        p = g.primaries
        if g.backup_method is not None:
            j = g.backup_method.pick(None, lambda j: self.usable(p + j),
                                     lambda j: g.conns(p + j))
        else:
            j = g.backup_rr.choose(lambda j: self.usable(p + j))
        return None if j is None else p + j

    def _picked(self, i: int) -> None:
        g = self.group
        self.tried |= 1 << i
        view = g.view
        # One probe per fail_timeout: choosing a peer whose window ran out restarts it.
        if self.now - view.checked[i] > g.servers[i].fail_timeout:
            view.checked[i] = self.now
            if view.fails[i]:
                changed(view)  # a probe is out: everyone leaves the peer alone again


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """Open a TCP connection to ``address`` (raises OSError / socket.timeout)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _raw(text: str) -> bytes:
    """A rendered key as the bytes nginx hashes: request data arrived as latin-1."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # literal text from the config beyond latin-1
        return text.encode("utf-8")
