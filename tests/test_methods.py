"""Unit tests of forklb.upstream.methods: nginx's ip_hash, hash, consistent hash,
least_conn and random methods, as pure functions of their inputs.

Nothing here opens a socket or reads a clock; ``tests/test_methods_vs_nginx.py``
checks the same objects against a running nginx.
"""

from __future__ import annotations

import ipaddress
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence, Set

import pytest

from forklb.upstream.balancer import Peer, SmoothWeightedRoundRobin, swrr_schedule
from forklb.upstream.methods import (
    MAX_TRIES,
    ConsistentHash,
    Hash,
    IpHash,
    LeastConn,
    Random,
    WeightedWalk,
    create,
    ip_hash_bytes,
    ip_hash_step,
    ketama_points,
    memcached_hash,
    split_server,
)

A, B, C, D = 0, 1, 2, 3


def linear_walk(weights: Sequence[int], value: int) -> int:
    """nginx's walk written as nginx writes it (the oracle for WeightedWalk)."""
    w = value % sum(weights)
    p = 0
    while w >= weights[p]:
        w -= weights[p]
        p += 1
    return p


class Recorder:
    """A ``usable`` predicate that records every index it is asked about."""

    def __init__(self, unusable: Set[int] = frozenset()) -> None:
        self.calls: list[int] = []
        self.unusable = unusable

    def __call__(self, i: int) -> bool:
        self.calls.append(i)
        return i not in self.unusable


def never(_: int) -> bool:
    return False


EVERY = frozenset(range(10_000))  # Recorder(EVERY): no peer is usable


def addresses(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.1" for _ in range(n)
    ]


# --------------------------------------------------------------------------- WeightedWalk


@pytest.mark.parametrize("weights", [[1], [1, 1, 1], [5, 1, 1], [1, 2, 3, 1, 5], [7, 3]])
def test_weighted_walk_matches_linear_walk(weights: list[int]) -> None:
    walk = WeightedWalk(weights)
    assert walk.total_weight == sum(weights)
    for value in range(3 * sum(weights) + 5):
        assert walk(value) == linear_walk(weights, value)
    assert walk(2**32 - 1) == linear_walk(weights, 2**32 - 1)


@pytest.mark.parametrize("weights", [[], [1, 0], [2, -1]])
def test_bad_weights_are_refused(weights: list[int]) -> None:
    with pytest.raises(ValueError):
        WeightedWalk(weights)
    with pytest.raises(ValueError):
        Hash(weights)


# --------------------------------------------------------------------------- ip_hash


def test_ip_hash_reference_example() -> None:
    """nginx-behaviour.md: 3 equal servers."""
    ih = IpHash([1, 1, 1])
    assert ih.pick("127.0.0.1") == C
    assert ih.pick("127.0.0.200") == C
    assert ih.pick("127.0.1.1") == A
    assert ih.pick("127.1.0.1") == B


def test_ip_hash_first_round_by_hand() -> None:
    # 127.0.0.x: 89 -> (89*113+127) % 6271 = 3913 -> 3199 -> 4040; 4040 % 3 = 2.
    assert ip_hash_step(89, bytes([127, 0, 0])) == 4040
    assert ip_hash_step(89, b"") == 89
    assert ip_hash_step(4040, bytes([127, 0, 0])) == ip_hash_step(89, bytes([127, 0, 0, 127, 0, 0]))


def test_ip_hash_bytes() -> None:
    assert ip_hash_bytes("192.168.7.200") == bytes([192, 168, 7])
    assert ip_hash_bytes(ipaddress.IPv4Address("10.1.2.3")) == bytes([10, 1, 2])
    assert ip_hash_bytes(bytes([10, 1, 2, 3])) == bytes([10, 1, 2])
    v6 = ipaddress.IPv6Address("2001:db8::1")
    assert ip_hash_bytes("2001:db8::1") == v6.packed
    assert ip_hash_bytes("[2001:db8::1]") == v6.packed
    assert ip_hash_bytes(v6) == v6.packed
    assert ip_hash_bytes(v6.packed) == v6.packed
    # An IPv4-mapped address arrives on an AF_INET6 socket: all 16 bytes count.
    assert len(ip_hash_bytes("::ffff:10.1.2.3")) == 16
    # UNIX-socket clients: nginx's pseudo address, three zero bytes.
    assert ip_hash_bytes(None) == b"\0\0\0"
    assert ip_hash_bytes("unix:") == b"\0\0\0"
    with pytest.raises(ValueError):
        ip_hash_bytes(b"\1\2\3")
    with pytest.raises(ValueError):
        ip_hash_bytes("not an address")


def test_ip_hash_uses_the_first_three_octets_only() -> None:
    ih = IpHash([1, 2, 3, 1, 5])
    for addr in addresses(200):
        prefix = addr.rsplit(".", 1)[0]
        assert {ih.pick(f"{prefix}.{last}") for last in (0, 1, 77, 254, 255)} == {ih.pick(addr)}


def test_ip_hash_ipv6_uses_all_sixteen_bytes() -> None:
    ih = IpHash([1] * 7)
    picks = {ih.pick(f"2001:db8::{i:x}") for i in range(1, 200)}
    assert len(picks) == 7  # the last byte moves clients around
    expected = linear_walk([1] * 7, ip_hash_step(89, ipaddress.IPv6Address("::1").packed))
    assert ih.pick("::1") == expected


@pytest.mark.parametrize("weights", [[1, 1], [1, 1, 1], [2, 1, 3], [1, 2, 3, 1, 5], [10, 1]])
def test_ip_hash_matches_oracle(weights: list[int]) -> None:
    ih = IpHash(weights)
    for addr in addresses(300):
        h = ip_hash_step(89, ip_hash_bytes(addr))
        assert ih.pick(addr) == linear_walk(weights, h)


def test_ip_hash_distribution_follows_weights() -> None:
    weights = [1, 2, 3, 4]
    ih = IpHash(weights)
    counts = Counter(ih.pick(f"10.{a}.{b}.1") for a in range(100) for b in range(100))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 10000 - w / 10) < 0.03, counts


def ip_rounds(addr: str, weights: list[int], n: int) -> list[int]:
    """Peers of the first ``n`` rounds (each folds the bytes into the previous hash)."""
    data = ip_hash_bytes(addr)
    h = 89
    out = []
    for _ in range(n):
        h = ip_hash_step(h, data)
        out.append(linear_walk(weights, h))
    return out


def test_ip_hash_unusable_peer_rehashes_from_current_hash() -> None:
    weights = [1, 1, 1, 1]
    rounds = ip_rounds("127.0.0.1", weights, 30)
    first = rounds[0]
    usable = Recorder({first})
    got = IpHash(weights).pick("127.0.0.1", usable)
    # Candidates are exactly the successive rounds until one is usable.
    k = next(k for k, p in enumerate(rounds) if p != first)
    assert usable.calls == rounds[: k + 1]
    assert got == rounds[k]


def test_ip_hash_gives_up_after_21_unusable_candidates() -> None:
    ih = IpHash([1, 1, 1])
    usable = Recorder(EVERY)
    cursor = ih.begin("10.0.0.1")
    assert cursor.next(usable) is None
    assert len(usable.calls) == MAX_TRIES + 1 == 21
    assert usable.calls == ip_rounds("10.0.0.1", [1, 1, 1], 21)
    # Round robin for the rest of the request: nothing more is asked.
    assert cursor.next(usable) is None
    assert cursor.next() is None
    assert len(usable.calls) == 21


def test_ip_hash_usable_on_the_21st_candidate() -> None:
    rounds = ip_rounds("10.0.0.1", [1, 1, 1], 21)
    seen: list[int] = []

    def usable(i: int) -> bool:
        seen.append(i)
        return len(seen) == 21

    assert IpHash([1, 1, 1]).pick("10.0.0.1", usable) == rounds[20]


def test_ip_hash_retry_continues_from_the_chosen_hash() -> None:
    """Second attempt of a request: fold once more from the hash of the first choice."""
    weights = [1, 1, 1, 1, 1]
    addr = "172.16.5.9"
    rounds = ip_rounds(addr, weights, 40)
    cursor = IpHash(weights).begin(addr)
    tried: set[int] = set()
    order = []
    for _ in range(5):
        index = cursor.next(lambda i: i not in tried)
        assert index is not None
        tried.add(index)
        order.append(index)
    # Each choice is the next round whose peer is not tried yet.
    expect = list(dict.fromkeys(rounds))[:5]
    assert order == expect
    assert sorted(order) == [0, 1, 2, 3, 4]


def test_ip_hash_tries_add_up_over_retries() -> None:
    cursor = IpHash([1, 1]).begin("10.9.8.7")
    tried: set[int] = set()
    first = cursor.next(lambda i: i not in tried)
    assert first is not None
    tried.add(first)
    second = cursor.next(lambda i: i not in tried)
    assert second == 1 - first
    tried.add(second)
    assert cursor.next(lambda i: i not in tried) is None  # 21 tried candidates


def test_ip_hash_single_peer_is_round_robin() -> None:
    usable = Recorder()
    assert IpHash([3]).pick("10.0.0.1", usable) is None
    assert usable.calls == []


def test_ip_hash_down_peer_keeps_its_weight() -> None:
    """A down peer stays in total_weight: other clients keep their server."""
    weights = [1, 1, 1, 1]
    ih = IpHash(weights)
    down = {B}
    for addr in addresses(300):
        before = ih.pick(addr)
        after = ih.pick(addr, lambda i: i not in down)
        if before != B:
            assert after == before


# --------------------------------------------------------------------------- hash KEY


def test_memcached_hash() -> None:
    assert memcached_hash(b"key", 0) == (zlib.crc32(b"key") >> 16) & 0x7FFF
    assert memcached_hash(b"key", 1) == (zlib.crc32(b"1key") >> 16) & 0x7FFF
    assert memcached_hash(b"key", 12) == (zlib.crc32(b"12key") >> 16) & 0x7FFF
    assert all(
        0 <= memcached_hash(f"k{i}".encode(), r) < 32768 for i in range(100) for r in range(3)
    )


def hash_rounds(key: bytes, weights: list[int], n: int) -> list[int]:
    total = 0
    out = []
    for r in range(n):
        total += (zlib.crc32((str(r).encode() if r else b"") + key) >> 16) & 0x7FFF
        out.append(linear_walk(weights, total))
    return out


@pytest.mark.parametrize("weights", [[1, 1], [1, 1, 1, 1], [2, 1, 3], [1, 2, 3, 1, 5]])
def test_hash_matches_oracle(weights: list[int]) -> None:
    h = Hash(weights)
    for i in range(500):
        key = f"key{i}"
        assert h.pick(key) == hash_rounds(key.encode(), weights, 1)[0]


def test_hash_str_and_bytes_keys() -> None:
    h = Hash([1, 2, 3])
    assert h.pick("clé") == h.pick("clé".encode())
    assert h.pick(b"a%2Fb") == hash_rounds(b"a%2Fb", [1, 2, 3], 1)[0]


def test_hash_distribution_follows_weights() -> None:
    weights = [1, 2, 3, 4]
    h = Hash(weights)
    counts = Counter(h.pick(f"user-{i}") for i in range(20000))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 20000 - w / 10) < 0.02, counts


def test_hash_unusable_peer_moves_to_the_next_round() -> None:
    weights = [1, 1, 1]
    for i in range(50):
        key = f"k{i}".encode()
        rounds = hash_rounds(key, weights, 30)
        usable = Recorder({rounds[0]})
        got = Hash(weights).pick(key, usable)
        k = next(k for k, p in enumerate(rounds) if p != rounds[0])
        assert usable.calls == rounds[: k + 1]
        assert got == rounds[k]


def test_hash_running_sum_is_cumulative() -> None:
    """Round r walks with the *sum* of rounds 0..r, not with round r alone."""
    key = b"cumulative"
    cursor = Hash([1] * 1000).begin(key)
    usable = Recorder(EVERY)
    cursor.next(usable)
    parts = [memcached_hash(key, r) for r in range(21)]
    sums = [sum(parts[: r + 1]) % 1000 for r in range(21)]
    assert usable.calls == sums
    assert cursor.rehash == 21 and cursor.tries == 21


def test_hash_gives_up_after_21_unusable_candidates() -> None:
    cursor = Hash([1, 1, 1]).begin("key")
    usable = Recorder(EVERY)
    assert cursor.next(usable) is None
    assert len(usable.calls) == 21
    assert usable.calls == hash_rounds(b"key", [1, 1, 1], 21)
    assert cursor.next(usable) is None
    assert len(usable.calls) == 21


def test_hash_retry_continues_the_rounds() -> None:
    weights = [1, 1, 1, 1]
    key = b"retry-me"
    rounds = hash_rounds(key, weights, 60)
    cursor = Hash(weights).begin(key)
    tried: set[int] = set()
    order = []
    for _ in range(4):
        index = cursor.next(lambda i: i not in tried)
        assert index is not None
        tried.add(index)
        order.append(index)
    assert order == list(dict.fromkeys(rounds))[:4]


@pytest.mark.parametrize("key", ["", b"", None])
def test_hash_empty_key_is_round_robin(key: str | bytes | None) -> None:
    usable = Recorder()
    assert Hash([1, 1]).pick(key, usable) is None
    assert usable.calls == []


def test_hash_single_peer_is_round_robin() -> None:
    assert Hash([5]).pick("key") is None


# --------------------------------------------------------------------------- consistent hash


@pytest.mark.parametrize(
    ("server", "host", "port"),
    [
        ("127.0.0.1:8081", b"127.0.0.1", b"8081"),
        ("127.0.0.1", b"127.0.0.1", b""),
        ("backend.example:80", b"backend.example", b"80"),
        ("backend.example", b"backend.example", b""),
        ("[::1]:8080", b"[::1]", b"8080"),
        ("[::1]", b"[::1]", b""),
        ("host:", b"host", b""),
        ("8080", b"8080", b""),
        ("unix:/run/app.sock", b"/run/app.sock", b""),
        ("UNIX:/run/app.sock", b"/run/app.sock", b""),
        ("a:b:12", b"a:b", b"12"),
        ("a:1b", b"a:1b", b""),
    ],
)
def test_split_server(server: str, host: bytes, port: bytes) -> None:
    assert split_server(server) == (host, port)


def test_ketama_points_chain() -> None:
    points = ketama_points("127.0.0.1:8081", 1)
    assert len(points) == 160
    base = b"127.0.0.1\x008081"
    assert points[0] == zlib.crc32(base + b"\0\0\0\0")
    for prev, point in zip(points, points[1:], strict=False):
        assert point == zlib.crc32(base + prev.to_bytes(4, "little"))
    # More weight extends the same chain.
    assert ketama_points("127.0.0.1:8081", 3)[:160] == points
    assert len(ketama_points("127.0.0.1:8081", 3)) == 480


def test_ring_is_sorted_and_deduplicated() -> None:
    servers = [f"10.0.0.{i}:80" for i in range(1, 5)]
    ch = ConsistentHash(servers, [1, 2, 1, 3])
    assert list(ch.points) == sorted(set(ch.points))
    every = [p for s, w in zip(servers, [1, 2, 1, 3], strict=True) for p in ketama_points(s, w)]
    assert set(ch.points) == set(every)
    assert len(ch.points) == len(set(every))
    owned = Counter(ch.servers[ch.groups[g][0]] for g in ch.owners)
    for s, w in zip(servers, [1, 2, 1, 3], strict=True):
        assert owned[s] == 160 * w  # no collision in this ring


def test_ring_points_of_the_same_text_collapse() -> None:
    """Two peers written the same way (a name with two addresses) share all points."""
    ch = ConsistentHash(["web:80", "web:80", "db:80"], [1, 1, 1])
    assert len(ch.points) == 320
    assert ch.groups == ((0, 1), (2,))


def test_consistent_lookup_is_first_point_at_or_after_crc() -> None:
    ch = ConsistentHash([f"10.0.0.{i}:80" for i in range(1, 5)], [1, 1, 1, 1])
    for i in range(500):
        key = f"key{i}".encode()
        crc = zlib.crc32(key)
        idx = next((j for j, p in enumerate(ch.points) if p >= crc), 0)  # wrap
        owner = ch.groups[ch.owners[idx]][0]
        assert ch.pick(key) == owner
        assert ch.start_point(key) % len(ch.points) == idx


def test_consistent_lookup_wraps_and_hits_exact_points() -> None:
    ch = ConsistentHash(["a:1", "b:2", "c:3"], [1, 1, 1])
    last_owner = ch.groups[ch.owners[0]][0]
    # Find keys whose crc is above the last point: they wrap to point 0.
    wrapped = [
        k for k in (f"w{i}".encode() for i in range(200000)) if zlib.crc32(k) > ch.points[-1]
    ][:5]
    assert wrapped
    for key in wrapped:
        assert ch.start_point(key) == len(ch.points)
        assert ch.pick(key) == last_owner
    assert ch.server_for_point(len(ch.points)) == ch.server_for_point(0)


def test_consistent_removing_one_of_four_moves_few_keys() -> None:
    servers = [f"192.168.0.{i}:8080" for i in range(1, 5)]
    full = ConsistentHash(servers, [1, 1, 1, 1])
    reduced = ConsistentHash(servers[:2] + servers[3:], [1, 1, 1])
    keys = [f"object-{i}" for i in range(1000)]
    before = [servers[full.pick(k)] for k in keys]  # type: ignore[index]
    after = [(servers[:2] + servers[3:])[reduced.pick(k)] for k in keys]  # type: ignore[index]
    moved = sum(b != a for b, a in zip(before, after, strict=True))
    assert moved <= 300
    # Ketama: only the removed server's keys move.
    assert all(b == a for b, a in zip(before, after, strict=True) if b != servers[2])
    assert moved == before.count(servers[2])


def test_consistent_down_server_equals_removed_server() -> None:
    """Skipping a down server's points lands where a ring without it would."""
    servers = [f"192.168.0.{i}:8080" for i in range(1, 5)]
    full = ConsistentHash(servers, [1, 2, 1, 1])
    reduced = ConsistentHash([servers[0], servers[2], servers[3]], [1, 1, 1])
    remap = [0, 2, 3]
    for i in range(1000):
        key = f"object-{i}"
        got = full.pick(key, lambda p: p != B)
        assert got == remap[reduced.pick(key)]  # type: ignore[index]


def test_consistent_distribution_follows_weights() -> None:
    weights = [1, 2, 3]
    ch = ConsistentHash(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], weights)
    counts = Counter(ch.pick(f"key-{i}") for i in range(20000))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 20000 - w / 6) < 0.05, counts
    equal = ConsistentHash([f"10.1.0.{i}:80" for i in range(4)], [1, 1, 1, 1])
    counts = Counter(equal.pick(f"key-{i}") for i in range(20000))
    assert all(abs(c / 20000 - 0.25) < 0.05 for c in counts.values()), counts


def test_consistent_server_text_as_written_matters() -> None:
    a = ConsistentHash(["localhost:8081", "127.0.0.1:8082"], [1, 1])
    b = ConsistentHash(["127.0.0.1:8081", "127.0.0.1:8082"], [1, 1])
    assert a.points != b.points
    picks_a = [a.pick(f"k{i}") for i in range(500)]
    picks_b = [b.pick(f"k{i}") for i in range(500)]
    assert picks_a != picks_b


def test_consistent_unusable_moves_point_by_point() -> None:
    servers = ["a:1", "b:1", "c:1"]
    ch = ConsistentHash(servers, [1, 1, 1])
    for i in range(100):
        key = f"k{i}"
        start = ch.start_point(key)
        first = ch.pick(key)
        usable = Recorder({first})  # type: ignore[arg-type]
        cursor = ch.begin(key)
        got = cursor.next(usable)
        # Walk the ring from the start point: the first point of another server.
        steps = 0
        while ch.groups[ch.owners[(start + steps) % len(ch.points)]][0] == first:
            steps += 1
        assert got == ch.groups[ch.owners[(start + steps) % len(ch.points)]][0]
        assert cursor.tries == steps
        assert usable.calls == [first] * steps + [got]


def test_consistent_gives_up_after_21_unusable_points() -> None:
    ch = ConsistentHash(["a:1", "b:1", "c:1"], [1, 1, 1])
    cursor = ch.begin("key")
    usable = Recorder(EVERY)
    assert cursor.next(usable) is None
    assert cursor.tries == 21
    start = ch.start_point("key")
    expected = [ch.groups[ch.owners[(start + s) % len(ch.points)]][0] for s in range(21)]
    assert usable.calls == expected
    assert cursor.next(usable) is None
    assert len(usable.calls) == 21


def test_consistent_retry_stays_on_the_point() -> None:
    """After a failure the request resumes at the same point; the tried peer moves it on."""
    ch = ConsistentHash(["a:1", "b:1", "c:1", "d:1"], [1, 1, 1, 1])
    cursor = ch.begin("session-42")
    tried: set[int] = set()
    first = cursor.next(lambda i: i not in tried)
    assert first is not None and cursor.tries == 0
    tried.add(first)
    second = cursor.next(lambda i: i not in tried)
    assert second is not None and second != first
    fresh = ch.begin("session-42")
    assert fresh.next(lambda i: i != first) == second


def test_consistent_same_text_peers_share_by_smooth_wrr() -> None:
    probe = ConsistentHash(["web:80", "web:80", "db:80"], [2, 1, 1])
    key = next(f"k{i}" for i in range(1000) if probe.pick(f"k{i}") in (0, 1))
    ch = ConsistentHash(["web:80", "web:80", "db:80"], [2, 1, 1])
    seq = [ch.pick(key) for _ in range(6)]
    assert seq == [0, 1, 0, 0, 1, 0]  # smooth WRR 2:1 within the "web:80" group
    # Only the group's peers take part: db's weights are untouched.
    assert ch.peers[2].current == 0
    # A tried peer of the group is skipped without leaving the point.
    cursor = ch.begin(key)
    assert cursor.next(lambda i: i != 0) == 1
    assert cursor.tries == 0


def test_consistent_shares_peer_state_with_round_robin() -> None:
    rr = SmoothWeightedRoundRobin([1, 1, 1])
    ch = ConsistentHash(["x:1", "x:1", "y:1"], [1, 1, 1], rr.peers)
    assert ch.peers is rr.peers
    with pytest.raises(ValueError):
        ConsistentHash(["x:1", "y:1"], [1, 2], [Peer(1), Peer(1)])
    with pytest.raises(ValueError):
        ConsistentHash(["x:1"], [1, 2])


@pytest.mark.parametrize("key", ["", None])
def test_consistent_empty_key_is_round_robin(key: str | None) -> None:
    assert ConsistentHash(["a:1", "b:1"], [1, 1]).pick(key) is None


def test_consistent_single_peer_is_round_robin() -> None:
    assert ConsistentHash(["a:1"], [4]).pick("key") is None


# --------------------------------------------------------------------------- least_conn


def test_least_conn_fewest_connections() -> None:
    lc = LeastConn([1, 1, 1])
    assert lc.pick(conns=[3, 1, 2]) == B
    assert lc.pick(conns=[0, 1, 2]) == A
    assert lc.pick(conns=[5, 5, 4]) == C


def test_least_conn_divides_by_weight() -> None:
    lc = LeastConn([1, 2])
    assert lc.pick(conns=[2, 3]) == B  # 2/1 > 3/2
    assert lc.pick(conns=[1, 3]) == A  # 1/1 < 3/2
    lc = LeastConn([3, 1])
    assert lc.pick(conns=[5, 2]) == A  # 5/3 < 2/1


def test_least_conn_lone_minimum_changes_no_weights() -> None:
    lc = LeastConn([1, 2, 3])
    lc.peers[2].effective = 1
    assert lc.pick(conns=[4, 0, 9]) == B
    assert [p.current for p in lc.peers] == [0, 0, 0]
    assert lc.peers[2].effective == 1


def test_least_conn_ties_follow_smooth_wrr() -> None:
    lc = LeastConn([5, 1, 1])
    seq = tuple(lc.pick(conns=[0, 0, 0]) for _ in range(14))
    assert seq == swrr_schedule([5, 1, 1]) * 2


def test_least_conn_ties_in_ratio_not_count() -> None:
    lc = LeastConn([2, 1])
    # 2/2 == 1/1: a tie, so smooth WRR 2:1 decides.
    assert [lc.pick(conns=[2, 1]) for _ in range(3)] == [A, B, A]


def test_least_conn_wrr_pass_covers_only_tied_peers() -> None:
    lc = LeastConn([1, 1, 1, 1])
    conns = [1, 0, 3, 0]
    assert [lc.pick(conns=conns) for _ in range(4)] == [B, D, B, D]
    assert lc.peers[A].current == 0 and lc.peers[C].current == 0


def test_least_conn_tie_after_a_superseded_tie() -> None:
    lc = LeastConn([1, 1, 1, 1])
    # A and B tie at 2, C beats them alone: no tie pass.
    assert lc.pick(conns=[2, 2, 1, 3]) == C
    assert all(p.current == 0 for p in lc.peers)


def test_least_conn_skips_unusable() -> None:
    lc = LeastConn([1, 1, 1])
    assert lc.pick(None, lambda i: i != B, [3, 0, 2]) == C
    assert lc.pick(None, never, [0, 0, 0]) is None


def test_least_conn_unusable_peer_is_not_part_of_the_tie() -> None:
    lc = LeastConn([1, 1, 1])
    assert [lc.pick(None, lambda i: i != A, [0, 0, 0]) for _ in range(4)] == [B, C, B, C]
    assert lc.peers[A].current == 0


def test_least_conn_conns_as_callable_read_once_each() -> None:
    lc = LeastConn([1, 1, 1])
    reads: list[int] = []

    def conns(i: int) -> int:
        reads.append(i)
        return [2, 0, 0][i]

    assert lc.pick(conns=conns) == B
    assert sorted(reads) == [A, B, C]


def test_least_conn_needs_conns() -> None:
    with pytest.raises(ValueError):
        LeastConn([1, 1]).pick()


def test_least_conn_single_peer_is_round_robin_unless_backups() -> None:
    assert LeastConn([1]).pick(conns=[0]) is None
    assert LeastConn([1], with_backup=True).pick(conns=[0]) == A
    assert LeastConn([1], with_backup=True).pick(None, never, [0]) is None


def test_least_conn_shares_state_with_round_robin() -> None:
    rr = SmoothWeightedRoundRobin([2, 2], max_fails=2)
    lc = LeastConn(rr.peers)
    rr.failed(A, now=100.0)  # effective 2 -> 1
    # The tie pass uses the lowered effective weight, then it climbs back.
    assert lc.pick(conns=[0, 0]) == B
    assert rr.peers[A].effective == 2
    assert lc.begin().next(conns=[0, 0]) == A


# --------------------------------------------------------------------------- random


def scripted(values: Sequence[int]) -> Callable[[], int]:
    it: Iterator[int] = iter(values)
    return lambda: next(it)


def test_random_draw_uses_cumulative_weights() -> None:
    weights = [1, 2, 3]
    r = Random(weights, scripted(range(12)))
    assert [r.peek() for _ in range(12)] == [A, B, B, C, C, C] * 2
    r = Random(weights, scripted([6, 7, 2**31 - 1]))
    assert [r.peek() for _ in range(3)] == [A, B, linear_walk(weights, 2**31 - 1)]


def test_random_with_seeded_generator_is_reproducible() -> None:
    weights = [1, 2, 3, 4]
    a = Random(weights, random.Random(7))
    b = Random(weights, random.Random(7))
    seq = [a.pick() for _ in range(100)]
    assert seq == [b.pick() for _ in range(100)]
    source = random.Random(7)
    assert seq == [linear_walk(weights, source.getrandbits(31)) for _ in range(100)]


def test_random_distribution_follows_weights() -> None:
    weights = [1, 2, 3, 4]
    r = Random(weights, random.Random(1))
    counts = Counter(r.pick() for _ in range(20000))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 20000 - w / 10) < 0.02, counts


def test_random_redraws_unusable_and_gives_up_after_21() -> None:
    r = Random([1, 1, 1], scripted([0, 1, 2]))
    assert r.pick(None, lambda i: i == C) == C
    draws = list(range(100))
    r = Random([1, 1, 1], scripted(draws))
    cursor = r.begin()
    usable = Recorder(EVERY)
    assert cursor.next(usable) is None
    assert len(usable.calls) == 21
    assert cursor.next(usable) is None  # round robin from now on
    assert len(usable.calls) == 21


def test_random_tries_carry_over_retries() -> None:
    r = Random([1, 1], scripted([0] * 30 + [1]))
    cursor = r.begin()
    assert cursor.next() == A
    tried = {A}
    # The retry keeps drawing the tried A: its 21st unusable draw hands over to round
    # robin (the B queued after 30 draws is never reached).
    assert cursor.next(lambda i: i not in tried) is None
    assert cursor.tries == 21


def test_random_single_peer_is_round_robin() -> None:
    assert Random([3], scripted([])).pick() is None
    assert Random([3], scripted([]), two=True).pick(conns=[0]) is None


def test_random_two_keeps_the_less_loaded() -> None:
    # Draws: A then B.
    assert Random([1, 1], scripted([0, 1]), two=True).pick(conns=[5, 1]) == B
    assert Random([1, 1], scripted([0, 1]), two=True).pick(conns=[1, 5]) == A
    # Tie: the second draw wins.
    assert Random([1, 1], scripted([0, 1]), two=True).pick(conns=[2, 2]) == B
    assert Random([1, 1], scripted([1, 0]), two=True).pick(conns=[2, 2]) == A


def test_random_two_compares_per_weight() -> None:
    # A (weight 1) first, B (weight 3) second: 2/1 vs 4/3 -> B.
    assert Random([1, 3], scripted([0, 1]), two=True).pick(conns=[2, 4]) == B
    # 1/1 vs 4/3: second has more per weight -> the first.
    assert Random([1, 3], scripted([0, 1]), two=True).pick(conns=[1, 4]) == A
    # 1/1 vs 3/3: tie -> second.
    assert Random([1, 3], scripted([0, 1]), two=True).pick(conns=[1, 3]) == B


def test_random_two_redraws_same_and_unusable() -> None:
    # Draws: A, A (same), C (unusable), B.
    r = Random([1, 1, 1], scripted([0, 0, 2, 1]), two=True)
    cursor = r.begin()
    usable = Recorder({C})
    assert cursor.next(usable, [0, 0, 0]) == B
    assert usable.calls == [A, C, B]  # the repeat of A is refused before asking
    # Accepting A cost a try, so did the repeat of A and the unusable C.
    assert cursor.tries == 3


def test_random_two_gives_up_after_21_draws_including_the_first() -> None:
    r = Random([1, 1], scripted([0] * 100), two=True)
    cursor = r.begin()
    assert cursor.next(conns=[0, 0]) is None
    assert cursor.tries == 21


def test_random_two_with_seeded_generator() -> None:
    weights = [1, 2, 3, 1]
    conns = [3, 1, 4, 0]
    r = Random(weights, random.Random(2024), two=True)
    source = random.Random(2024)
    for _ in range(200):
        got = r.pick(conns=conns)
        first = linear_walk(weights, source.getrandbits(31))
        second = linear_walk(weights, source.getrandbits(31))
        while second == first:
            second = linear_walk(weights, source.getrandbits(31))
        keep_first = conns[second] * weights[first] > conns[first] * weights[second]
        assert got == (first if keep_first else second)


def test_random_two_needs_conns() -> None:
    with pytest.raises(ValueError):
        Random([1, 1], scripted([0, 1]), two=True).pick()


def test_random_default_generator() -> None:
    r = Random([1, 1, 1])
    assert {r.pick() for _ in range(200)} == {A, B, C}


# --------------------------------------------------------------------------- factory


def test_create() -> None:
    servers = ["a:1", "b:1"]
    assert isinstance(create("ip_hash", servers, [1, 1]), IpHash)
    assert isinstance(create("hash", servers, [1, 1]), Hash)
    assert isinstance(create("hash consistent", servers, [1, 1]), ConsistentHash)
    assert isinstance(create("least_conn", servers, [1, 1]), LeastConn)
    rnd = create("random", servers, [1, 1], rng=scripted([1]))
    assert isinstance(rnd, Random) and not rnd.two and rnd.pick() == B
    for spec in ("random two", "random two least_conn"):
        two = create(spec, servers, [1, 1])
        assert isinstance(two, Random) and two.two
    rr = SmoothWeightedRoundRobin([1, 1])
    lc = create("least_conn", servers, [1, 1], peers=rr.peers)
    assert isinstance(lc, LeastConn) and lc.peers is rr.peers
    single = create("least_conn", ["a:1"], [1], with_backup=True)
    assert single.pick(conns=[0]) == A
    with pytest.raises(ValueError):
        create("fair", servers, [1, 1])


def test_every_method_has_the_common_interface() -> None:
    servers = ["a:1", "b:1", "c:1"]
    for spec in ("ip_hash", "hash", "hash consistent", "least_conn", "random", "random two"):
        method = create(spec, servers, [1, 2, 1], rng=random.Random(3))
        assert method.number == 3
        key = "10.0.0.1" if spec == "ip_hash" else "key"
        cursor = method.begin(key)
        first = cursor.next(lambda i: True, [0, 0, 0])
        assert first in (0, 1, 2)
        second = cursor.next(lambda i, first=first: i != first, [0, 0, 0])
        assert second in (0, 1, 2) and second != first
        assert method.pick(key, never, [0, 0, 0]) is None
