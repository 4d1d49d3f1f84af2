"""Unit tests of forklb.upstream.pool: UpstreamGroup and Choice, in one process.

Everything runs against a real :class:`SharedUpstreamState` (anonymous shared memory
works inside a single process too); two "workers" are two UpstreamGroups over the
same view with slots 0 and 1.  Time is driven by replacing the ``time`` module seen
by ``forklb.upstream.pool`` with a fake clock.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from forklb.http.variables import compile_template
from forklb.model import Balancing, Upstream, UpstreamServer
from forklb.upstream import methods, pool
from forklb.upstream.balancer import swrr_schedule
from forklb.upstream.pool import UpstreamGroup
from forklb.upstream.shared import (
    DOWN,
    DRAIN,
    HEALTHY,
    UNHEALTHY,
    UNKNOWN,
    UP,
    SharedUpstreamState,
    UpstreamView,
    changed,
)

NAMES = "abcdefgh"
ROUND_ROBIN = Balancing()


# --------------------------------------------------------------------------- helpers


@dataclass
class FakeExchange:
    """What Choice and Template.render read from a request."""

    remote_addr: str = "127.0.0.1"
    args: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    host: str = "localhost"
    uri: str = "/"
    target: str = "/"
    method: str = "GET"

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


class FakeClock:
    """Stands in for the ``time`` module inside forklb.upstream.pool."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str):
        return getattr(time, name)


class FakeSocket:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<FakeSocket {self.name}{' closed' if self.closed else ''}>"


def srv(port: int, **options) -> UpstreamServer:
    return UpstreamServer(f"127.0.0.1:{port}", ("127.0.0.1", port), **options)


def servers(*weights: int, **options) -> list[UpstreamServer]:
    return [srv(8081 + i, weight=w, **options) for i, w in enumerate(weights)]


class Setup:
    """One upstream ``up`` in its own shared region, and worker groups over it."""

    def __init__(self, server_list, balancing: Balancing = ROUND_ROBIN, keepalive: int = 4,
                 slots: int = 2) -> None:
        self.upstream = Upstream("up", tuple(server_list), keepalive, balancing)
        self.state = SharedUpstreamState({"up": self.upstream}, slots=slots)
        self.view: UpstreamView = self.state.view("up")

    def group(self, slot: int = 0) -> UpstreamGroup:
        return UpstreamGroup(self.upstream, self.view, slot)


def request(group: UpstreamGroup, ex: FakeExchange | None = None) -> int | None:
    """One successful request: choose, acquire, release, succeeded."""
    choice = group.start(ex or FakeExchange())
    index = choice.next()
    if index is not None:
        group.acquire(index)
        group.release(index)
        group.succeeded(index)
    return index


def letters(indices) -> str:
    return "".join("-" if i is None else NAMES[i] for i in indices)


def picks(group: UpstreamGroup, n: int, ex: FakeExchange | None = None) -> str:
    return letters(request(group, ex) for _ in range(n))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pool, "time", fake)
    return fake


# --------------------------------------------------------------------------- round robin


def test_swrr_schedule_5_1_1() -> None:
    assert letters(swrr_schedule([5, 1, 1])) == "aabacaa"
    assert letters(swrr_schedule([3, 2])) == "ababa"


def test_round_robin_5_1_1_follows_the_smooth_schedule() -> None:
    s = Setup(servers(5, 1, 1))
    g = s.group()
    assert picks(g, 21) == "aabacaa" * 3
    assert s.view.ticket.value == 21


def test_round_robin_3_2() -> None:
    s = Setup(servers(3, 2))
    assert picks(s.group(), 10) == "ababa" * 2


def test_two_workers_share_the_ticket_5_1_1() -> None:
    s = Setup(servers(5, 1, 1))
    w0, w1 = s.group(0), s.group(1)
    # Strict alternation between the workers: the combined sequence is the schedule.
    seq = [request(w) for _ in range(7) for w in (w0, w1)]
    assert letters(seq) == "aabacaa" * 2
    # Irregular interleaving keeps the one global sequence too.
    order = [w0, w0, w0, w1, w0, w1, w1, w1, w1, w0, w0, w1, w0, w1]
    assert letters(request(w) for w in order) == "aabacaa" * 2
    assert s.view.ticket.value == 28


def test_two_workers_alternate_exactly_one_to_one() -> None:
    s = Setup(servers(1, 1))
    w0, w1 = s.group(0), s.group(1)
    seq = []
    for n in range(40):
        # A worker serves two requests, then the other one.
        worker = w0 if n % 4 < 2 else w1
        seq.append(request(worker))
    assert letters(seq) == "ab" * 20
    assert Counter(seq) == {0: 20, 1: 20}
    # Each worker counted its own requests in its slot; the totals add up.
    assert s.view.total_requests(0) == 20 and s.view.total_requests(1) == 20
    size = s.view.size
    per_slot = [[s.view.requests[slot * size + i] for i in range(size)] for slot in (0, 1)]
    assert sum(map(sum, per_slot)) == 40
    assert all(sum(row) == 20 for row in per_slot), per_slot


def test_separate_regions_do_not_share_the_ticket() -> None:
    a, b = Setup(servers(1, 1)), Setup(servers(1, 1))
    ga, gb = a.group(0), b.group(1)
    assert letters(request(g) for _ in range(3) for g in (ga, gb)) == "aabbaa"


# --------------------------------------------------------------------------- failures


def test_failed_peer_excluded_until_fail_timeout_then_one_probe(clock: FakeClock) -> None:
    s = Setup(servers(1, 1, max_fails=2, fail_timeout=10.0))
    w0, w1 = s.group(0), s.group(1)
    view = s.view

    # First failure: 1 of max_fails=2, the peer is still chosen.
    c = w0.start(FakeExchange())
    assert c.next() == 0
    w0.failed(0)
    assert view.fails[0] == 1 and view.checked[0] == clock.now == view.accessed[0]
    assert c.next() == 1  # the retry goes to the other peer
    assert c.next() is None  # both tried
    assert 0 in [request(w0) for _ in range(4)]

    # Second failure (seen by the other worker): temporarily disabled for both.
    clock.advance(1)
    c = w1.start(FakeExchange())
    while (i := c.next()) != 0:
        assert i is not None
    w1.failed(0)
    assert view.fails[0] == 2
    assert view.failures[1 * view.size + 0] == 1 and view.failures[0] == 1
    failed_at = clock.now
    for _ in range(10):
        clock.advance(0.999)  # up to 9.99 s after the failure: excluded
        assert request(w0) == 1 and request(w1) == 1
    clock.now = failed_at + 10.0  # now - checked == fail_timeout: still excluded
    assert request(w0) == 1

    # Window over: the next choices reach it once (the probe), then it is
    # excluded again while the probe's outcome is unknown.
    clock.now = failed_at + 10.5
    probe = w1.start(FakeExchange())
    seen = []
    for _ in range(3):
        seen.append(probe.next() if not seen else request(w0))
        if seen[-1] == 0:
            break
    assert seen[-1] == 0, seen
    assert view.checked[0] == failed_at + 10.5  # choosing it restarted the window
    assert [request(w) for _ in range(5) for w in (w0, w1)] == [1] * 10

    # The probe fails: another full window without traffic.
    w1.failed(0)
    assert view.fails[0] == 3
    clock.advance(9.9)
    assert [request(w0) for _ in range(5)] == [1] * 5
    clock.advance(0.2)
    probe_seq = [request(w0) for _ in range(2)]
    assert 0 in probe_seq
    # This time the probe succeeds: fails are cleared, it is back in rotation.
    assert view.fails[0] == 0
    assert sorted(request(w) for _ in range(2) for w in (w0, w1)) == [0, 0, 1, 1]


def test_failures_below_max_fails_are_forgiven_after_fail_timeout(clock: FakeClock) -> None:
    s = Setup(servers(1, 1, max_fails=3, fail_timeout=5.0))
    g = s.group()
    g.failed(0)
    g.failed(0)
    assert s.view.fails[0] == 2
    assert picks(g, 4).count("a") == 2  # still in rotation
    assert s.view.fails[0] == 2  # a success inside the window does not clear them
    clock.advance(6)
    assert picks(g, 2).count("a") == 1
    assert s.view.fails[0] == 0  # first success after the window clears them


def test_max_fails_zero_never_disables(clock: FakeClock) -> None:
    s = Setup(servers(1, 1, max_fails=0))
    g = s.group()
    for _ in range(5):
        g.failed(0)
    assert picks(g, 6) == "ababab"


def test_all_failed_means_no_live_upstreams(clock: FakeClock) -> None:
    s = Setup(servers(1, 1, 1))  # max_fails=1, fail_timeout=10 (defaults)
    g = s.group()
    for i in range(3):
        g.failed(i)
    assert g.start(FakeExchange()).next() is None
    clock.advance(10.5)
    assert request(g) is not None


def test_single_server_is_never_marked_failed(clock: FakeClock) -> None:
    s = Setup([srv(8081, max_fails=1, fail_timeout=30.0)])
    g = s.group()
    for _ in range(5):
        c = g.start(FakeExchange())
        assert c.next() == 0
        g.failed(0)
        assert c.next() is None  # no other peer to retry on
    assert s.view.fails[0] == 0
    assert s.view.total_failures(0) == 5  # the attempts are still counted
    assert request(g) == 0


def test_single_primary_with_a_backup_can_fail(clock: FakeClock) -> None:
    s = Setup([srv(8081), srv(8082, backup=True)])
    g = s.group()
    g.failed(0)
    assert s.view.fails[0] == 1
    assert picks(g, 3) == "bbb"


# --------------------------------------------------------------------------- out of service


def test_down_server_is_never_chosen() -> None:
    s = Setup([srv(8081, weight=5), srv(8082, down=True), srv(8083)])
    assert picks(s.group(), 12) == "aaacaa" * 2


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("admin", DRAIN), ("admin", DOWN), ("health", UNHEALTHY)],
)
def test_admin_and_health_states_exclude_a_peer(field_name: str, value: int) -> None:
    s = Setup(servers(1, 1, 1))
    w0, w1 = s.group(0), s.group(1)
    getattr(s.view, field_name)[1] = value
    changed(s.view)
    seq = [request(w) for _ in range(6) for w in (w0, w1)]
    assert 1 not in seq
    assert Counter(seq) == {0: 6, 2: 6}
    getattr(s.view, field_name)[1] = UP if field_name == "admin" else HEALTHY
    changed(s.view)
    assert 1 in [request(w0) for _ in range(3)]


def test_health_unknown_and_healthy_are_in_service() -> None:
    s = Setup(servers(1, 1))
    s.view.health[0] = UNKNOWN
    changed(s.view)  # writers announce their changes
    s.view.health[1] = HEALTHY
    changed(s.view)  # writers announce their changes
    assert picks(s.group(), 4) == "abab"


def test_everything_out_of_service_is_no_live_upstreams() -> None:
    s = Setup([srv(8081, down=True), srv(8082)])
    s.view.admin[1] = DOWN
    changed(s.view)  # writers announce their changes
    assert s.group().start(FakeExchange()).next() is None


# --------------------------------------------------------------------------- backups


def test_backup_only_when_no_primary_is_usable(clock: FakeClock) -> None:
    s = Setup([srv(8081), srv(8082), srv(8083, backup=True), srv(8084, backup=True)])
    g = s.group()
    assert "c" not in picks(g, 20) and "d" not in picks(g, 20)

    # Within one request: both primaries, then the backups, then nothing.
    c = g.start(FakeExchange())
    tried = [c.next() for _ in range(5)]
    assert sorted(tried[:2]) == [0, 1] and sorted(tried[2:4]) == [2, 3] and tried[4] is None

    # Primaries out of service: backups, round robin between them.
    s.view.admin[0] = DOWN
    changed(s.view)  # writers announce their changes
    s.view.health[1] = UNHEALTHY
    changed(s.view)  # writers announce their changes
    assert sorted(picks(g, 4)) == list("ccdd")
    s.view.admin[0] = UP
    changed(s.view)  # writers announce their changes
    assert picks(g, 3) == "aaa"
    s.view.health[1] = UNKNOWN
    changed(s.view)  # writers announce their changes

    # Primaries failed (max_fails=1): backups until fail_timeout is over.
    g.failed(0)
    g.failed(1)
    assert set(picks(g, 6)) == {"c", "d"}
    clock.advance(11)
    assert set(picks(g, 4)) <= {"a", "b"}


def test_backup_with_max_conns_full_primaries() -> None:
    s = Setup([srv(8081, max_conns=1), srv(8082, backup=True)])
    g = s.group()
    assert request(g) == 0
    g.acquire(0)
    assert request(g) == 1
    g.release(0)
    assert request(g) == 0


def test_backup_failure_penalty_uses_the_backups_max_fails() -> None:
    # nginx: on failure effective -= weight // max_fails, nothing when max_fails=0.
    s = Setup([srv(8081, down=True), srv(8082, backup=True, weight=2, max_fails=0),
               srv(8083, backup=True)])
    g = s.group()
    first = request(g)
    assert first == 1
    g.failed(1)  # max_fails=0: no effective-weight penalty, as for a primary
    # Smooth WRR 2,1 without a penalty continues b1 b2 b1 (period "bcb").
    assert picks(g, 5) == "cbbcb"


def test_primary_failure_penalty_uses_max_fails() -> None:
    # The same situation with primaries: no penalty when max_fails=0.
    s = Setup([srv(8081, weight=2, max_fails=0), srv(8082), srv(8083, max_conns=9)])
    g = s.group()  # max_conns somewhere: smooth WRR runs locally, no ticket
    s.view.admin[2] = DOWN
    changed(s.view)  # writers announce their changes
    assert request(g) == 0
    g.failed(0)
    assert picks(g, 5) == "baaba"


# --------------------------------------------------------------------------- max_conns


def test_max_conns_counts_connections_of_every_worker() -> None:
    s = Setup([srv(8081, max_conns=1), srv(8082, max_conns=2)])
    w0, w1 = s.group(0), s.group(1)
    w0.acquire(0)
    assert s.view.total_conns(0) == 1
    assert [request(w) for w in (w0, w1, w0, w1)] == [1, 1, 1, 1]
    w1.acquire(1)
    w1.acquire(1)
    assert w0.start(FakeExchange()).next() is None  # everything at max_conns
    w1.release(1)
    assert request(w0) == 1
    w0.release(0)
    assert s.view.total_conns(0) == 0
    assert sorted(request(w0) for _ in range(2)) == [0, 1]


def _pick_in_a_worker(s: Setup, slot: int, go: int, report: int, rounds: int) -> None:
    """A forked child's loop: pick (and so acquire) and release as fast as it can,
    then report how often it held peer 0 and how often someone else held it too."""
    held = overs = 0
    try:
        os.read(go, 1)  # both workers start together
        g = s.group(slot)
        for _ in range(rounds):
            index = g.pick(g.start(FakeExchange()))
            if index == 0:
                held += 1
                overs += s.view.total_conns(0) > 1
            if index is not None:
                g.release(index)
        os.write(report, f"{held} {overs}\n".encode())
    finally:
        os._exit(0)


def test_max_conns_holds_for_workers_choosing_at_the_same_time() -> None:
    """Two processes pick from one shared state at full speed, as two workers on two
    CPUs: the peer with max_conns=1 is never held by both at once (checking its
    count and adding to it are one step under the upstream's lock)."""
    s = Setup([srv(8081, max_conns=1), srv(8082)], slots=2)
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    for slot in (0, 1):
        pid = os.fork()
        if pid == 0:
            _pick_in_a_worker(s, slot, go_r, report_w, rounds=30000)
        pids.append(pid)
    os.write(go_w, b"gg")
    try:
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        os.close(report_w)
        with os.fdopen(report_r) as f:
            reports = [tuple(map(int, line.split())) for line in f]
    finally:
        for fd in (go_r, go_w):
            os.close(fd)
    assert len(reports) == 2, reports
    assert all(held > 1000 for held, _ in reports), reports  # both really competed
    assert [overs for _, overs in reports] == [0, 0], reports


def test_lock_file_only_with_max_conns() -> None:
    """Every process of a generation inherits the lock file: only max_conns needs it."""
    assert Setup(servers(1, 1)).state.lock_fd == -1
    limited = Setup([srv(8081, max_conns=1), srv(8082)])
    fd = limited.state.lock_fd
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:forklb-upstream-locks")
    del limited  # a replaced generation's file is closed with it
    assert not os.path.exists(f"/proc/self/fd/{fd}")


def test_max_conns_not_reached_keeps_the_shared_sequence() -> None:
    s = Setup([srv(8081, max_conns=100), srv(8082, max_conns=100)])
    w0, w1 = s.group(0), s.group(1)
    # Far below the limits: the two workers should share one sequence, as without max_conns.
    assert letters(request(w) for _ in range(4) for w in (w0, w1)) == "abababab"


def test_max_conns_limited_group_still_weighted() -> None:
    s = Setup([srv(8081, weight=3, max_conns=10), srv(8082, weight=2)])
    assert picks(s.group(), 10) == "ababa" * 2


def test_acquire_release_accounting() -> None:
    s = Setup(servers(1, 1), slots=3)
    view = s.view
    w0, w2 = s.group(0), s.group(2)
    w0.acquire(1)
    w2.acquire(1)
    w2.acquire(0)
    assert view.conns[0 * 2 + 1] == 1 and view.conns[2 * 2 + 1] == 1
    assert view.conns[2 * 2 + 0] == 1
    assert view.total_conns(1) == 2 and view.total_conns(0) == 1
    assert view.total_requests(1) == 2 and view.total_requests(0) == 1
    w2.release(1)
    w2.release(0)
    w0.release(1)
    assert [view.total_conns(i) for i in range(2)] == [0, 0]
    assert [view.total_requests(i) for i in range(2)] == [1, 2]  # requests stay counted


# --------------------------------------------------------------------------- runtime weight


def test_runtime_weight_override() -> None:
    s = Setup(servers(1, 1))
    w0, w1 = s.group(0), s.group(1)
    assert picks(w0, 2) == "ab"
    s.view.weight[0] = 3
    changed(s.view)  # writers announce their changes
    s.view.ticket.value = 0
    seq = [request(w) for _ in range(4) for w in (w0, w1)]
    assert letters(seq) == letters(swrr_schedule([3, 1])) * 2
    s.view.weight[0] = 0  # back to the configured weight
    changed(s.view)  # writers announce their changes
    assert Counter(picks(w1, 10)) == {"a": 5, "b": 5}


def _weighted_hash_setup() -> tuple[Setup, UpstreamGroup, methods.Method]:
    s = Setup(servers(1, 1, 1), Balancing("hash", key=compile_template("$arg_k")))
    g = s.group()
    assert request(g, FakeExchange(args="k=warm")) is not None  # built with weights 1,1,1
    s.view.weight[2] = 5
    changed(s.view)  # writers announce their changes
    return s, g, methods.create("hash", [x.name for x in s.upstream.servers], [1, 1, 5])


def test_runtime_weight_override_applies_to_hash() -> None:
    s, g, model = _weighted_hash_setup()
    request(g, FakeExchange(args="k=first"))  # see the next test
    for n in range(1, 50):
        ex = FakeExchange(args=f"k=key{n}")
        assert request(g, ex) == model.pick(f"key{n}"), n


def test_first_request_after_weight_change_uses_new_weights() -> None:
    s, g, model = _weighted_hash_setup()
    # key0: weights 1,1,5 map it to peer 0, the old weights 1,1,1 to peer 2.
    assert model.pick("key0") == 0
    assert request(g, FakeExchange(args="k=key0")) == 0


# --------------------------------------------------------------------------- least_conn


def test_least_conn_prefers_fewer_connections() -> None:
    s = Setup(servers(1, 1, 1), Balancing("least_conn"))
    w0, w1 = s.group(0), s.group(1)
    w0.acquire(0)
    w1.acquire(0)
    w1.acquire(1)
    assert request(w0) == 2
    w0.acquire(2)
    w0.acquire(2)  # conns now a=2, b=1, c=2
    assert request(w1) == 1
    w0.release(0)
    w1.release(0)
    w1.release(1)
    w0.release(2)
    w0.release(2)
    assert [s.view.total_conns(i) for i in range(3)] == [0, 0, 0]
    # Equal counts: smooth WRR between the tied peers.
    assert sorted(picks(w0, 3)) == list("abc")


def test_least_conn_weighted_ratio() -> None:
    s = Setup(servers(3, 1), Balancing("least_conn"))
    g = s.group()
    for _ in range(2):
        g.acquire(0)  # 2/3 < 1/1
    g.acquire(1)
    assert request(g) == 0
    g.acquire(0)  # 3/3 == 1/1: a tie, smooth WRR (weight 3 first)
    assert request(g) == 0


def test_least_conn_retry_and_backup() -> None:
    s = Setup([srv(8081), srv(8082), srv(8083, backup=True), srv(8084, backup=True)],
              Balancing("least_conn"))
    g = s.group()
    g.acquire(0)
    c = g.start(FakeExchange())
    assert [c.next() for _ in range(2)] == [1, 0]
    g.acquire(3)
    assert c.next() == 2  # backups by least_conn too
    assert c.next() == 3
    assert c.next() is None


# --------------------------------------------------------------------------- hash methods


def _hash_setup(method: str, weights: list[int], down: int | None = None) -> Setup:
    if method == "ip_hash":
        balancing = Balancing("ip_hash")
    else:
        balancing = Balancing("hash", key=compile_template("$arg_k"),
                              consistent=method == "hash consistent")
    server_list = [srv(8081 + i, weight=w, down=i == down) for i, w in enumerate(weights)]
    return Setup(server_list, balancing)


@pytest.mark.parametrize("method", ["hash", "hash consistent", "ip_hash"])
@pytest.mark.parametrize("down", [None, 1])
def test_hash_methods_match_the_pure_methods(method: str, down: int | None) -> None:
    weights = [1, 2, 3, 1]
    s = _hash_setup(method, weights, down)
    w0, w1 = s.group(0), s.group(1)
    model = methods.create(method, [x.name for x in s.upstream.servers], weights)
    chosen = Counter()
    for n in range(200):
        if method == "ip_hash":
            key = f"10.{n % 7}.{n}.{n % 5 + 1}"
            ex = FakeExchange(remote_addr=key)
        else:
            key = f"key{n}"
            ex = FakeExchange(args=f"x=1&k={key}&k=other")
        expected = model.pick(key, lambda i: i != down)
        got = request(w0 if n % 2 else w1, ex)
        assert got == expected, (method, key)
        chosen[got] += 1
    assert down not in chosen
    assert len(chosen) == len(weights) - (down is not None)
    # The choice does not advance the round-robin ticket.
    assert s.view.ticket.value == 0


@pytest.mark.parametrize("method", ["hash", "hash consistent", "ip_hash"])
def test_hash_retry_follows_the_cursor(method: str) -> None:
    weights = [1, 1, 1, 1, 1]
    s = _hash_setup(method, weights)
    g = s.group()
    model = methods.create(method, [x.name for x in s.upstream.servers], weights)
    for n in range(30):
        key = f"10.{n}.0.1" if method == "ip_hash" else f"retry{n}"
        ex = FakeExchange(remote_addr=key, args=f"k={key}")
        c = g.start(ex)
        cursor = model.begin(key)
        tried: set[int] = set()
        got = []
        for _ in range(len(weights) + 1):
            got.append(c.next())
            if got[-1] is None:
                break
            tried.add(got[-1])
        expected = []
        tried2: set[int] = set()
        for _ in range(2):  # the cursor's first two choices (then it may hand over)
            i = cursor.next(lambda i, t=tried2: i not in t)
            expected.append(i)
            tried2.add(i)
        assert got[:2] == expected, (method, key)
        assert sorted(got[:-1]) == list(range(len(weights))) and got[-1] is None


@pytest.mark.parametrize("method", ["hash", "hash consistent"])
def test_hash_key_bytes_are_the_raw_request_bytes(method: str) -> None:
    s = Setup(servers(1, 1, 1, 1), Balancing("hash", key=compile_template("$http_x_key"),
                                             consistent=method == "hash consistent"))
    g = s.group()
    model = methods.create(method, [x.name for x in s.upstream.servers], [1, 1, 1, 1])
    for n in range(20):
        raw = f"caf\u00e9-{n}".encode()  # bytes as received in a header value
        ex = FakeExchange(headers={"x-key": raw.decode("latin-1")})  # as forklb stores them
        assert request(g, ex) == model.pick(raw), raw


def test_hash_empty_key_uses_round_robin() -> None:
    s = _hash_setup("hash", [5, 1, 1])
    g = s.group()
    assert picks(g, 7, FakeExchange(args="other=1")) == "aabacaa"


def test_ip_hash_same_slash_24_same_peer() -> None:
    s = _hash_setup("ip_hash", [1, 1, 1])
    g = s.group()
    assert request(g, FakeExchange(remote_addr="127.0.0.1")) == 2
    assert request(g, FakeExchange(remote_addr="127.0.0.200")) == 2
    assert request(g, FakeExchange(remote_addr="127.0.1.1")) == 0
    assert request(g, FakeExchange(remote_addr="127.1.0.1")) == 1


def test_hash_skips_failed_peer(clock: FakeClock) -> None:
    s = _hash_setup("hash", [1, 1, 1])
    g = s.group()
    model = methods.create("hash", [x.name for x in s.upstream.servers], [1, 1, 1])
    g.failed(0)  # max_fails=1: disabled for 10 s
    for n in range(40):
        key = f"f{n}"
        assert request(g, FakeExchange(args=f"k={key}")) == model.pick(key, lambda i: i != 0)


# --------------------------------------------------------------------------- idle connections


def test_idle_connections_accounting() -> None:
    s = Setup(servers(1, 1), keepalive=3)
    g = s.group()
    assert g.take_idle(0) is None
    s1, s2, s3, s4 = (FakeSocket(f"s{i}") for i in range(1, 5))
    g.give_back(0, s1)
    g.give_back(0, s2)
    g.give_back(1, s3)
    assert g.idle_count == 3
    g.give_back(1, s4)  # the group holds keepalive=3 already: the oldest to peer 1 goes
    assert s3.closed and not s4.closed and g.idle_count == 3
    assert g.take_idle(0) is s2  # LIFO: most recently used first
    assert g.idle_count == 2
    g.give_back(0, s2)
    assert g.idle_count == 3
    g.drop_idle(0)
    assert s1.closed and s2.closed and not s4.closed
    assert g.idle_count == 1 and g.take_idle(0) is None
    g.drop_idle(0)  # nothing left: no change
    assert g.idle_count == 1
    s5 = FakeSocket("s5")
    g.give_back(0, s5)
    g.close_idle()
    assert s4.closed and s5.closed and g.idle_count == 0
    assert g.take_idle(0) is None and g.take_idle(1) is None


def test_full_pool_with_nothing_idle_for_that_peer_closes_the_new_connection() -> None:
    s = Setup(servers(1, 1), keepalive=1)
    g = s.group()
    kept, extra = FakeSocket("kept"), FakeSocket("extra")
    g.give_back(0, kept)
    g.give_back(1, extra)
    assert extra.closed and not kept.closed and g.idle_count == 1


def test_keepalive_zero_keeps_nothing() -> None:
    s = Setup(servers(1, 1), keepalive=0)
    g = s.group()
    sock = FakeSocket("x")
    g.give_back(0, sock)
    assert sock.closed and g.idle_count == 0 and g.take_idle(0) is None


# --------------------------------------------------------------------------- steady_pick


def test_steady_pick_follows_the_shared_schedule_as_choice_does() -> None:
    s = Setup(servers(5, 1, 1))
    w0, w1 = s.group(0), s.group(1)
    fast = letters(w.steady_pick() for _ in range(7) for w in (w0, w1))
    assert fast == letters(swrr_schedule([5, 1, 1]) * 2)
    assert picks(Setup(servers(5, 1, 1)).group(), 14) == fast


def test_steady_pick_gives_way_to_choice_while_a_failure_is_on_record(clock: FakeClock) -> None:
    s = Setup(servers(1, 1, max_fails=3, fail_timeout=10.0))
    w0, w1 = s.group(0), s.group(1)
    assert w0.steady_pick() == 0
    w1.failed(1)  # another worker: 1 of 3, the peer stays in service
    assert w0.steady_pick() == -1
    # The Choice times the probe: after fail_timeout choosing the peer restarts
    # its window, and the success that follows clears the failures.
    clock.advance(11)
    while request(w0) != 1:
        pass
    assert s.view.fails[1] == 0
    assert w0.steady_pick() in (0, 1)


@pytest.mark.parametrize("setup", [
    lambda: Setup(servers(1, 1, max_conns=5)),
    lambda: Setup(servers(1, 1), Balancing(method="least_conn")),
    lambda: Setup([srv(8081, down=True), srv(8082, down=True)]),
])
def test_steady_pick_leaves_limits_methods_and_no_peers_to_choice(setup) -> None:
    assert setup().group().steady_pick() == -1


def test_start_after_a_steady_pick_does_not_offer_that_peer_again() -> None:
    g = Setup(servers(1, 1)).group()
    first = g.steady_pick()
    choice = g.start(FakeExchange(), first)
    assert choice.next() == 1 - first
    assert choice.next() is None
