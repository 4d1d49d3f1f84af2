"""DNS slots of ``resolve`` servers: shared address slots and the sidecar's updates."""

from __future__ import annotations

from forklb.model import RESOLVE_SLOTS, Upstream, UpstreamServer
from forklb.sidecar import api
from forklb.sidecar.resolver import ServerResolver, resolvers
from forklb.upstream.pool import UpstreamGroup
from forklb.upstream.shared import SharedUpstreamState, get_address, set_address


def _upstream(found: int) -> Upstream:
    servers = tuple(
        UpstreamServer("backend.test:8080", ("127.0.0.2", 8080) if j < found
                       else ("backend.test", 8080), resolve=True, valid=1.0,
                       host="backend.test", port=8080, spare=j >= found)
        for j in range(RESOLVE_SLOTS))
    return Upstream("app", servers, keepalive=4)


def test_slots_start_absent_beyond_what_was_resolved():
    up = _upstream(found=1)
    view = SharedUpstreamState({"app": up}).view("app")
    assert [view.absent[i] for i in range(RESOLVE_SLOTS)] == [0] + [1] * (RESOLVE_SLOTS - 1)
    assert get_address(view, 0, up.servers[0].address) == ("127.0.0.2", 8080)


def test_set_and_get_address_ipv4_and_ipv6():
    up = _upstream(found=1)
    view = SharedUpstreamState({"app": up}).view("app")
    set_address(view, 1, ("::1", 9000))
    set_address(view, 2, ("127.0.0.9", 9001))
    assert get_address(view, 1, ("x", 0)) == ("::1", 9000)
    assert get_address(view, 2, ("x", 0)) == ("127.0.0.9", 9001)
    set_address(view, 2, None)
    assert view.absent[2] == 1


def test_resolver_update_moves_traffic_and_logs_once():
    up = _upstream(found=1)
    view = SharedUpstreamState({"app": up}).view("app")
    logged: list[str] = []
    (resolver,) = resolvers(up, view, logged.append)
    assert isinstance(resolver, ServerResolver)
    assert resolver.update([("127.0.0.2", 8080)]) is False  # unchanged: nothing logged
    assert resolver.update([("127.0.0.3", 8080), ("127.0.0.4", 8080)]) is True
    assert logged == ['upstream server backend.test:8080 in "app" resolved to '
                      "127.0.0.3:8080, 127.0.0.4:8080"]
    group = UpstreamGroup(up, view, slot=0)
    picked = set()
    for _ in range(4):
        choice = group.start(type("Ex", (), {"remote_addr": "127.0.0.1", "args": ""})())
        index = choice.next()
        picked.add(group.address(index))
    assert picked == {("127.0.0.3", 8080), ("127.0.0.4", 8080)}
    listing = api.snapshot({"app": up}, {"app": view})["upstreams"]["app"]["servers"]
    assert [s["address"] for s in listing] == ["127.0.0.3:8080", "127.0.0.4:8080"]
    upstream, i = api.find({"app": up}, {"app": view}, "app", "127.0.0.4:8080")
    assert group.address(i) == ("127.0.0.4", 8080)


def test_address_change_drops_idle_connections_to_the_old_address():
    up = _upstream(found=1)
    view = SharedUpstreamState({"app": up}).view("app")
    group = UpstreamGroup(up, view, slot=0)

    class Sock:
        closed = False

        def close(self) -> None:
            self.closed = True

    old = Sock()
    group.give_back(0, old)
    set_address(view, 0, ("127.0.0.5", 8080))
    assert group.address(0) == ("127.0.0.5", 8080)
    assert old.closed and group.take_idle(0) is None
