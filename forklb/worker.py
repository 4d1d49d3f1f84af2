"""A worker process: gevent, the inherited listening sockets, one greenlet per client.

The master forks and then calls :func:`run` in the child; this module (and so
gevent) is imported only there, so the master never has a hub.  The worker:

1. resets the master's signal set-up, patches the stdlib for gevent and
   installs its own signal handlers (QUIT graceful, TERM/INT fast, USR1 reopen);
2. builds everything the hot path needs from the config once: routing tables,
   compiled header templates, an :class:`UpstreamGroup` per upstream;
3. serves each listening socket with a ``StreamServer`` whose pool is
   ``worker_connections`` big, then tells the master it is ready (a byte on
   the status pipe);
4. exits when asked, or by itself when the master dies (EOF on the life pipe,
   and ``PR_SET_PDEATHSIG`` as a second line).
"""

from __future__ import annotations

import gc
import os
import signal
import socket as stdlib_socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from forklb.child import drop_privileges, reset_signals, start_gevent, watch_master
from forklb.log import AccessLogFile, ErrorLog, conditional
from forklb.metrics.recorder import metrics_gauges, metrics_recorder
from forklb.model import DEFAULT_LOG_BUFFER, Config, Location, LogBuffer, Server, show_address
from forklb.scoreboard import Scoreboard
from forklb.upstream.shared import SharedUpstreamState

DRAIN_TICK = 0.1
# On graceful stop a keep-alive connection is closed once it has been idle this
# long.  Closing a connection the client is about to reuse races with its next
# request (the client sees a close without response); a connection in active
# use is never idle this long, so it gets its next answer with
# "Connection: close" instead.
IDLE_CLOSE_AFTER = 1.0
GC_YOUNG_THRESHOLD = 5000  # net allocations between young collections (Python: 700)


@dataclass
class Listener:
    """One listening address as a worker serves it."""

    host: str
    port: int
    vhosts: Any  # VirtualHosts[Server]
    keepalive_timeout: float
    fallback: Location  # used for access-logging requests rejected before routing
    client_header_timeout: float = 60.0  # the default server's: Host is not known yet
    tls: Any = None  # forklb.http.tls.TlsFront on an ssl address
    # large_client_header_buffers of the default server: longest request or header
    # line (CRLF included), longest header section
    header_line_max: int = 8192
    header_section_max: int = 4 * 8192
    send_timeout: float = 60.0  # for responses sent before a location is chosen
    # Host header value -> ($host, server, location matcher), filled as requests
    # arrive (see ClientConnection._route_host): a host is validated and matched once.
    routes: dict = field(default_factory=dict)


class LocationRuntime:
    """What the hot path needs for one location, computed at worker start."""

    __slots__ = ("handler", "group", "proxy_uri", "proxy_host", "set_headers", "overridden",
                 "sets_host", "connect_timeout", "read_timeout", "send_timeout", "mime_types",
                 "hidden", "passed", "doc_root", "alias_len", "next_upstream", "retry_statuses",
                 "peers", "http10", "version_line", "tunnel", "upgrade_headers", "splice",
                 "host_line")

    def __init__(self, loc: Location, groups: dict, mime_types: dict[str, str]):
        from forklb.http.protocol import FRAMING_RESPONSE, HIDDEN_BY_DEFAULT
        from forklb.http.proxy import proxy
        from forklb.http.returns import serve_return
        from forklb.http.static import serve_static

        self.mime_types = mime_types
        self.connect_timeout = loc.proxy_connect_timeout
        self.read_timeout = loc.proxy_read_timeout
        self.send_timeout = loc.proxy_send_timeout
        self.set_headers = []
        names = set()
        for name, template in loc.proxy_set_header:
            literal = template.source.encode("latin-1") if template.is_literal else None
            self.set_headers.append((name.encode("latin-1"), template, literal))
            names.add(name.lower().encode("latin-1"))
        self.overridden = frozenset(names)
        self.sets_host = b"host" in names
        passed = frozenset(h.encode("latin-1") for h in loc.proxy_pass_header)
        hidden = frozenset(h.encode("latin-1") for h in loc.proxy_hide_header)
        # Response headers not relayed; Server/Date let through replace forklb's own.
        self.hidden = FRAMING_RESPONSE | (HIDDEN_BY_DEFAULT - passed) | hidden
        self.passed = passed & {b"server", b"date"}
        if loc.return_ is not None:
            self.handler = serve_return
            self.group = None
            self.proxy_uri = None
            self.proxy_host = ""
        elif loc.proxy is not None:
            self.handler = proxy
            self.group = groups[loc.proxy.upstream]
            self.proxy_uri = loc.proxy.uri
            self.proxy_host = loc.proxy.proxy_host
        else:
            self.handler = serve_static
            self.group = None
            self.proxy_uri = None
            self.proxy_host = ""
        self.host_line = b"Host: " + self.proxy_host.encode("latin-1") + b"\r\n"
        # proxy_next_upstream: the policy, the response statuses it may act on (so
        # the common default costs one empty-set lookup per response) and nginx's
        # number of tries: every peer not marked down, primaries and backups.
        self.next_upstream = loc.next_upstream
        self.retry_statuses = loc.next_upstream.retried_statuses()
        servers = self.group.servers if self.group is not None else ()
        self.peers = max(1, sum(1 for s in servers if not s.down and not s.spare))
        # proxy_http_version 1.0: no upstream keep-alive, no chunked request bodies.
        self.http10 = loc.proxy_http_version == "1.0"
        self.version_line = b" HTTP/1.0\r\n" if self.http10 else b" HTTP/1.1\r\n"
        # WebSocket and other upgrades are tunnelled only where "Upgrade" is set
        # (proxy_set_header Upgrade $http_upgrade), as in nginx; these configured
        # headers are left out of requests that are not tunnelled.
        self.tunnel = b"upgrade" in names
        self.upgrade_headers = frozenset({b"upgrade", b"connection"}) & names
        # proxy_splice: Content-Length bodies this large relayed with os.splice (0: never)
        self.splice = loc.proxy_splice
        self._static_files(loc)

    def _static_files(self, loc: Location) -> None:
        """Where the location's files are, and try_files in front of its handler."""
        from forklb.http.static import REGEX_ALIAS, with_try_files

        if loc.mime_types is not None:  # types written in the server or location
            self.mime_types = loc.mime_types
        self.doc_root = loc.root if loc.alias is None else loc.alias
        if loc.alias is None:
            self.alias_len = None
        else:
            self.alias_len = REGEX_ALIAS if loc.regex is not None else len(loc.pattern)
        if loc.try_files is not None and loc.return_ is None:  # return runs before it
            self.handler = with_try_files(self.handler)


class Worker:
    def __init__(self, config: Config, sockets: dict[tuple[str, int], stdlib_socket.socket],
                 shared: SharedUpstreamState, scoreboard: Scoreboard, slot: int,
                 generation: int, life_fd: int, status_fd: int, master_pid: int):
        self.config = config
        self.shared = shared
        self.scoreboard = scoreboard
        self.inherited = sockets
        self.slot = slot
        self.generation = generation
        self.life_fd = life_fd
        self.status_fd = status_fd
        self.master_pid = master_pid
        self.stopping = False
        self.connections: set = set()
        self.servers: list = []
        main = config.main
        self.log = ErrorLog(main.error_log, main.error_log_level)
        self.log.ident = slot

    # -- start-up --
    def run(self) -> None:
        """Entry point in the forked child; never returns."""
        code = 0
        try:
            reset_signals(self.master_pid)
            self._apply_limits()  # before the title: once named, a worker is set up
            self._setup_process()
            self._build()  # opens log files: before giving up root
            drop_privileges(self.config.main.user, self.master_pid)
            self._serve()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - a worker must report, then die
            self.log.alert(f"worker process failed: {e!r}")
            code = 2
        finally:
            self._flush_logs()
        os._exit(code)

    def _setup_process(self) -> None:
        start_gevent("forklb: worker process")

        # Everything the worker will ever import, while it can still read the
        # files: after "user" drops root it may not be able to.
        import gevent
        import gevent.event  # noqa: F401
        import gevent.pool  # noqa: F401
        import gevent.server  # noqa: F401
        import gevent.socket  # noqa: F401

        import forklb.http.acceptor  # noqa: F401
        import forklb.http.connection  # noqa: F401
        import forklb.http.internal  # noqa: F401
        import forklb.http.proxy  # noqa: F401
        import forklb.http.returns  # noqa: F401
        import forklb.http.static  # noqa: F401
        import forklb.http.tls  # noqa: F401

        self.hub = gevent.get_hub()
        self.loop = self.hub.loop  # parked connections' watchers (ClientConnection.park)
        self.now = self.loop.now  # the loop's cached clock: no syscall
        gevent.signal_handler(signal.SIGQUIT, self.graceful_stop)
        gevent.signal_handler(signal.SIGTERM, self.fast_stop)
        gevent.signal_handler(signal.SIGINT, self.fast_stop)
        gevent.signal_handler(signal.SIGUSR1, self.reopen_logs)

    def _apply_limits(self) -> None:
        """worker_rlimit_nofile, worker_priority and worker_cpu_affinity (psutil), while
        still root (a negative nice value needs it)."""
        import resource

        import psutil

        main = self.config.main
        if main.worker_priority:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, main.worker_priority)
            except OSError as e:
                self.log.alert(f"setpriority({main.worker_priority}) failed ({e})")
        if main.worker_rlimit_nofile:
            n = main.worker_rlimit_nofile
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            except (ValueError, OSError) as e:
                self.log.alert(f"setrlimit(RLIMIT_NOFILE, {n}) failed ({e})")
        proc = psutil.Process()
        cpus = main.cpus_for(self.slot, tuple(sorted(proc.cpu_affinity())))
        if cpus is not None:
            try:
                proc.cpu_affinity(list(cpus))
            except (ValueError, OSError, psutil.Error) as e:
                self.log.alert(f"sched_setaffinity({list(cpus)}) failed ({e})")

    def _build(self) -> None:
        from forklb.http.protocol import CLOCK
        from forklb.http.routing import LocationMatcher, VirtualHosts
        from forklb.upstream.pool import UpstreamGroup

        http = self.config.http
        self.date = CLOCK  # kept current by _keep_time
        self.groups = {name: UpstreamGroup(u, self.shared.view(name), self.slot)
                       for name, u in http.upstreams.items()}
        mime = dict(http.mime_types)
        self.locations: dict[int, LocationRuntime] = {}
        self.matchers: dict[int, LocationMatcher] = {}
        self.access_files = _access_files(http.servers)
        # id(location) -> its access logs, as (render a line, the file) pairs
        self.log_writers: dict[int, tuple] = {}
        for server in http.servers:
            self.matchers[id(server)] = LocationMatcher(server.locations)
            for loc in server.locations:
                self.locations[id(loc)] = LocationRuntime(loc, self.groups, mime)
                self.log_writers[id(loc)] = tuple(
                    (al.format.render if al.condition is None
                     else conditional(al.format.render, al.condition),
                     self.access_files[al.path]) for al in loc.access_log)
        self.listeners: dict[tuple[str, int], Listener] = {}
        for listen in self.config.listen_addresses():
            members: list[tuple[Server, tuple[str, ...], bool]] = []
            for server in http.servers:
                for lst in server.listens:
                    if lst.address == listen.address:
                        members.append((server, server.names, lst.default_server))
                        break
            vhosts = VirtualHosts(members)
            default: Server = vhosts.default
            self.listeners[listen.address] = Listener(
                listen.host, listen.port, vhosts, default.keepalive_timeout, default.locations[-1],
                default.client_header_timeout,
                header_line_max=default.large_client_header_buffers[1],
                header_section_max=(default.large_client_header_buffers[0]
                                    * default.large_client_header_buffers[1]),
                send_timeout=default.locations[-1].send_timeout,
            )
        self.stats = metrics_recorder(self)
        self._build_tls()

    def _build_tls(self) -> None:
        """One SSLContext per distinct server setting, one TlsFront per ssl address;
        before dropping root, so keys readable by root only still load."""
        ssl_addresses = self.config.ssl_addresses()
        if not ssl_addresses:
            return
        from forklb.http.tls import TlsFront, build_context

        settings = {s.tls for s in self.config.http.servers if s.tls is not None
                    and any(lst.address in ssl_addresses for lst in s.listens)}
        contexts = {tls: build_context(tls) for tls in settings}
        for address in ssl_addresses:
            listener = self.listeners[address]
            listener.tls = TlsFront(listener.vhosts, contexts, self.log,
                                    listener.client_header_timeout, self.now)

    def _serve(self) -> None:
        import gevent
        from gevent import socket
        from gevent.event import Event

        from forklb.http.acceptor import Acceptor, ConnectionPool

        pool = ConnectionPool(self.config.main.worker_connections)
        self.pool = pool
        for address, sock in self.inherited.items():
            listener = self.listeners.get(address)
            if listener is None:
                continue
            gsock = socket.socket(fileno=sock.detach())
            server = Acceptor(gsock, self._handler(listener), pool, self.log,
                              show_address(*address))
            # gevent accepts up to max_accept (default 100) per wake-up: small bursts leave
            # the rest of a shared backlog to other workers (docs/ARCHITECTURE.md)
            server.max_accept = 4
            server.start()
            self.servers.append(server)
        self.exit_event = Event()
        gevent.spawn(watch_master, self.life_fd, self._master_gone)
        gevent.spawn(self._keep_time)
        for log in self.access_files.values():
            if log.buffer.flush:
                gevent.spawn(self._flush_periodically, log, log.buffer.flush)
        gevent.spawn(self._heartbeat)
        gevent.spawn(metrics_gauges, self)
        # Everything built so far lives as long as the worker: move it out of the
        # cyclic collector's sight, so collections walk only per-request objects.
        gc.freeze()
        # A young-generation collection walks every live young object (the state of
        # requests in flight); the default of one per 700 net allocations made
        # them about 5 % of a proxied request's instructions.  Not much higher:
        # cyclic garbage, where some is left, is collected in pauses this long.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        os.write(self.status_fd, b"R")
        self.exit_event.wait()

    def _handler(self, listener: Listener):
        from gevent import getcurrent

        from forklb.http.connection import ClientConnection

        connections = self.connections
        tls = listener.tls

        def handle(sock, address) -> bool:
            """Serve a new connection; True if it was parked (it stays open, in
            ``connections``, holding its pool slot without this greenlet)."""
            self.stats.accepted()
            cls = ClientConnection
            if tls is not None:
                sock, cls = tls.accept(sock, address)  # handshake in this greenlet
                if sock is None:
                    return False
            conn = cls(self, listener, sock, address)
            connections.add(conn)
            parked = False
            try:
                parked = conn.serve()
            finally:
                if parked:
                    self.pool.leave(getcurrent())
                else:
                    connections.discard(conn)
            return parked

        return handle

    def connection_closed(self, conn) -> None:
        """A connection that was once parked is closed: forget it, free its slot."""
        self.connections.discard(conn)
        self.pool.release_outside()

    # -- per request --
    def access_log(self, ex) -> None:
        self.stats.request(ex)
        loc = ex.location or ex.conn.listener.fallback
        for render, log in self.log_writers[id(loc)]:
            line = render(ex)
            log.lines.append(line)
            log.size += len(line)
            if log.size >= log.limit:
                log.spill()

    # -- stopping --
    def graceful_stop(self) -> None:
        """QUIT: stop accepting, close idle keep-alive connections, finish the rest."""
        import gevent

        if self.stopping:
            return
        self.stopping = True
        for server in self.servers:
            server.close()
        self._close_idle()
        gevent.spawn(self._drain)

    def _close_idle(self) -> None:
        """Close keep-alive connections that have waited a while and have nothing pending."""
        from forklb.http.sockio import bytes_waiting

        now = self.now()
        for conn in list(self.connections):
            if not conn.idle or now - conn.idle_since < IDLE_CLOSE_AFTER:
                continue
            if bytes_waiting(conn.sock):
                continue  # a request arrived: it is served, with Connection: close
            try:
                conn.sock.shutdown(stdlib_socket.SHUT_RDWR)
            except OSError:
                pass

    def _drain(self) -> None:
        import gevent

        timeout = self.config.main.worker_shutdown_timeout
        deadline = self.now() + timeout
        while len(self.pool) and self.now() < deadline:
            self._close_idle()
            gevent.sleep(DRAIN_TICK)
        if len(self.pool):
            self.log.notice(f"worker_shutdown_timeout: closing {len(self.pool)} connections")
        self.exit_event.set()

    def fast_stop(self) -> None:
        self._flush_logs()
        os._exit(0)

    def reopen_logs(self) -> None:
        self.log.reopen()
        for f in self.access_files.values():
            f.reopen()

    def _flush_logs(self) -> None:
        for f in getattr(self, "access_files", {}).values():
            f.flush()

    @staticmethod
    def _flush_periodically(log: AccessLogFile, interval: float) -> None:
        """Greenlet body: no line waits in ``log``'s buffer longer than ``interval``
        (access_log's flush=)."""
        import gevent

        while True:
            gevent.sleep(interval)
            log.flush()

    def _keep_time(self) -> None:
        """Format the time at the start of every second (nginx updates its cached
        time each turn of its loop); requests then read it without a clock call."""
        import gevent

        while True:
            now = time.time()
            self.date.update(now)
            # a wake-up a little early only leads to another short sleep
            gevent.sleep(1.0 - now % 1.0 + 0.001)

    def _heartbeat(self) -> None:
        import gevent

        interval = min(1.0, (self.config.main.worker_timeout or 4.0) / 4)
        while True:
            self.scoreboard.beat(self.slot)
            gevent.sleep(interval)

    def _master_gone(self) -> None:
        self.log.alert("master process exited, worker exiting")
        self.fast_stop()


def run(*args, **kwargs) -> None:
    Worker(*args, **kwargs).run()


def _access_files(servers: Iterable[Server]) -> dict[str, AccessLogFile]:
    """One open file per access log path, buffered as the access_log lines that
    name it say (the loader has checked that those agree), else by default."""
    buffers: dict[str, LogBuffer] = {}
    for server in servers:
        for loc in server.locations:
            for al in loc.access_log:
                if al.buffer is not None or al.path not in buffers:
                    buffers[al.path] = al.buffer or DEFAULT_LOG_BUFFER
    return {path: AccessLogFile(path, buffer) for path, buffer in buffers.items()}
