"""A worker's view of one upstream group: peer choice plus idle connections.

Each worker owns one :class:`UpstreamGroup` per ``upstream`` block.  Peers are
chosen by :class:`~forklb.upstream.balancer.SmoothWeightedRoundRobin`; idle
keep-alive connections to each peer wait in a LIFO stack (the most recently
used connection is the least likely to have been closed by the server), at
most ``keepalive`` of them for the whole group, as nginx's ``keepalive N``.

Runs inside a gevent worker: sockets here are gevent's (monkey-patched).
"""

from __future__ import annotations

import ctypes
import socket
import time

from forklb.model import Upstream
from forklb.upstream.balancer import SmoothWeightedRoundRobin, swrr_schedule


class UpstreamGroup:
    def __init__(self, upstream: Upstream, ticket: ctypes.c_uint64):
        self.name = upstream.name
        self.servers = upstream.servers
        self.addresses = [s.address for s in upstream.servers]
        self.labels = [_label(s.address) for s in upstream.servers]
        weights = [s.weight for s in upstream.servers]
        self.balancer = SmoothWeightedRoundRobin(weights)
        self.schedule = swrr_schedule(weights)
        self.ticket = ticket
        self.keepalive = upstream.keepalive
        self.idle: list[list[socket.socket]] = [[] for _ in upstream.servers]
        self.idle_count = 0
        self.all_tried = (1 << len(upstream.servers)) - 1

    def pick(self, tried: int) -> int | None:
        """Next peer: the shared schedule normally, local smooth WRR around failures."""
        now = time.monotonic()
        if tried or self.balancer.degraded(now):
            return self.balancer.pick(now, tried)
        ticket = self.ticket
        n = ticket.value
        ticket.value = n + 1
        return self.schedule[n % len(self.schedule)]

    def failed(self, index: int) -> None:
        self.balancer.failed(index, time.monotonic())

    def succeeded(self, index: int) -> None:
        self.balancer.succeeded(index, time.monotonic())

    def take_idle(self, index: int) -> socket.socket | None:
        stack = self.idle[index]
        if stack:
            self.idle_count -= 1
            return stack.pop()
        return None

    def give_back(self, index: int, sock: socket.socket) -> None:
        """Keep ``sock`` for reuse, or close it when the group holds enough."""
        if self.idle_count >= self.keepalive:
            sock.close()
            return
        self.idle[index].append(sock)
        self.idle_count += 1

    def close_idle(self) -> None:
        for stack in self.idle:
            while stack:
                stack.pop().close()
        self.idle_count = 0


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


def _label(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
