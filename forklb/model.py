"""The validated configuration as immutable typed objects.

:func:`forklb.config.load` builds a :class:`Config` from the directive tree;
the master, the workers (and later the sidecar) only ever see these objects,
never the raw tree.  Everything that can be computed once at load time is
computed here: resolved addresses, compiled header templates, location match
order, MIME lookup tables.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forklb.http.next_upstream import NextUpstream
from forklb.http.variables import Template

Address = tuple[str, int]  # (host, port) with host a literal IP address


def show_address(host: str, port: int) -> str:
    """``host:port`` as logs and the API print it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Listen:
    host: str  # "0.0.0.0" / "::" for a wildcard address
    port: int
    default_server: bool = False
    backlog: int = 511
    ssl: bool = False  # "listen ... ssl": TLS is terminated on this address
    # "listen ... reuseport": one SO_REUSEPORT socket per worker slot, bound by the master
    reuseport: bool = False

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def has_options(self) -> bool:
        """Carries socket options (nginx's ``lsopt.set``); one listen per address may."""
        return self.reuseport or self.backlog != 511


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    name: str  # the address as written in the config, e.g. "web01:80"
    address: Address
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    backup: bool = False
    down: bool = False
    max_conns: int = 0  # 0: no limit
    # "resolve": the sidecar re-resolves ``host`` every ``valid`` seconds; the
    # server then owns RESOLVE_SLOTS peers whose addresses live in shared memory.
    resolve: bool = False
    valid: float = 30.0
    spare: bool = False  # a "resolve" slot with no address yet
    host: str = ""
    port: int = 80

    @property
    def label(self) -> str:
        """The resolved address as ``host:port`` (``[v6]:port``), as logs show it."""
        return show_address(*self.address)


RESOLVE_SLOTS = 8  # addresses a "resolve" server may have at once


@dataclass(frozen=True, slots=True)
class Balancing:
    """The ``upstream`` block's method: round robin unless one of nginx's others."""

    method: str = "round_robin"  # round_robin ip_hash hash least_conn random
    key: Template | None = None  # hash KEY
    consistent: bool = False  # hash KEY consistent
    two: bool = False  # random two
    least_conn: bool = False  # random two least_conn


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """``health_check``: active checks run by the sidecar, one per server."""

    interval: float = 2.0
    timeout: float = 1.0
    fails: int = 3  # consecutive failed checks before a server is taken out
    passes: int = 2  # consecutive good checks before it is put back
    uri: str = "/"
    status: tuple[int, int] = (200, 399)  # accepted status range, inclusive
    host: str | None = None  # Host header; default: the server's address


@dataclass(frozen=True, slots=True)
class Upstream:
    """An ``upstream NAME {}`` group, or the implicit group of a direct target.

    ``servers`` lists the primaries first, then the backups (one entry per
    resolved address).
    """

    name: str
    servers: tuple[UpstreamServer, ...]
    keepalive: int  # idle connections each worker may keep open to this group
    balancing: Balancing = Balancing()
    health_check: HealthCheck | None = None

    @property
    def primaries(self) -> int:
        """How many of ``servers`` are primaries (the rest are backups)."""
        return sum(1 for s in self.servers if not s.backup)


@dataclass(frozen=True, slots=True)
class ProxyPass:
    upstream: str  # name of a key in Http.upstreams
    proxy_host: str  # value of $proxy_host and the default Host header
    uri: str | None  # the URI part of proxy_pass, None when absent


@dataclass(frozen=True, slots=True)
class LogFormat:
    """``log_format NAME [escape=...] STRING``; ``render`` (a request's line, with its
    newline) is built once, at load."""

    name: str
    template: Template
    escape: str = "default"  # default | json | none: how variable values are escaped
    render: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from forklb.log import line_renderer

        object.__setattr__(self, "render", line_renderer(self.template, self.escape, end="\n"))


@dataclass(frozen=True, slots=True)
class LogBuffer:
    """How an access log file is buffered (``access_log``'s buffer=, flush=, gzip)."""

    size: int  # bytes: a line that would not fit writes the buffer first
    flush: float | None  # seconds; None: written only when full, on reopen and at exit
    gzip: int = 0  # compression level 1-9 (each write one gzip member); 0: plain text


# Without buffer= or gzip nginx writes each line at once; forklb buffers anyway
# (a system call per request costs more than the line), as "buffer=64k flush=1s".
DEFAULT_LOG_BUFFER = LogBuffer(64 * 1024, 1.0)


@dataclass(frozen=True, slots=True)
class AccessLog:
    path: str
    format: LogFormat
    buffer: LogBuffer | None = None  # None: not given here (the file's, or the default)
    condition: Template | None = None  # if=: not logged when "" or "0"


@dataclass(frozen=True, slots=True)
class Location:
    modifier: str  # "", "=", "^~", "~" or "~*"
    pattern: str
    proxy: ProxyPass | None
    proxy_set_header: tuple[tuple[str, Template], ...]
    proxy_connect_timeout: float
    proxy_read_timeout: float
    proxy_send_timeout: float
    root: str
    index: tuple[str, ...]
    keepalive_timeout: float
    access_log: tuple[AccessLog, ...]
    default_type: str
    regex: re.Pattern[str] | None = field(default=None, compare=False)
    # ``return CODE [TEXT|URL]``: answered without proxying or files (None: not set)
    return_: tuple[int, Template | None] | None = None
    access: AccessRules = ()  # allow/deny, checked before anything else
    proxy_hide_header: tuple[str, ...] = ()  # lower-case names
    proxy_pass_header: tuple[str, ...] = ()
    client_max_body_size: int = 1024 * 1024  # 0: no limit
    client_body_timeout: float = 60.0  # longest pause between two reads of the body
    keepalive_requests: int = 1000  # requests on one client connection, then close
    next_upstream: NextUpstream = NextUpstream()  # proxy_next_upstream{,_tries,_timeout}
    proxy_http_version: str = "1.1"  # "1.0": Connection: close, no pooling, no chunked body
    file: str = ""
    line: int = 0
    # static files and error pages
    alias: str | None = None  # replaces the matched prefix (the whole URI in a regex location)
    try_files: TryFiles | None = None
    error_pages: Mapping[int, ErrorPage] = field(default_factory=dict, compare=False)
    sendfile: bool = True
    proxy_intercept_errors: bool = False  # upstream statuses with an error_page get the page
    mime_types: Mapping[str, str] | None = field(default=None, compare=False)  # None: http's
    send_timeout: float = 60.0  # longest wait for one write to the client to progress
    # forklb's own: a body must average this many bytes/s after client_body_timeout (0: off)
    client_body_min_rate: int = 500
    # forklb's own: Content-Length bodies of this size and more relayed with os.splice
    # (0: never; proxy_splice on is 16 MiB)
    proxy_splice: int = 16 * 1024 * 1024
    # locations written inside this one (searched when this prefix matches);
    # Server.locations lists them too, after the outer ones
    nested: tuple[Location, ...] = ()

    @property
    def named(self) -> bool:
        """A ``location @name`` block, reached only by try_files or error_page."""
        return self.pattern.startswith("@")


@dataclass(frozen=True, slots=True)
class TryFiles:
    """``try_files``: the names tested in order, then the fallback."""

    tries: tuple[tuple[Template, bool], ...]  # (name, test for a directory rather than a file)
    fallback: Template | None  # URI or @name for an internal redirect; None with ``code``
    code: int | None = None  # ``=CODE``: finish with this status


@dataclass(frozen=True, slots=True)
class ErrorPage:
    """One code of an ``error_page`` directive."""

    uri: Template  # /URI, @name, or a URL (answered with a redirect)
    overwrite: int = -1  # -1: keep the error's code; 0: the page's own; N: answer N


@dataclass(frozen=True, slots=True)
class Tls:
    """A server's ``ssl_*`` settings; the files were loaded once at config load."""

    certificates: tuple[tuple[str, str], ...]  # (certificate, key) absolute paths
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "HIGH:!aNULL:!MD5"
    prefer_server_ciphers: bool = False


@dataclass(frozen=True, slots=True)
class Server:
    listens: tuple[Listen, ...]
    names: tuple[str, ...]
    locations: tuple[Location, ...]
    keepalive_timeout: float
    client_header_timeout: float = 60.0  # deadline for a whole request header
    file: str = ""
    line: int = 0
    named: Mapping[str, Location] = field(default_factory=dict, compare=False)  # "@name"
    tls: Tls | None = None  # None: no ssl_certificate for this server
    # (number, size): a request line or header line over size -> 414 / 431, a
    # header section over number * size -> 431
    large_client_header_buffers: tuple[int, int] = (4, 8192)


@dataclass(frozen=True, slots=True)
class Http:
    servers: tuple[Server, ...]
    upstreams: Mapping[str, Upstream]
    mime_types: Mapping[str, str]  # lower-case extension -> MIME type
    default_type: str


@dataclass(frozen=True, slots=True)
class Main:
    worker_processes: int | None  # None means "auto": one per usable CPU
    worker_connections: int
    worker_shutdown_timeout: float
    pid: str  # absolute path
    error_log: str  # absolute path, or "stderr"
    error_log_level: str
    daemon: bool
    worker_timeout: float = 10.0  # a worker whose loop stalls this long is killed; 0 = never
    user: tuple[int, int, str, str] | None = None  # (uid, gid, user, group) for workers
    worker_rlimit_nofile: int | None = None
    worker_priority: int = 0  # the workers' nice value (0: left as inherited)
    # ("auto", allowed CPUs or None) or ("masks", one CPU tuple per worker); None = unset
    worker_cpu_affinity: tuple | None = None

    def cpus_for(self, slot: int, usable: tuple[int, ...]) -> tuple[int, ...] | None:
        """CPUs worker ``slot`` is bound to, or None when no affinity is configured."""
        if self.worker_cpu_affinity is None:
            return None
        kind, arg = self.worker_cpu_affinity
        if kind == "masks":
            return arg[min(slot, len(arg) - 1)]  # nginx: the last mask serves the rest
        allowed = [c for c in usable if arg is None or c in arg] or list(usable)
        return (allowed[slot % len(allowed)],)


AccessRules = tuple[tuple[bool, tuple[Any, ...]], ...]  # (allow?, networks) in order


def access_allows(rules: AccessRules, address: str) -> bool:
    """nginx's allow/deny: the first rule that matches decides; none matches: allowed."""
    if not rules:
        return True
    ip = ipaddress.ip_address(address.split("%")[0])
    for allow, networks in rules:
        if any(ip.version == n.version and ip in n for n in networks):
            return allow
    return True


@dataclass(frozen=True, slots=True)
class Sidecar:
    """``sidecar { listen ...; }``: the process that serves status (and later
    metrics, the runtime API and VRRP); never on the request path."""

    listens: tuple[Listen, ...]
    admin_token_file: str | None = None  # writes to the runtime API need this token
    # (allow?, networks) rules in order; empty: loopback clients only
    access: tuple[tuple[bool, tuple[Any, ...]], ...] = ()

    def allows(self, address: str) -> bool:
        """allow/deny as nginx; with no rules only loopback clients may use the API."""
        if not self.access:
            return ipaddress.ip_address(address.split("%")[0]).is_loopback
        return access_allows(self.access, address)


DEFAULT_SIDECAR_LISTEN = Listen("127.0.0.1", 9145)


@dataclass(frozen=True, slots=True)
class Config:
    main: Main
    http: Http
    path: str  # the main file, as given
    prefix: str
    files: tuple[str, ...]  # every file read, main first (for -T)
    sidecar: Sidecar | None = None

    def ssl_addresses(self) -> frozenset[Address]:
        """Addresses where TLS is terminated: any server's ``listen ... ssl`` makes
        the whole address ssl, as in nginx."""
        return frozenset(lst.address for server in self.http.servers
                         for lst in server.listens if lst.ssl)

    def listen_addresses(self) -> tuple[Listen, ...]:
        """One :class:`Listen` per distinct address, in first-declaration order.

        The declaration carrying socket options (backlog=, reuseport) stands for the
        address wherever it is written, as nginx copies ``lsopt`` over the address.
        """
        seen: dict[Address, Listen] = {}
        for server in self.http.servers:
            for listen in server.listens:
                first = seen.get(listen.address)
                if first is None or (listen.has_options and not first.has_options):
                    seen[listen.address] = listen
        return tuple(seen.values())

    def reuseport_addresses(self) -> frozenset[Address]:
        """Addresses served through one socket per worker slot."""
        return frozenset(lst.address for lst in self.listen_addresses() if lst.reuseport)

    @property
    def needs_sidecar(self) -> bool:
        """A sidecar runs for a ``sidecar`` block, any ``health_check`` or any
        ``resolve`` server."""
        return self.sidecar is not None or any(
            u.health_check is not None or any(s.resolve for s in u.servers)
            for u in self.http.upstreams.values())

    def sidecar_addresses(self) -> tuple[Listen, ...]:
        return self.sidecar.listens if self.sidecar else ()

    def bound_addresses(self) -> tuple[Listen, ...]:
        """Every address the master binds: the HTTP servers' and the sidecar's."""
        return self.listen_addresses() + self.sidecar_addresses()
