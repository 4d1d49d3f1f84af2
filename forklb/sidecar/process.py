"""The sidecar process: started by the master like a worker (see master.ROLES).

It inherits its listening sockets from the master (so a reload's new sidecar
and the old one can overlap on the same address), serves :class:`StatusApp`
with gevent's WSGI server, runs the active health checks of every upstream
that has ``health_check``, and exits on QUIT/TERM or when the master dies.
"""

from __future__ import annotations

import os
import signal
import socket as stdlib_socket

from forklb.child import drop_privileges, reset_signals, start_gevent, watch_master
from forklb.log import ErrorLog
from forklb.model import Config
from forklb.upstream.shared import SharedUpstreamState

MASTER = None  # the forking master (set in the child by master._run_sidecar)


def run(config: Config, sockets: dict[tuple[str, int], stdlib_socket.socket],
        shared: SharedUpstreamState, life_fd: int, status_fd: int, master_pid: int) -> None:
    """Entry point in the forked child; never returns."""
    log = ErrorLog(config.main.error_log, config.main.error_log_level)
    code = 0
    try:
        reset_signals(master_pid)
        start_gevent("forklb: sidecar process")
        import gevent
        from gevent.event import Event
        from gevent.pywsgi import WSGIServer
        from gevent.socket import socket

        from forklb.sidecar.app import StatusApp
        from forklb.sidecar.endpoints import Endpoints
        from forklb.sidecar.health import ServerCheck
        from forklb.sidecar.processes import ProcessTable
        from forklb.sidecar.resolver import resolvers

        app = StatusApp(config, ProcessTable(master_pid), shared, _read_token(config))
        if MASTER is not None:
            app.endpoints = Endpoints(MASTER.stats, config, shared, app.processes,
                                      MASTER.reload_config, master_pid)
        servers = []
        for sock in sockets.values():
            server = WSGIServer(socket(fileno=sock.detach()), app, log=None, error_log=None)
            server.start()
            servers.append(server)
        drop_privileges(config.main.user, master_pid)
        for upstream in config.http.upstreams.values():
            view = shared.view(upstream.name)
            if upstream.health_check is not None:
                for i in range(len(upstream.servers)):
                    gevent.spawn(ServerCheck(upstream, i, view, log.notice).run)
            for resolver in resolvers(upstream, view, log.notice):
                gevent.spawn(resolver.run)
        done = Event()

        def stop() -> None:
            for server in servers:
                server.close()
            done.set()

        gevent.signal_handler(signal.SIGQUIT, stop)
        gevent.signal_handler(signal.SIGTERM, stop)
        gevent.signal_handler(signal.SIGINT, stop)
        gevent.signal_handler(signal.SIGUSR1, log.reopen)
        gevent.spawn(watch_master, life_fd, stop)
        os.write(status_fd, b"R")
        done.wait()
    except BaseException as e:  # noqa: BLE001 - report, then die
        log.alert(f"sidecar process failed: {e!r}")
        code = 2
    os._exit(code)


def _read_token(config: Config) -> str | None:
    """The API token (read before privileges are dropped); startup fails without it."""
    path = config.sidecar.admin_token_file if config.sidecar else None
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f'admin_token_file "{path}" is empty')
    return token
