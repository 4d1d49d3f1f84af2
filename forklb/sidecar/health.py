"""Active health checks, one checker for the whole node (in the sidecar).

For every server of every upstream with ``health_check``, a greenlet connects
every ``interval``, sends ``GET uri`` and reads the status line within
``timeout``.  ``fails`` failures in a row mark the server UNHEALTHY in the
shared state (workers stop choosing it); ``passes`` successes in a row mark it
HEALTHY again (and clear the failures traffic counted meanwhile).  The checker
is the only writer of ``health`` and ``last_check``.  Every transition is logged.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from forklb.metrics.recorder import health_result
from forklb.model import HealthCheck, Upstream, UpstreamServer
from forklb.upstream.shared import HEALTHY, UNHEALTHY, UNKNOWN, UpstreamView, changed


def check_request(check: HealthCheck, server: UpstreamServer) -> bytes:
    host = check.host or server.name
    return (f"GET {check.uri} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: forklb-health-check\r\n"
            "Connection: close\r\n\r\n").encode("latin-1")


def status_of(response_start: bytes) -> int | None:
    """The status code of a response's first bytes, None when it is not HTTP."""
    line = response_start.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    return int(parts[1])


def probe(check: HealthCheck, server: UpstreamServer) -> str | None:
    """One check; None when it passed, else why it failed (for the log)."""
    try:
        with socket.create_connection(server.address, timeout=check.timeout) as sock:
            sock.settimeout(check.timeout)
            sock.sendall(check_request(check, server))
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except ConnectionRefusedError:
        return "connect refused"
    except TimeoutError:
        return "timed out"
    except OSError as e:
        return e.strerror or str(e)
    status = status_of(data)
    if status is None:
        return "invalid response"
    lo, hi = check.status
    if not lo <= status <= hi:
        return f"status {status}"
    return None


class ServerCheck:
    """The consecutive-result counter of one server, nginx-plus style."""

    def __init__(self, upstream: Upstream, index: int, view: UpstreamView,
                 log: Callable[[str], None]):
        self.upstream = upstream
        self.index = index
        self.view = view
        self.log = log
        self.check = upstream.health_check
        self.server = upstream.servers[index]
        self.streak = 0  # > 0: passes in a row, < 0: failures in a row
        self.streak_started = 0.0  # when the current run of passes began

    def record(self, failure: str | None, started: float) -> None:
        """Account one check that began at ``started`` (monotonic) with ``failure``."""
        view, i, check = self.view, self.index, self.check
        view.last_check[i] = time.time()
        if failure is None:
            if self.streak <= 0:
                self.streak_started = started
            self.streak = max(self.streak, 0) + 1
            if self.streak >= check.passes:
                # Failures traffic saw before this run of good checks are outdated:
                # without this a server that is back would wait out fail_timeout.
                # Failures during the run still count (max_fails keeps its say).
                if view.accessed[i] < self.streak_started and view.fails[i]:
                    view.fails[i] = 0
                    changed(view)
                if view.health[i] != HEALTHY:
                    if view.health[i] == UNHEALTHY:
                        self.log(f'upstream server {self.server.name} in '
                                 f'"{self.upstream.name}" is up ({self.streak} checks)')
                    view.health[i] = HEALTHY
                    changed(view)
        else:
            self.streak = min(self.streak, 0) - 1
            if -self.streak >= check.fails and view.health[i] != UNHEALTHY:
                self.log(f'upstream server {self.server.name} in "{self.upstream.name}" is '
                         f"down: {failure} ({-self.streak} checks)")
                view.health[i] = UNHEALTHY
                changed(view)

    def run(self) -> None:
        """Greenlet body: check forever, every interval."""
        import gevent

        self.view.health[self.index] = UNKNOWN
        while True:
            started = time.monotonic()
            before = self.view.health[self.index]
            failure = probe(self.check, self.server)
            self.record(failure, started)
            health_result(self.upstream.name, self.server.name, failure is None,
                          self.view.health[self.index] != before)
            gevent.sleep(max(0.0, self.check.interval - (time.monotonic() - started)))
