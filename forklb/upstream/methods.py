"""nginx's other load-balancing methods, without I/O.

Pure code: no sockets, no gevent, no clock.  Everything that changes at run time
(which peers are usable, the live connection counts, random numbers) is passed in,
so the same objects work inside a worker (counts read from shared memory) and in
unit tests.

Methods and the nginx 1.22 functions they mirror:

==========================  ======================================================
:class:`IpHash`             ``ngx_http_upstream_get_ip_hash_peer``
:class:`Hash`               ``ngx_http_upstream_get_hash_peer``
:class:`ConsistentHash`     ``ngx_http_upstream_init_chash`` (ring),
                            ``ngx_http_upstream_init_chash_peer`` (start point),
                            ``ngx_http_upstream_get_chash_peer``
:class:`LeastConn`          ``ngx_http_upstream_get_least_conn_peer``
:class:`Random`             ``ngx_http_upstream_get_random_peer`` and, with
                            ``two=True``, ``ngx_http_upstream_get_random2_peer``
==========================  ======================================================

The API
-------

A method object is built once per upstream group from its *peers* in config order
(one peer per resolved address, as nginx: ``server localhost:80`` resolving to two
addresses is two peers sharing the written text ``"localhost:80"``; ``down`` peers
are included, they keep their place and weight).  Then, per request::

    cursor = method.begin(key)          # the hash key / client address; ignored by
                                        # least_conn and random
    index = cursor.next(usable, conns)  # first peer
    ...                                 # that peer failed: mark it tried
    index = cursor.next(usable, conns)  # next peer (proxy_next_upstream)

``method.pick(key, usable, conns)`` is ``begin(key).next(usable, conns)`` for the
common single-attempt case.

``usable(i)`` says whether peer ``i`` may be chosen *now*: not ``down``, not
failed (``fails >= max_fails`` within ``fail_timeout``), below ``max_conns`` and not
already tried for this request.  nginx makes exactly these four checks and
treats any of them failing the same way ("goto next"), so one predicate suffices.

``conns`` is the per-peer count of active connections, a sequence or a callable
``conns(i) -> int`` (least_conn, random two).

A cursor returns a peer index, or ``None`` meaning "this method does not choose:
hand the request to round robin" -- nginx calls
``ngx_http_upstream_get_round_robin_peer`` in every such case:

* the upstream has a single peer (round robin then returns it unless it is ``down``
  or at ``max_conns``, ignoring failures and tries);
* hash: the key is empty;
* hash, ip_hash, consistent hash, random: more than 20 unusable candidates were met
  for this request (the counter lives in the cursor and never resets, so every
  later ``next`` returns ``None`` too);
* least_conn: no peer is usable (round robin finds none either; nginx's least_conn
  then switches to the ``backup`` list and runs least_conn there -- build a second
  :class:`LeastConn` over the backups for that).

After a choice the caller does nginx's bookkeeping: ``conns[i] += 1``, set the
tried bit, ``checked = now`` if ``now - checked > fail_timeout``.

Smooth-WRR state (``current``/``effective`` weights) used by least_conn's tie
break and by the consistent hash (several peers with the same written address)
lives in :class:`forklb.upstream.balancer.Peer` objects; pass ``rr.peers`` of the
group's :class:`~forklb.upstream.balancer.SmoothWeightedRoundRobin` to share it
with round robin and its failure accounting, as nginx shares it.
"""

from __future__ import annotations

import ipaddress
import random as _random
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Protocol

from forklb.upstream.balancer import Peer

Usable = Callable[[int], bool]
Conns = Sequence[int] | Callable[[int], int]
ClientAddress = str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address | None
HashKey = str | bytes

#: nginx gives up hashing after this many unusable candidates (``tries > 20``).
MAX_TRIES = 20
#: Points per unit of weight on the consistent-hash ring (Cache::Memcached::Fast).
POINTS_PER_WEIGHT = 160

_IP_HASH_PSEUDO_ADDR = b"\0\0\0"  # ngx_http_upstream_ip_hash_pseudo_addr (AF_UNIX clients)


def _always(_: int) -> bool:
    return True


def _conns_getter(conns: Conns | None) -> Callable[[int], int]:
    if conns is None:
        raise ValueError("this method needs the peers' connection counts (conns)")
    if callable(conns):
        return conns
    return conns.__getitem__


def _check_weights(weights: Sequence[int]) -> tuple[int, ...]:
    if not weights:
        raise ValueError("an upstream needs at least one peer")
    if any(w < 1 for w in weights):
        raise ValueError(f"weights must be >= 1, got {list(weights)}")
    return tuple(weights)


def _peers_for(weights: Sequence[int], peers: Sequence[Peer] | None) -> Sequence[Peer]:
    if peers is None:
        return [Peer(w) for w in weights]
    if [p.weight for p in peers] != list(weights):
        raise ValueError("peers do not match the weights")
    return peers


def _swrr_pass(peers: Sequence[Peer], candidates: Sequence[int]) -> int | None:
    """One smooth-WRR round over ``candidates`` (indices, in peer order).

    The loop nginx repeats inline in least_conn and the consistent hash: every
    candidate's current weight grows by its effective weight, the effective weight
    recovers by one towards the weight, the highest current weight wins (ties: the
    first) and gives back the round's total.
    """
    best = -1
    total = 0
    for i in candidates:
        peer = peers[i]
        peer.current += peer.effective
        total += peer.effective
        if peer.effective < peer.weight:
            peer.effective += 1
        if best < 0 or peer.current > peers[best].current:
            best = i
    if best < 0:
        return None
    peers[best].current -= total
    return best


class WeightedWalk:
    """nginx's ``w = hash % total_weight; while (w >= peer->weight) ...`` walk.

    Maps ``value % total_weight`` to the peer whose weight interval contains it
    (bisection over the cumulative weights; same result as nginx's linear walk).
    """

    __slots__ = ("ends", "total_weight")

    def __init__(self, weights: Sequence[int]) -> None:
        self.ends = tuple(accumulate(_check_weights(weights)))
        self.total_weight = self.ends[-1]

    def __call__(self, value: int) -> int:
        return bisect_right(self.ends, value % self.total_weight)


# --------------------------------------------------------------------------- protocols


class Cursor(Protocol):
    """Per-request selection state (nginx's ``*_peer_data_t``)."""

    def next(self, usable: Usable = _always, conns: Conns | None = None) -> int | None:
        """Index of the next peer to try, or None: hand over to round robin."""
        ...


class Method(Protocol):
    """A balancing method built once per upstream group."""

    #: Number of peers (``peers->number``).
    number: int

    def begin(self, key: Any = None) -> Cursor:
        """Start selecting for one request."""
        ...

    def pick(
        self, key: Any = None, usable: Usable = _always, conns: Conns | None = None
    ) -> int | None:
        """``begin(key).next(usable, conns)``."""
        ...


class _MethodBase:
    number: int

    def begin(self, key: Any = None) -> Cursor:  # pragma: no cover - overridden
        raise NotImplementedError

    def pick(
        self, key: Any = None, usable: Usable = _always, conns: Conns | None = None
    ) -> int | None:
        """Choose one peer for a fresh request: ``begin(key).next(usable, conns)``."""
        return self.begin(key).next(usable, conns)


# --------------------------------------------------------------------------- ip_hash


def ip_hash_bytes(addr: ClientAddress) -> bytes:
    """The bytes ip_hash hashes for a client address.

    IPv4: the first three octets (the /24).  IPv6: all sixteen bytes (an IPv4-mapped
    address such as ``::ffff:1.2.3.4`` stays IPv6, as its socket family is AF_INET6).
    ``None`` or a ``"unix:..."`` string (a client on a UNIX socket): nginx's pseudo
    address, three zero bytes.  ``bytes`` of length 4 or 16 are packed addresses.
    """
    if addr is None:
        return _IP_HASH_PSEUDO_ADDR
    if isinstance(addr, bytes):
        if len(addr) == 4:
            return addr[:3]
        if len(addr) == 16:
            return addr
        raise ValueError(f"a packed address has 4 or 16 bytes, not {len(addr)}")
    if isinstance(addr, str):
        if addr.startswith("unix:"):
            return _IP_HASH_PSEUDO_ADDR
        addr = ipaddress.ip_address(addr.strip("[]"))
    packed = addr.packed
    return packed[:3] if addr.version == 4 else packed


def ip_hash_step(hash_value: int, data: bytes) -> int:
    """One ip_hash round: ``hash = (hash * 113 + byte) % 6271`` over ``data``."""
    for byte in data:
        hash_value = (hash_value * 113 + byte) % 6271
    return hash_value


class IpHash(_MethodBase):
    """``ip_hash``: ``ngx_http_upstream_get_ip_hash_peer``.

    The hash starts at 89.  Each round folds the address bytes into the *current*
    hash (it does not restart from 89: round ``k`` hashes the bytes ``k`` times in a
    row), takes ``hash % total_weight`` and walks the peers' weights.  An unusable
    peer costs one try and starts another round from the hash just computed; the 21st
    unusable candidate (``++tries > 20``) hands over to round robin.  The hash of the
    chosen peer is kept, so a retry of the same request (next ``next``) starts by
    folding the bytes into it once more.  Upstreams of one peer use round robin.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = _check_weights(weights)
        self.number = len(self.weights)
        self.walk = WeightedWalk(self.weights)

    def begin(self, key: ClientAddress = None) -> IpHashCursor:
        """Start selecting for a client at address ``key`` (see :func:`ip_hash_bytes`)."""
        return IpHashCursor(self, ip_hash_bytes(key))


class IpHashCursor:
    """One request's ip_hash state: the hash of the last choice (89 at first), tries."""

    __slots__ = ("method", "addr", "hash", "tries")

    def __init__(self, method: IpHash, addr: bytes) -> None:
        self.method = method
        self.addr = addr
        self.hash = 89
        self.tries = 0

    def next(self, usable: Usable = _always, conns: Conns | None = None) -> int | None:
        m = self.method
        if self.tries > MAX_TRIES or m.number < 2:
            return None
        h = self.hash
        while True:
            h = ip_hash_step(h, self.addr)
            index = m.walk(h)
            if usable(index):
                self.hash = h
                return index
            self.tries += 1
            if self.tries > MAX_TRIES:
                return None


# --------------------------------------------------------------------------- hash KEY


def _key_bytes(key: HashKey | None) -> bytes:
    if key is None:
        return b""
    return key.encode() if isinstance(key, str) else bytes(key)


def memcached_hash(key: bytes, rehash: int) -> int:
    """Round ``rehash`` of Cache::Memcached's hash: ``(crc32([REHASH] KEY) >> 16) & 0x7fff``.

    ``REHASH`` is the decimal round number, omitted in round 0.
    """
    crc = zlib.crc32(key, zlib.crc32(str(rehash).encode())) if rehash else zlib.crc32(key)
    return (crc >> 16) & 0x7FFF


class Hash(_MethodBase):
    """``hash KEY`` (Cache::Memcached compatible): ``ngx_http_upstream_get_hash_peer``.

    Round ``r`` adds ``memcached_hash(key, r)`` to a running 32-bit sum (starting at
    0) and walks the weights with ``sum % total_weight``.  Round 0 hashes the bare key,
    round 1 ``"1" + key`` and so on.  An unusable peer costs one try and moves to the
    next round; the 21st unusable candidate hands over to round robin, as does an
    empty key or a single-peer upstream.  Sum, round and tries live in the cursor
    and carry over to retries of the same request.

    Keys are the variable's bytes exactly as nginx sees them (``$arg_k`` is still
    percent-encoded); ``str`` keys are UTF-8 encoded.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = _check_weights(weights)
        self.number = len(self.weights)
        self.walk = WeightedWalk(self.weights)

    def begin(self, key: HashKey | None = None) -> HashCursor:
        """Start selecting for ``key``."""
        return HashCursor(self, _key_bytes(key))


class HashCursor:
    """One request's hash state: running sum, next round number, tries."""

    __slots__ = ("method", "key", "hash", "rehash", "tries")

    def __init__(self, method: Hash, key: bytes) -> None:
        self.method = method
        self.key = key
        self.hash = 0
        self.rehash = 0
        self.tries = 0

    def next(self, usable: Usable = _always, conns: Conns | None = None) -> int | None:
        m = self.method
        if self.tries > MAX_TRIES or m.number < 2 or not self.key:
            return None
        while True:
            self.hash = (self.hash + memcached_hash(self.key, self.rehash)) & 0xFFFFFFFF
            self.rehash += 1
            index = m.walk(self.hash)
            if usable(index):
                return index
            self.tries += 1
            if self.tries > MAX_TRIES:
                return None


# --------------------------------------------------------------------------- hash KEY consistent


def split_server(server: str) -> tuple[bytes, bytes]:
    """HOST and PORT of a server address as written, as ``ngx_http_upstream_init_chash``.

    ``unix:PATH`` (any case) gives ``(PATH, "")``.  Otherwise the port is the run of
    digits after the last ``:``, if the text ends with ``:DIGITS`` (``"h:"`` gives an
    empty port); without one the whole text is the host and the port is empty.  So
    ``"10.0.0.1"`` is host ``10.0.0.1``, port ``""``, even though nginx connects to
    port 80, and ``"[::1]:80"`` is host ``[::1]``, port ``80``.
    """
    data = server.encode()
    if len(data) >= 5 and data[:5].lower() == b"unix:":
        return data[5:], b""
    j = len(data)
    while j > 0 and data[j - 1 : j].isdigit():
        j -= 1
    if j > 0 and data[j - 1 : j] == b":":
        return data[: j - 1], data[j:]
    return data, b""


def ketama_points(server: str, weight: int) -> list[int]:
    """The ``weight * 160`` ring points of one peer, in generation order.

    ``base = crc32(HOST "\\0" PORT)``; point ``k`` is the CRC continued from ``base``
    over the previous point as 4 little-endian bytes (0 for the first point).
    """
    host, port = split_server(server)
    base = zlib.crc32(host + b"\0" + port)
    points = []
    prev = 0
    for _ in range(weight * POINTS_PER_WEIGHT):
        prev = zlib.crc32(prev.to_bytes(4, "little"), base)
        points.append(prev)
    return points


class ConsistentHash(_MethodBase):
    """``hash KEY consistent`` (ketama): nginx's chash functions.

    The ring is built once: every peer (``down`` ones too) contributes
    :func:`ketama_points`; points are sorted and equal hashes kept once (the first
    after a stable sort by hash, i.e. the earlier peer; nginx uses ``qsort``, so which
    server keeps a point shared by two different servers -- a CRC collision -- is up
    to the C library).  A point belongs to a *written server text*, not to a peer.

    A request starts at the first point ``>= crc32(key)`` (past the last point: wraps
    to the first).  At each point, the usable peers whose written text equals the
    point's run one smooth-WRR round (usually a single peer); if there is none the
    request moves to the next point (wrapping) and spends one try; more than 20
    tries hand over to round robin, as do an empty key and a single-peer upstream.
    A retry of the same request starts again at the point of the last choice (its
    peer is tried by then, so with one peer per text it moves on).

    ``servers`` are the peers' addresses as written in the config (e.g.
    ``"127.0.0.1:8081"``, ``"backend.example:80"``), one per peer.
    """

    def __init__(
        self,
        servers: Sequence[str],
        weights: Sequence[int],
        peers: Sequence[Peer] | None = None,
    ) -> None:
        self.weights = _check_weights(weights)
        if len(servers) != len(self.weights):
            raise ValueError("one server text per peer is needed")
        self.servers = tuple(servers)
        self.number = len(self.weights)
        self.peers = _peers_for(self.weights, peers)
        texts = list(dict.fromkeys(self.servers))
        group_of_text = {text: g for g, text in enumerate(texts)}
        #: Peer indices of each distinct server text, in peer order.
        self.groups: tuple[tuple[int, ...], ...] = tuple(
            tuple(i for i, s in enumerate(self.servers) if s == text) for text in texts
        )
        ring: list[tuple[int, int]] = []
        for server, weight in zip(self.servers, self.weights, strict=True):
            group = group_of_text[server]
            ring.extend((point, group) for point in ketama_points(server, weight))
        ring.sort(key=lambda item: item[0])  # stable: equal hashes keep peer order
        hashes: list[int] = []
        owners: list[int] = []
        for point, group in ring:
            if not hashes or hashes[-1] != point:
                hashes.append(point)
                owners.append(group)
        #: Sorted distinct ring points and the server group owning each.
        self.points: tuple[int, ...] = tuple(hashes)
        self.owners: tuple[int, ...] = tuple(owners)

    def start_point(self, key: HashKey) -> int:
        """Index of the first ring point ``>= crc32(key)`` (may be ``len(points)``)."""
        return bisect_left(self.points, zlib.crc32(_key_bytes(key)))

    def server_for_point(self, point: int) -> str:
        """Written server text owning ring position ``point`` (wrapping)."""
        return self.servers[self.groups[self.owners[point % len(self.points)]][0]]

    def begin(self, key: HashKey | None = None) -> ConsistentHashCursor:
        """Start selecting for ``key``."""
        data = _key_bytes(key)
        return ConsistentHashCursor(self, data, self.start_point(data))


class ConsistentHashCursor:
    """One request's consistent-hash state: current ring position, tries."""

    __slots__ = ("method", "key", "point", "tries")

    def __init__(self, method: ConsistentHash, key: bytes, point: int) -> None:
        self.method = method
        self.key = key
        self.point = point
        self.tries = 0

    def next(self, usable: Usable = _always, conns: Conns | None = None) -> int | None:
        m = self.method
        if self.tries > MAX_TRIES or m.number < 2 or not self.key:
            return None
        npoints = len(m.points)
        while True:
            group = m.groups[m.owners[self.point % npoints]]
            best = _swrr_pass(m.peers, [i for i in group if usable(i)])
            if best is not None:
                return best
            self.point += 1
            self.tries += 1
            if self.tries > MAX_TRIES:
                return None


# --------------------------------------------------------------------------- least_conn


class LeastConn(_MethodBase):
    """``least_conn``: ``ngx_http_upstream_get_least_conn_peer``.

    Among usable peers, the smallest ``conns / weight`` wins, compared exactly as
    ``p.conns * best.weight < best.conns * p.weight``.  When several usable peers share
    that smallest ratio they run one smooth-WRR round among themselves only (their
    current weights grow, the winner gives back the round's total; peers outside the
    tie are untouched).  A lone minimum changes no weights.

    ``peers`` are the group's :class:`~forklb.upstream.balancer.Peer` objects (share
    ``SmoothWeightedRoundRobin.peers``), or ints for fresh ones.  ``with_backup``: the
    group has ``backup`` servers, so a single primary is not "single" (nginx then
    still runs least_conn over it).
    """

    def __init__(self, peers: Sequence[Peer] | Sequence[int], *, with_backup: bool = False):
        if not peers:
            raise ValueError("an upstream needs at least one peer")
        if all(isinstance(p, int) for p in peers):
            weights = _check_weights(peers)  # type: ignore[arg-type]
            self.peers: Sequence[Peer] = [Peer(w) for w in weights]
        else:
            self.peers = peers  # type: ignore[assignment]
            _check_weights([p.weight for p in self.peers])
        self.number = len(self.peers)
        self.single = self.number == 1 and not with_backup

    def begin(self, key: Any = None) -> LeastConnCursor:
        """Start selecting for one request (``key`` is ignored)."""
        return LeastConnCursor(self)

    def choose(self, usable: Usable, conns: Conns | None) -> int | None:
        """One least_conn choice (no per-request state besides ``usable``)."""
        if self.single:
            return None
        get = _conns_getter(conns)
        peers = self.peers
        candidates: list[tuple[int, int]] = []  # (index, conns), read once each
        best = -1
        best_conns = 0
        many = False
        for i in range(self.number):
            if not usable(i):
                continue
            c = get(i)
            candidates.append((i, c))
            if best < 0 or c * peers[best].weight < best_conns * peers[i].weight:
                best, best_conns, many = i, c, False
            elif c * peers[best].weight == best_conns * peers[i].weight:
                many = True
        if best < 0:
            return None
        if not many:
            return best
        weight = peers[best].weight
        tied = [
            i for i, c in candidates if i >= best and c * weight == best_conns * peers[i].weight
        ]
        return _swrr_pass(peers, tied)


class LeastConnCursor:
    """least_conn keeps no per-request state besides the caller's tried bits."""

    __slots__ = ("method",)

    def __init__(self, method: LeastConn) -> None:
        self.method = method

    def next(self, usable: Usable = _always, conns: Conns | None = None) -> int | None:
        return self.method.choose(usable, conns)


# --------------------------------------------------------------------------- random


RandomSource = _random.Random | Callable[[], int]


class Random(_MethodBase):
    """``random`` and ``random two [least_conn]``: nginx's random module.

    A draw is ``rng() % total_weight`` located in the cumulative weights (``down``
    peers keep their range).  ``rng`` is a :class:`random.Random` (31 random bits per
    draw, like ``ngx_random()``) or a callable returning non-negative ints.

    ``random``: draw until a usable peer comes up; each unusable draw costs a try,
    more than 20 hand over to round robin.

    ``random two``: draw a first usable peer, then a second usable one different from
    it, and keep the second unless it has strictly more ``conns / weight``
    (``second.conns * first.weight > first.conns * second.weight``), so ties go to the
    second.  Draws of an unusable peer or of the first one again cost a try, and so
    does accepting the first peer: a request whose second draw keeps failing gives up
    after 20 draws in total.  ``least_conn`` is the only (and default) criterion.

    Tries carry over to retries of the same request.  Single-peer upstreams use
    round robin.
    """

    def __init__(
        self,
        weights: Sequence[int],
        rng: RandomSource | None = None,
        *,
        two: bool = False,
    ) -> None:
        self.weights = _check_weights(weights)
        self.number = len(self.weights)
        self.walk = WeightedWalk(self.weights)
        self.two = two
        if rng is None:
            rng = _random.Random()
        if isinstance(rng, _random.Random):
            source = rng
            self.rng: Callable[[], int] = lambda: source.getrandbits(31)
        else:
            self.rng = rng

    def peek(self) -> int:
        """One weighted draw (``ngx_http_upstream_peek_random_peer``)."""
        return self.walk(self.rng())

    def begin(self, key: Any = None) -> RandomCursor:
        """Start selecting for one request (``key`` is ignored)."""
        return RandomCursor(self)


class RandomCursor:
    """One request's random state: tries."""

    __slots__ = ("method", "tries")

    def __init__(self, method: Random) -> None:
        self.method = method
        self.tries = 0

    def next(self, usable: Usable = _always, conns: Conns | None = None) -> int | None:
        m = self.method
        if self.tries > MAX_TRIES or m.number < 2:
            return None
        if not m.two:
            while True:
                index = m.peek()
                if usable(index):
                    return index
                self.tries += 1
                if self.tries > MAX_TRIES:
                    return None
        get = _conns_getter(conns)
        first = -1
        first_conns = 0
        while True:
            index = m.peek()
            if index != first and usable(index):
                if first >= 0:
                    c = get(index)
                    if c * m.weights[first] > first_conns * m.weights[index]:
                        return first
                    return index
                first, first_conns = index, get(index)
            self.tries += 1
            if self.tries > MAX_TRIES:
                return None


# --------------------------------------------------------------------------- factory


def create(
    method: str,
    servers: Sequence[str],
    weights: Sequence[int],
    *,
    peers: Sequence[Peer] | None = None,
    rng: RandomSource | None = None,
    with_backup: bool = False,
) -> Method:
    """Build a method from its directive words without the key expression.

    ``method`` is one of ``"ip_hash"``, ``"hash"``, ``"hash consistent"``,
    ``"least_conn"``, ``"random"``, ``"random two"``, ``"random two least_conn"``.
    """
    words = method.split()
    if words == ["ip_hash"]:
        return IpHash(weights)
    if words == ["hash"]:
        return Hash(weights)
    if words == ["hash", "consistent"]:
        return ConsistentHash(servers, weights, peers)
    if words == ["least_conn"]:
        return LeastConn(peers if peers is not None else list(weights), with_backup=with_backup)
    if words == ["random"]:
        return Random(weights, rng)
    if words in (["random", "two"], ["random", "two", "least_conn"]):
        return Random(weights, rng, two=True)
    raise ValueError(f"unknown balancing method {method!r}")


__all__ = [
    "MAX_TRIES",
    "POINTS_PER_WEIGHT",
    "ConsistentHash",
    "Cursor",
    "Hash",
    "IpHash",
    "LeastConn",
    "Method",
    "Random",
    "WeightedWalk",
    "create",
    "ip_hash_bytes",
    "ip_hash_step",
    "ketama_points",
    "memcached_hash",
    "split_server",
]
