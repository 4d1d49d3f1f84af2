"""The runtime API over the shared upstream state (no I/O; the WSGI app calls it).

``snapshot`` reads every upstream and server as the API shows them; ``change``
applies ``{"state": "drain"|"down"|"up", "weight": N}`` to one server.  The
workers see a change on their next choice: the state lives in shared memory.
"""

from __future__ import annotations

import time
from typing import Any

from forklb.model import Upstream, show_address
from forklb.upstream.shared import (
    ADMIN_NAMES,
    DOWN,
    DRAIN,
    HEALTH_NAMES,
    UNHEALTHY,
    UNKNOWN,
    UP,
    UpstreamView,
    changed,
    failed_now,
    get_address,
)

STATES = {"up": UP, "drain": DRAIN, "down": DOWN}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def server_state(upstream: Upstream, view: UpstreamView, i: int, now: float) -> str:
    server = upstream.servers[i]
    if server.down or view.admin[i] == DOWN:
        return "down"
    if view.admin[i] == DRAIN:
        return "draining"
    failed = failed_now(server, view, i, now, single=len(upstream.servers) == 1)
    if view.health[i] == UNHEALTHY or failed:
        return "failed"
    if upstream.health_check is not None and view.health[i] == UNKNOWN:
        return "checking"
    return "up"


def snapshot(upstreams: dict[str, Upstream], views: dict[str, UpstreamView]) -> dict[str, Any]:
    now = time.monotonic()
    out: dict[str, Any] = {}
    for name, upstream in sorted(upstreams.items()):
        view = views[name]
        servers = []
        for i, server in enumerate(upstream.servers):
            if view.absent[i]:
                continue  # a "resolve" slot the name does not fill now
            last = view.last_check[i]
            servers.append({
                "server": server.name,
                "address": show_address(*get_address(view, i, server.address)),
                "weight": view.weight[i] or server.weight,
                "backup": server.backup,
                "state": server_state(upstream, view, i, now),
                "admin": ADMIN_NAMES[view.admin[i]],
                "health": HEALTH_NAMES[view.health[i]] if upstream.health_check else None,
                "active": view.total_conns(i),
                "requests": view.total_requests(i),
                "failures": view.total_failures(i),
                "last_check": last or None,
            })
        out[name] = {"method": upstream.balancing.method, "servers": servers}
    return {"upstreams": out}


def find(upstreams: dict[str, Upstream], views: dict[str, UpstreamView], name: str,
         address: str) -> tuple[Upstream, int]:
    """The upstream called ``name`` and the index of server ``address`` in it
    (its ``host:port`` now, or its name as written); ApiError 404 otherwise."""
    upstream = upstreams.get(name)
    if upstream is None:
        raise ApiError(404, f'unknown upstream "{name}"')
    view = views[name]
    for i, server in enumerate(upstream.servers):
        if view.absent[i]:
            continue
        if address in (show_address(*get_address(view, i, server.address)), server.name):
            return upstream, i
    raise ApiError(404, f'unknown server "{address}" in upstream "{name}"')


def change(view: UpstreamView, i: int, body: Any) -> None:
    """Validate all of ``body`` first, then apply it (a bad request changes nothing)."""
    if not isinstance(body, dict) or not body or set(body) - {"state", "weight"}:
        raise ApiError(400, 'expected a JSON object with "state" and/or "weight"')
    state = body.get("state")
    if state is not None and state not in STATES:
        raise ApiError(400, f'invalid state "{state}": expected up, drain or down')
    weight = body.get("weight")
    if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool)
                               or not 1 <= weight <= 1000):
        raise ApiError(400, "invalid weight: expected an integer from 1 to 1000")
    if state is not None:
        view.admin[i] = STATES[state]
    if weight is not None:
        view.weight[i] = weight
    changed(view)
