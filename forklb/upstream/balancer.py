"""nginx's smooth weighted round robin, without I/O.

This is ``ngx_http_upstream_get_peer`` from ngx_http_upstream_round_robin.c:
each pass adds every eligible peer's effective weight to its current weight,
the highest current weight wins (ties: first listed) and the winner gives back
the total.  Weights 5,1,1 give ``a a b a c a a``; 3,2 give ``a b a b a``.

Failure accounting follows nginx too: a failure lowers the peer's effective
weight by ``weight // max_fails`` (it climbs back by one per pass) and, once
``max_fails`` failures have been seen inside ``fail_timeout``, the peer is
skipped until ``fail_timeout`` has passed; then one request probes it.  An
upstream with a single server is never marked failed.

The clock is passed in, so tests drive time explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Peer:
    weight: int
    max_fails: int = 1
    fail_timeout: float = 10.0
    current: int = 0
    effective: int = 0
    fails: int = 0
    accessed: float = 0.0
    checked: float = 0.0

    def __post_init__(self) -> None:
        self.effective = self.weight


class SmoothWeightedRoundRobin:
    """Peer selection state for one upstream group (in one process)."""

    def __init__(self, weights: list[int], max_fails: int = 1, fail_timeout: float = 10.0):
        if not weights:
            raise ValueError("an upstream needs at least one peer")
        self.peers = [Peer(w, max_fails, fail_timeout) for w in weights]
        self.single = len(weights) == 1
        # Some peer counts as failed until then; -inf: no failure yet, so even a
        # clock reading 0 (monotonic clocks may start there) is not degraded.
        self.degraded_until = float("-inf")

    def degraded(self, now: float) -> bool:
        """True while a failure may still affect choices (fail_timeout not over)."""
        return now <= self.degraded_until

    def _eligible(self, peer: Peer, now: float) -> bool:
        return not (
            peer.max_fails
            and peer.fails >= peer.max_fails
            and now - peer.checked <= peer.fail_timeout
        )

    def pick(self, now: float, tried: int = 0) -> int | None:
        """Index of the next peer, skipping those whose bit is set in ``tried``.

        Returns None when no peer is eligible (nginx: "no live upstreams").
        """
        if self.single:
            return None if tried & 1 else 0
        peers = self.peers
        index = self.choose(lambda i: not tried >> i & 1 and self._eligible(peers[i], now))
        if index is not None and now - peers[index].checked > peers[index].fail_timeout:
            peers[index].checked = now
        return index

    def choose(self, usable: Callable[[int], bool]) -> int | None:
        """One smooth-WRR pass over the peers for which ``usable(i)`` holds.

        The caller decides eligibility (tries, failures, limits, admin state);
        this only does nginx's weight arithmetic.  None when nothing is usable.
        """
        best: Peer | None = None
        best_index = -1
        total = 0
        for i, peer in enumerate(self.peers):
            if not usable(i):
                continue
            peer.current += peer.effective
            total += peer.effective
            if peer.effective < peer.weight:
                peer.effective += 1
            if best is None or peer.current > best.current:
                best, best_index = peer, i
        if best is None:
            return None
        best.current -= total
        return best_index

    def failed(self, index: int, now: float) -> None:
        """Record a failed attempt on peer ``index`` (error, timeout, bad header)."""
        if self.single:
            return
        peer = self.peers[index]
        peer.fails += 1
        peer.accessed = now
        peer.checked = now
        self.degraded_until = max(self.degraded_until, now + peer.fail_timeout)
        self.penalize(index)

    def penalize(self, index: int) -> None:
        """nginx's effective-weight drop on failure (it climbs back by one per pass)."""
        peer = self.peers[index]
        if peer.max_fails:
            peer.effective = max(0, peer.effective - peer.weight // peer.max_fails)

    def succeeded(self, index: int, now: float) -> None:
        """Record a successful attempt; a probe after fail_timeout clears the failures."""
        peer = self.peers[index]
        if peer.accessed < peer.checked:
            peer.fails = 0


def swrr_schedule(weights: list[int]) -> tuple[int, ...]:
    """One full period (``sum(weights)`` picks) of smooth WRR with no failures.

    Workers share a ticket counter and index this schedule with it, so the
    sequence is the same whichever worker serves each request.
    """
    rr = SmoothWeightedRoundRobin(weights, max_fails=0)
    return tuple(rr.pick(0.0) for _ in range(sum(weights)))  # type: ignore[misc]
