"""DNS re-resolution of ``server NAME resolve`` entries (in the sidecar).

nginx resolves upstream names once at start-up (unless its paid ``resolve``);
forklb re-resolves them every ``valid=`` period here and writes the addresses
into the server's slots in shared memory, where every worker picks them up on
its next connection.  A failed lookup keeps the last known addresses.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from forklb.model import Upstream
from forklb.upstream.shared import UpstreamView, get_address, set_address


def lookup(host: str, port: int) -> list[tuple[str, int]]:
    """Distinct addresses of ``host`` in resolver order (OSError when it fails)."""
    out: list[tuple[str, int]] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        addr = (info[4][0], info[4][1])
        if addr not in out:
            out.append(addr)
    return out


class ServerResolver:
    """Keeps the slots of one ``resolve`` server up to date."""

    def __init__(self, upstream: Upstream, slots: list[int], view: UpstreamView,
                 log: Callable[[str], None]):
        self.upstream = upstream
        self.slots = slots
        self.view = view
        self.log = log
        self.server = upstream.servers[slots[0]]

    def current(self) -> list[tuple[str, int]]:
        view, servers = self.view, self.upstream.servers
        return [get_address(view, i, servers[i].address) for i in self.slots
                if not view.absent[i]]

    def update(self, found: list[tuple[str, int]]) -> bool:
        """Write ``found`` into the slots; True when anything changed."""
        found = found[:len(self.slots)]
        if sorted(found) == sorted(self.current()):
            return False
        for j, i in enumerate(self.slots):
            set_address(self.view, i, found[j] if j < len(found) else None)
        shown = ", ".join(f"{h}:{p}" for h, p in found) or "nothing"
        self.log(f'upstream server {self.server.name} in "{self.upstream.name}" resolved '
                 f"to {shown}")
        return True

    def run(self) -> None:
        """Greenlet body: look up every ``valid`` seconds, forever."""
        import gevent

        while True:
            gevent.sleep(self.server.valid)
            try:
                found = lookup(self.server.host, self.server.port)
            except (OSError, UnicodeError) as e:
                self.log(f'could not resolve "{self.server.host}" for upstream '
                         f'"{self.upstream.name}": {e}; keeping the last addresses')
                continue
            self.update(found)


def resolvers(upstream: Upstream, view: UpstreamView,
              log: Callable[[str], None]) -> list[ServerResolver]:
    """One resolver per ``resolve`` server line of ``upstream``."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, server in enumerate(upstream.servers):
        if server.resolve:
            groups.setdefault((server.name, server.backup), []).append(i)
    return [ServerResolver(upstream, slots, view, log) for slots in groups.values()]
