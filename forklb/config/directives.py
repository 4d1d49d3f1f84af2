"""The directive table: every directive forklb knows, declared once.

Like nginx's ``ngx_command_t`` arrays, each :class:`Spec` says where a
directive may appear, how many arguments it takes, whether it opens a block and
what type its value has.  The value type is a configobj ``validate`` check
string; :mod:`forklb.config.loader` turns each block of the parsed tree into a
configobj section and validates it against a configspec generated from this
table, so conversion and defaults live here and nowhere else.

Check functions take the arguments of one occurrence of a directive: a string
when the directive takes at most one argument, otherwise a list of strings.
They raise :class:`DirectiveError` with nginx's wording.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from validate import ValidateError, Validator

from forklb.http.next_upstream import PolicyError, parse_mask

MAIN, EVENTS, HTTP, UPSTREAM, SERVER, LOCATION, TYPES, SIDECAR = (
    "main", "events", "http", "upstream", "server", "location", "types", "sidecar",
)
ANY = None  # no upper bound on the number of arguments


@dataclass(frozen=True, slots=True)
class Spec:
    """How one directive is written and what its value is."""

    name: str
    contexts: frozenset[str]
    min_args: int
    max_args: int | None
    check: str | None = None  # configobj check for one occurrence's value
    block: str | None = None  # context of the children, for block directives
    multiple: bool = False  # may appear more than once in the same block
    inherit: bool = False  # flows from http to server to location unless set there

    @property
    def scalar(self) -> bool:
        """True when one occurrence's value is a string, not a list."""
        return self.max_args == 1


def _spec(name: str, contexts, nargs: int | tuple[int, int | None], check: str | None = None,
          **kw) -> Spec:
    """``nargs`` is an exact count or ``(min, max)`` with ``max=ANY`` for no bound."""
    lo, hi = (nargs, nargs) if isinstance(nargs, int) else nargs
    return Spec(name, frozenset(contexts), lo, hi, check, **kw)


_HTTP_LEVELS = (HTTP, SERVER, LOCATION)

TABLE: tuple[Spec, ...] = (
    # main context
    _spec("worker_processes", [MAIN], 1, check="workers(default=1)"),
    _spec("pid", [MAIN], 1, check="string(default=logs/forklb.pid)"),
    _spec("error_log", [MAIN], (1, 2), check="error_log(default=list('logs/error.log', 'error'))"),
    _spec("daemon", [MAIN], 1, check="flag(default=off)"),
    _spec("worker_shutdown_timeout", [MAIN], 1, check="time(default=30s)"),
    _spec("worker_timeout", [MAIN], 1, check="time(default=10s)"),
    _spec("user", [MAIN], (1, 2), check="user(default=None)"),
    _spec("worker_rlimit_nofile", [MAIN], 1, check="number(min=1, default=None)"),
    _spec("worker_priority", [MAIN], 1, check="priority(default=0)"),
    _spec("worker_cpu_affinity", [MAIN], (1, ANY), check="cpu_affinity(default=None)"),
    _spec("events", [MAIN], 0, block=EVENTS),
    _spec("http", [MAIN], 0, block=HTTP),
    _spec("sidecar", [MAIN], 0, block=SIDECAR),
    # sidecar
    _spec("admin_token_file", [SIDECAR], 1, check="string(default=None)"),
    # access rules; in http levels the allow/deny list of a level replaces the
    # parent's as a whole (the loader merges them in written order)
    _spec("allow", [HTTP, SERVER, LOCATION, SIDECAR], 1, check="cidr()", multiple=True),
    _spec("deny", [HTTP, SERVER, LOCATION, SIDECAR], 1, check="cidr()", multiple=True),
    # events
    _spec("worker_connections", [EVENTS], 1, check="number(min=1, default=512)"),
    # http
    _spec("types", [HTTP, SERVER, LOCATION], 0, block=TYPES, multiple=True),
    _spec("default_type", _HTTP_LEVELS, 1, check="string(default=text/plain)", inherit=True),
    _spec("log_format", [HTTP], (2, ANY), check="log_format()", multiple=True),
    _spec("access_log", _HTTP_LEVELS, (1, ANY), check="access_log()", multiple=True,
          inherit=True),
    _spec("keepalive_timeout", _HTTP_LEVELS, (1, 2), check="keepalive_timeout(default=75s)",
          inherit=True),
    _spec("keepalive_requests", _HTTP_LEVELS, 1, check="count(min=1, default=1000)",
          inherit=True),
    _spec("client_header_timeout", [HTTP, SERVER], 1, check="time(default=60s)", inherit=True),
    _spec("client_body_timeout", _HTTP_LEVELS, 1, check="time(default=60s)", inherit=True),
    # limits (slow clients, oversized headers)
    _spec("send_timeout", _HTTP_LEVELS, 1, check="time(default=60s)", inherit=True),
    # forklb's own: a body must keep arriving at this rate on average (0: off)
    _spec("client_body_min_rate", _HTTP_LEVELS, 1, check="size(default=500)", inherit=True),
    _spec("large_client_header_buffers", [HTTP, SERVER], 2,
          check="header_buffers(default=list('4', '8k'))", inherit=True),
    _spec("upstream", [HTTP], 1, block=UPSTREAM, multiple=True),
    _spec("server", [HTTP], 0, block=SERVER, multiple=True),
    # upstream
    _spec("server", [UPSTREAM], (1, ANY), check="upstream_server()", multiple=True),
    _spec("keepalive", [UPSTREAM], 1, check="count(min=0, default=32)"),
    # balancing methods (round robin when none is given)
    _spec("least_conn", [UPSTREAM], 0),
    _spec("ip_hash", [UPSTREAM], 0),
    _spec("hash", [UPSTREAM], (1, 2), check="hash_method(default=None)"),
    _spec("random", [UPSTREAM], (0, 2), check="random_method(default=None)"),
    _spec("health_check", [UPSTREAM], (0, ANY), check="health_check(default=None)"),
    # TLS termination (ngx_http_ssl_module).  Several certificate/key pairs may be
    # given (e.g. RSA and ECDSA); the n-th key goes with the n-th certificate.
    _spec("ssl_certificate", [HTTP, SERVER], 1, check="string()", multiple=True, inherit=True),
    _spec("ssl_certificate_key", [HTTP, SERVER], 1, check="string()", multiple=True,
          inherit=True),
    _spec("ssl_protocols", [HTTP, SERVER], (1, ANY),
          check="ssl_protocols(default=list('TLSv1.2', 'TLSv1.3'))", inherit=True),
    _spec("ssl_ciphers", [HTTP, SERVER], 1, check='string(default="HIGH:!aNULL:!MD5")',
          inherit=True),
    _spec("ssl_prefer_server_ciphers", [HTTP, SERVER], 1, check="flag(default=off)",
          inherit=True),
    # server
    _spec("listen", [SERVER, SIDECAR], (1, ANY), check="listen()", multiple=True),
    _spec("server_name", [SERVER], (1, ANY), check="string_list()", multiple=True),
    _spec("location", [SERVER, LOCATION], (1, 2), check="location()", block=LOCATION,
          multiple=True),
    _spec("root", _HTTP_LEVELS, 1, check="string(default=html)", inherit=True),
    _spec("index", _HTTP_LEVELS, (1, ANY), check="string_list(default=list('index.html'))",
          inherit=True),
    # location
    _spec("proxy_pass", [LOCATION], 1, check="proxy_url(default=None)"),
    _spec("return", [SERVER, LOCATION], (1, 2), check="return_action(default=None)"),
    _spec("client_max_body_size", _HTTP_LEVELS, 1, check="size(default=1m)", inherit=True),
    _spec("proxy_set_header", _HTTP_LEVELS, 2, check="string_list(min=2, max=2)",
          multiple=True, inherit=True),
    _spec("proxy_hide_header", _HTTP_LEVELS, 1, check="string()", multiple=True, inherit=True),
    _spec("proxy_pass_header", _HTTP_LEVELS, 1, check="string()", multiple=True, inherit=True),
    _spec("proxy_connect_timeout", _HTTP_LEVELS, 1, check="time(default=60s)", inherit=True),
    _spec("proxy_read_timeout", _HTTP_LEVELS, 1, check="time(default=60s)", inherit=True),
    _spec("proxy_send_timeout", _HTTP_LEVELS, 1, check="time(default=60s)", inherit=True),
    # static files and error pages (ngx_http_core_module, ngx_http_try_files_module)
    _spec("alias", [LOCATION], 1, check="string(default=None)"),
    _spec("try_files", [SERVER, LOCATION], (2, ANY), check="try_files(default=None)"),
    _spec("error_page", _HTTP_LEVELS, (2, ANY), check="error_page()", multiple=True,
          inherit=True),
    _spec("sendfile", _HTTP_LEVELS, 1, check="flag(default=on)", inherit=True),
    _spec("proxy_intercept_errors", _HTTP_LEVELS, 1, check="flag(default=off)", inherit=True),
    # retries (several proxy_next_upstream lines add up, as nginx's bitmask slot)
    _spec("proxy_next_upstream", _HTTP_LEVELS, (1, ANY), check="next_upstream()",
          multiple=True, inherit=True),
    _spec("proxy_next_upstream_tries", _HTTP_LEVELS, 1, check="nginx_number(default=0)",
          inherit=True),
    _spec("proxy_next_upstream_timeout", _HTTP_LEVELS, 1, check="time(default=0)",
          inherit=True),
    _spec("proxy_http_version", _HTTP_LEVELS, 1, check="http_version(default=1.1)",
          inherit=True),
    # forklb's own: zero-copy relaying of large bodies (forklb.http.splice)
    _spec("proxy_splice", _HTTP_LEVELS, 1, check="splice(default=on)", inherit=True),
)

# "include" is expanded by the parser in every context; it is listed so the
# table is the complete answer to "what does forklb accept".
INCLUDE = _spec("include", [MAIN, EVENTS, HTTP, UPSTREAM, SERVER, LOCATION, TYPES, SIDECAR], 1)


def specs_named(name: str) -> list[Spec]:
    """All specs for ``name`` (``server`` has two: a block and an upstream entry)."""
    return _BY_NAME.get(name, [])


def specs_in(context: str) -> list[Spec]:
    """The specs of directives allowed in ``context``."""
    return [s for s in TABLE if context in s.contexts]


_BY_NAME: dict[str, list[Spec]] = {}
for _s in (*TABLE, INCLUDE):
    _BY_NAME.setdefault(_s.name, []).append(_s)


# -- value checks -----------------------------------------------------------

class DirectiveError(ValidateError):
    """A bad value; ``message`` is worded as nginx words it (without location)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.index: int | None = None  # which occurrence, for multiple directives


# ngx_parse_time's units in milliseconds, largest first: each may appear once, in
# this order.  A space where "s" could stand counts seconds and ends the units.
_TIME_UNITS = (("y", 31536000000), ("M", 2592000000), ("w", 604800000), ("d", 86400000),
               ("h", 3600000), ("m", 60000), ("s", 1000), ("ms", 1))
_TIME_RE = re.compile(r"([0-9]*)(ms|[yMwdhms ])? *")
_MAX_INT = 2**63 - 1  # NGX_MAX_INT_T_VALUE
_DIGITS = re.compile(r"[0-9]+")
_SIZE_RE = re.compile(r"([0-9]+)([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")


def parse_time(text: str, is_sec: bool = False) -> float:
    """nginx time (``500ms``, ``1m30s``, bare seconds) in seconds, as ``ngx_parse_time``.

    Units go from the largest to the smallest, each at most once; a number
    without a unit counts seconds.  Millisecond values (``is_sec`` false, every
    time directive forklb has) may not use ``y`` or ``M``; second values
    (``is_sec``) may not use ``ms``.
    """
    units = [u for u in _TIME_UNITS[0 if is_sec else 2 :] if not (is_sec and u[0] == "ms")]
    pos, total_ms, valid = 0, 0, False
    while pos < len(text):
        m = _TIME_RE.match(text, pos)
        if m is None or m.end() == pos:
            raise DirectiveError("invalid value")
        digits, unit = m.group(1), m.group(2)
        valid = valid or bool(digits)
        total_ms += int(digits or 0) * _unit_ms(unit, units)
        pos = m.end()
    limit = _MAX_INT * 1000 if is_sec else _MAX_INT
    if not valid or total_ms > limit:
        raise DirectiveError("invalid value")
    return total_ms / 1000


def _unit_ms(unit: str | None, units: list[tuple[str, int]]) -> int:
    """Milliseconds per ``unit``; drops it and the units it excludes from ``units``."""
    if unit is None:  # a trailing bare number
        return 1000
    for i, (name, scale) in enumerate(units):
        if name == unit.replace(" ", "s"):
            del units[: len(units) if unit == " " else i + 1]
            return scale
    raise DirectiveError("invalid value")


def parse_size(text: str) -> int:
    """nginx size (``512``, ``8k``, ``1m``) in bytes."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise DirectiveError("invalid value")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


class AddressError(DirectiveError):
    """A bad address; ``reason`` is ``ngx_parse_url``'s (``invalid port``, ``no host``...)."""

    def __init__(self, reason: str, text: str):
        super().__init__(f'{reason} in "{text}"')
        self.reason = reason


def parse_address(text: str, default_port: int | None,
                  port_only: bool = True) -> tuple[str, int | None]:
    """Split ``host[:port]`` / ``[v6][:port]`` / ``*:port`` (and ``port`` if ``port_only``).

    Like ``ngx_parse_inet_url`` the port follows the first colon and an IPv6
    host (returned without brackets) must be an IPv6 address.
    """
    if text.startswith("["):
        return _parse_ipv6_address(text, default_port)
    if port_only and _DIGITS.fullmatch(text):
        return "", _port(text, text)
    host, colon, port = text.partition(":")
    number = _port(port, text) if colon else default_port
    if not host:
        raise AddressError("no host", text)
    return host, number


def _parse_ipv6_address(text: str, default_port: int | None) -> tuple[str, int | None]:
    end = text.find("]")
    if end < 0:
        raise AddressError("invalid host", text)
    host, rest = text[1:end], text[end + 1:]
    if rest and not rest.startswith(":"):
        raise AddressError("invalid host", text)
    number = _port(rest[1:], text) if rest else default_port
    if not host:
        raise AddressError("no host", text)
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise AddressError("invalid IPv6 address", text) from None
    return host, number


def _port(port: str, text: str) -> int:
    if not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise AddressError("invalid port", text)
    return int(port)


def _flag(value, default=None):
    if value.lower() not in ("on", "off"):
        raise DirectiveError(f'invalid value "{value}" in "{{directive}}" directive, '
                             'it must be "on" or "off"')
    return value.lower() == "on"


def _time(value, is_sec=False):
    try:
        return parse_time(value, is_sec)
    except DirectiveError:
        raise DirectiveError('"{directive}" directive invalid value') from None


def _workers(value):
    if value == "auto":
        return None
    if not _DIGITS.fullmatch(value) or int(value) < 1:
        raise DirectiveError('"{directive}" directive invalid value')
    return int(value)


def _number(value, min=0, default=None):
    """``ngx_atoi`` value; nginx says ``invalid number "x"`` (worker_connections)."""
    if not _DIGITS.fullmatch(value):
        raise DirectiveError(f'invalid number "{value}"')
    return _count(value, min)


def _count(value, min=0, default=None):
    """``ngx_atoi`` value; nginx says ``invalid value "x" in "name" directive``."""
    if not _DIGITS.fullmatch(value) or int(value) < int(min):
        raise DirectiveError(f'invalid value "{value}" in "{{directive}}" directive')
    return int(value)


def _priority(value, default=0):
    """``worker_priority [-|+]N``: a nice value, as nginx's ngx_set_priority reads it
    (no range check: setpriority() clamps to -20..19)."""
    sign, digits = (value[0], value[1:]) if value[:1] in ("-", "+") else ("+", value)
    if not _DIGITS.fullmatch(digits):
        raise DirectiveError('"{directive}" directive invalid number')
    return -int(digits) if sign == "-" else int(digits)


def _error_log(value):
    path = value[0]
    level = value[1] if len(value) > 1 else "error"
    if level not in LOG_LEVELS:
        raise DirectiveError(f'invalid log level "{level}"')
    return (path, level)


def _user(value):
    """``user NAME [GROUP]`` resolved now: (uid, gid, name, group).  GROUP defaults
    to NAME, as in nginx."""
    import grp
    import pwd

    value = [value] if isinstance(value, str) else value
    name = value[0]
    group = value[1] if len(value) > 1 else name
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        raise DirectiveError(f'getpwnam("{name}") failed') from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise DirectiveError(f'getgrnam("{group}") failed') from None
    return (uid, gid, name, group)


def _cpu_affinity(value):
    """``auto [MASK]`` or one bit mask per worker (rightmost bit = CPU 0).

    Returns ("auto", cpus allowed or None) or ("masks", tuple of CPU tuples).
    """
    value = [value] if isinstance(value, str) else value
    if value[0] == "auto":
        if len(value) > 2:
            raise DirectiveError('invalid number of arguments in "{directive}" directive')
        return ("auto", _mask(value[1]) if len(value) == 2 else None)
    return ("masks", tuple(_mask(m) for m in value))


def _mask(text: str) -> tuple[int, ...]:
    if not text or len(text) > 64 or set(text) - {"0", "1"}:
        raise DirectiveError(f'invalid character in "{text}" of "{{directive}}"')
    cpus = tuple(i for i, bit in enumerate(reversed(text)) if bit == "1")
    if not cpus:
        raise DirectiveError(f'"{{directive}}" mask "{text}" selects no CPU')
    return cpus


def _keepalive_timeout(value):
    """``keepalive_timeout TIME [HEADER_TIME]``: the second is checked, not used."""
    value = [value] if isinstance(value, str) else value
    if len(value) > 1:
        _time(value[1], is_sec=True)
    return _time(value[0])


LOG_ESCAPES = ("default", "json", "none")


def _log_format(value):
    """``log_format NAME [escape=default|json|none] STRING...`` -> (name, text, escape)."""
    name, *parts = value
    escape = "default"
    if parts and parts[0].startswith("escape="):
        escape = parts[0][len("escape="):]
        if escape not in LOG_ESCAPES:
            raise DirectiveError(f'unknown log format escaping "{escape}"')
        parts = parts[1:]
    return (name, "".join(parts), escape)


CONNECTION_POOL_SIZE = 512  # nginx's default on 64-bit systems


def _header_buffers(value):
    """``large_client_header_buffers NUMBER SIZE`` -> (number, size), as
    ``ngx_conf_set_bufs_slot`` and the server merge check it."""
    number, size = value
    if not _DIGITS.fullmatch(number) or int(number) == 0:
        raise DirectiveError('"{directive}" directive invalid value')
    nbytes = _size(size)
    if nbytes == 0:
        raise DirectiveError('"{directive}" directive invalid value')
    if nbytes < CONNECTION_POOL_SIZE:
        raise DirectiveError('the "large_client_header_buffers" size must be equal to or '
                             'greater than "connection_pool_size"')
    return (int(number), nbytes)


LOG_GZIP_BUFFER = 64 * 1024  # nginx's buffer for a gzip log given no buffer=


def _access_log(value):
    """``access_log off`` -> None; ``access_log PATH [FORMAT [buffer=SIZE] [gzip[=LEVEL]]
    [flush=TIME] [if=CONDITION]]`` -> (path, format, buffer size, flush seconds, gzip
    level, condition text), 0 (or None) for what is not given, as
    ``ngx_http_log_set_log`` reads them."""
    value = [value] if isinstance(value, str) else value
    path, *rest = value
    if path == "off":
        if rest:
            raise DirectiveError(f'invalid parameter "{rest[0]}"')
        return None
    fmt = rest[0] if rest else "combined"
    size, flush, gzip, condition = 0, 0.0, 0, None
    for param in rest[1:]:
        name, eq, arg = param.partition("=")
        if name == "buffer" and eq:
            size = _log_parameter(parse_size, arg, "invalid buffer size")
        elif name == "flush" and eq:
            flush = _log_parameter(parse_time, arg, "invalid flush time")
        elif name == "gzip":
            size = size or LOG_GZIP_BUFFER
            gzip = 1  # nginx's Z_BEST_SPEED
            if eq:
                gzip = int(arg) if _DIGITS.fullmatch(arg) else 0
                if not 1 <= gzip <= 9:
                    raise DirectiveError(f'invalid compression level "{arg}"')
        elif name == "if" and eq:
            condition = arg
        else:
            raise DirectiveError(f'invalid parameter "{param}"')
    if flush and not size:
        raise DirectiveError(f'no buffer is defined for access_log "{path}"')
    return (path, fmt, size, flush, gzip, condition)


def _log_parameter(parse, text: str, error: str):
    """``parse(text)``, which must be above zero; else ``error "text"``."""
    try:
        value = parse(text)
    except DirectiveError:
        value = 0
    if not value:
        raise DirectiveError(f'{error} "{text}"')
    return value


def _upstream_server(value):
    value = [value] if isinstance(value, str) else value
    address, *params = value
    if address.startswith("unix:"):
        raise DirectiveError(f'unix socket upstream "{address}" is not supported')
    try:
        host, port = parse_address(address, 80)
    except AddressError as e:
        raise DirectiveError(f'{e.reason} in upstream "{address}"') from None
    if not host:
        raise DirectiveError(f'no host in upstream "{address}"')
    options = {"weight": 1, "max_fails": 1, "fail_timeout": 10.0, "backup": False,
               "down": False, "max_conns": 0, "resolve": False, "valid": 30.0}
    for param in params:
        name, eq, arg = param.partition("=")
        try:
            options[name] = _server_parameter(name, eq, arg)
        except ValueError:
            raise DirectiveError(f'invalid parameter "{param}"') from None
    return (address, host, port, options)


def _server_parameter(name: str, eq: str, arg: str) -> int | float | bool:
    """One ``server`` parameter of an upstream; ValueError when it is not valid."""
    if name in ("backup", "down", "resolve") and not eq:
        return True
    if not eq:
        raise ValueError(name)
    if name in ("fail_timeout", "valid"):
        try:
            return parse_time(arg)
        except DirectiveError:
            raise ValueError(arg) from None
    lowest = {"weight": 1, "max_fails": 0, "max_conns": 0}.get(name)
    if lowest is None or not _DIGITS.fullmatch(arg) or int(arg) < lowest:
        raise ValueError(arg)
    return int(arg)


def _hash_method(value):
    """``hash KEY [consistent]`` -> (key, consistent)."""
    value = [value] if isinstance(value, str) else value
    if len(value) == 2 and value[1] != "consistent":
        raise DirectiveError(f'invalid parameter "{value[1]}"')
    return (value[0], len(value) == 2)


HEALTH_CHECK_DEFAULTS = {"interval": 2.0, "timeout": 1.0, "fails": 3, "passes": 2,
                         "uri": "/", "status": (200, 399), "host": None}


def _health_check(value):
    """``health_check [interval=T] [timeout=T] [fails=N] [passes=N] [uri=URI]
    [status=LO-HI] [host=NAME]`` -> dict of those settings."""
    value = [] if value is None else [value] if isinstance(value, str) else value
    options = dict(HEALTH_CHECK_DEFAULTS)
    for param in value:
        name, eq, arg = param.partition("=")
        try:
            if not eq or name not in options:
                raise ValueError(param)
            if name in ("interval", "timeout"):
                options[name] = parse_time(arg)
                if options[name] <= 0:
                    raise ValueError(arg)
            elif name in ("fails", "passes"):
                if not _DIGITS.fullmatch(arg) or int(arg) < 1:
                    raise ValueError(arg)
                options[name] = int(arg)
            elif name == "uri":
                if not arg.startswith("/"):
                    raise ValueError(arg)
                options[name] = arg
            elif name == "status":
                lo, _, hi = arg.partition("-")
                lo, hi = int(lo), int(hi or lo)
                if not 100 <= lo <= hi <= 599:
                    raise ValueError(arg)
                options[name] = (lo, hi)
            else:
                options[name] = arg
        except (ValueError, DirectiveError):
            raise DirectiveError(f'invalid parameter "{param}"') from None
    return options


def _cidr(value):
    """``allow``/``deny`` argument: an address, a network or ``all``."""
    if value == "all":
        return ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")
    try:
        return (ipaddress.ip_network(value, strict=False),)
    except ValueError:
        raise DirectiveError(f'invalid parameter "{value}"') from None


def _return_action(value):
    """``return CODE [TEXT|URL]`` or ``return URL`` (302) -> (code, text or None)."""
    value = [value] if isinstance(value, str) else value
    first = value[0]
    if len(value) == 1 and not _DIGITS.fullmatch(first):
        if first.startswith(("http://", "https://", "$scheme")):
            return (302, first)
        raise DirectiveError(f'invalid return code "{first}"')
    if not _DIGITS.fullmatch(first) or int(first) > 999:
        raise DirectiveError(f'invalid return code "{first}"')
    return (int(first), value[1] if len(value) == 2 else None)


def _random_method(value):
    """``random [two [least_conn]]`` -> (two, least_conn)."""
    value = [] if value is None else [value] if isinstance(value, str) else value
    expected = ["two", "least_conn"]
    for i, word in enumerate(value):
        if word != expected[i]:
            raise DirectiveError(f'invalid parameter "{word}"')
    return (len(value) >= 1, len(value) == 2)


def _listen(value):
    value = [value] if isinstance(value, str) else value
    address, *params = value
    try:
        host, port = parse_address(address, 80)
    except AddressError as e:
        raise DirectiveError(f'{e.message} of the "listen" directive') from None
    if host in ("", "*"):
        host = "0.0.0.0"
    elif host == "localhost":
        host = "127.0.0.1"
    else:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise DirectiveError(f'host not found in "{address}" of the "listen" directive'
                                 ) from None
    default_server, backlog, ssl, reuseport = False, 511, False, False
    for param in params:
        if param in ("default_server", "default"):
            default_server = True
        elif param == "ssl":
            ssl = True
        elif param.startswith("backlog="):
            backlog = _backlog(param)
        elif param == "reuseport":  # one socket per worker slot (ngx_clone_listening)
            reuseport = True
        else:
            raise DirectiveError(f'invalid parameter "{param}"')
    return (host, port, default_server, backlog, ssl, reuseport)


def _backlog(param: str) -> int:
    number = param[len("backlog="):]
    if not _DIGITS.fullmatch(number) or int(number) == 0:
        raise DirectiveError(f'invalid backlog "{param}"')
    return int(number)


# ssl_protocols names as nginx spells them.  SSLv2/SSLv3 are accepted, as nginx
# does, but OpenSSL 3 cannot speak them, so they enable nothing.
SSL_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _ssl_protocols(value):
    """``ssl_protocols NAME...`` -> the names in nginx's order, without repeats."""
    value = [value] if isinstance(value, str) else value
    for name in value:
        if name not in SSL_PROTOCOLS:
            raise DirectiveError(f'invalid value "{name}"')
    return tuple(p for p in SSL_PROTOCOLS if p in value)


_MODIFIERS = ("=", "^~", "~", "~*")


def _location(value):
    """``location [modifier] pattern``; the modifier may be glued on (``=/x``, ``~\\.php$``)."""
    if isinstance(value, list) and len(value) == 2:
        modifier, pattern = value
        if modifier not in _MODIFIERS:
            raise DirectiveError(f'invalid location modifier "{modifier}"')
        return (modifier, pattern)
    name = value[0] if isinstance(value, list) else value
    for modifier in ("=", "^~", "~*", "~"):
        if name.startswith(modifier):
            return (modifier, name[len(modifier):])
    return ("", name)


def _proxy_url(value):
    lower = value.lower()
    if lower.startswith("https://"):
        raise DirectiveError("https upstreams are not supported yet")
    if not lower.startswith("http://"):
        raise DirectiveError("invalid URL prefix")
    rest = value[7:]
    slash = rest.find("/", rest.find("]") + 1 if rest.startswith("[") else 0)
    authority, uri = (rest, None) if slash < 0 else (rest[:slash], rest[slash:])
    try:
        host, port = parse_address(authority, None, port_only=False)
    except AddressError as e:
        raise DirectiveError(f'{e.reason} in upstream "{rest}"') from None
    return (authority, host, port, uri)


def _size(value):
    try:
        return parse_size(value)
    except DirectiveError:
        raise DirectiveError('"{directive}" directive invalid value') from None


def _try_files(value):
    """``try_files FILE... URI|=CODE``: the list as written; ``=CODE`` is checked here."""
    last = value[-1]
    if last.startswith("="):
        code = last[1:]
        if not _DIGITS.fullmatch(code) or int(code) > 999:
            raise DirectiveError(f'invalid code "{last}"')
    return list(value)


def _error_page(value):
    """``error_page CODE... [=[RESPONSE]] URI`` -> (codes, overwrite, uri).

    ``overwrite`` is nginx's: -1 keeps the error's code, 0 (a bare ``=``) takes
    the code of the page's own response, N answers with N.
    """
    *rest, uri = value
    overwrite = -1
    if rest[-1].startswith("="):
        if len(rest) == 1:
            raise DirectiveError(f'invalid value "{rest[-1]}"')
        digits = rest.pop()[1:]
        if digits and not _DIGITS.fullmatch(digits):
            raise DirectiveError(f'invalid value "={digits}"')
        overwrite = int(digits) if digits else 0
    codes = []
    for code in rest:
        if not _DIGITS.fullmatch(code) or int(code) == 499:
            raise DirectiveError(f'invalid value "{code}"')
        if not 300 <= int(code) <= 599:
            raise DirectiveError(f'value "{code}" must be between 300 and 599')
        codes.append(int(code))
    return (tuple(codes), overwrite, uri)


def _next_upstream(value):
    """``proxy_next_upstream`` arguments -> the bit mask of :mod:`forklb.http.next_upstream`."""
    try:
        return parse_mask([value] if isinstance(value, str) else value)
    except PolicyError as e:
        raise DirectiveError(e.message) from None


# proxy_splice on: bodies from this size on are spliced (forklb.http.splice; measured)
SPLICE_DEFAULT_MIN = 16 * 1024 * 1024


def _splice(value, default=None):
    """``proxy_splice on | off | SIZE``: the smallest body spliced, 0 for off."""
    if value.lower() in ("on", "off"):
        return SPLICE_DEFAULT_MIN if value.lower() == "on" else 0
    try:
        size = parse_size(value)
    except DirectiveError:
        size = 0
    if size <= 0:
        raise DirectiveError(f'invalid value "{value}" in "{{directive}}" directive, '
                             'it must be "on", "off" or a size')
    return size


def _nginx_number(value, default=None):
    """``ngx_conf_set_num_slot``: a non-negative integer."""
    if not _DIGITS.fullmatch(value):
        raise DirectiveError('"{directive}" directive invalid number')
    return int(value)


def _http_version(value, default=None):
    """``proxy_http_version 1.0 | 1.1``."""
    if value not in ("1.0", "1.1"):
        raise DirectiveError(f'invalid value "{value}"')
    return value


def _occurrences(validator: Validator):
    """``each("check")``: validate every occurrence of a multiple directive."""

    def each(value, inner, default=None):
        if value is None or isinstance(value, str):  # absent: no occurrences
            return []
        out = []
        for i, occurrence in enumerate(value):
            try:
                out.append(validator.check(inner, occurrence))
            except DirectiveError as e:
                e.index = i
                raise
        return out

    return each


def make_validator() -> Validator:
    """A configobj Validator that knows forklb's value types."""
    v = Validator({
        "flag": _flag, "time": _time, "workers": _workers, "error_log": _error_log,
        "keepalive_timeout": _keepalive_timeout, "log_format": _log_format,
        "access_log": _access_log, "upstream_server": _upstream_server, "listen": _listen,
        "location": _location, "proxy_url": _proxy_url,
        "size": _size, "number": _number, "count": _count, "user": _user,
        "cpu_affinity": _cpu_affinity, "priority": _priority, "hash_method": _hash_method,
        "health_check": _health_check, "cidr": _cidr, "return_action": _return_action,
        "random_method": _random_method, "try_files": _try_files,
        "error_page": _error_page, "next_upstream": _next_upstream,
        "nginx_number": _nginx_number, "http_version": _http_version,
        "header_buffers": _header_buffers, "splice": _splice,
    })
    v.functions["each"] = _occurrences(v)
    v.functions["ssl_protocols"] = _ssl_protocols
    return v


def configspec_for(context: str) -> dict[str, str]:
    """The configspec (as a dict) of one block of ``context``."""
    spec: dict[str, str] = {}
    for s in specs_in(context):
        if s.check is None:
            continue
        if s.multiple:
            spec[s.name] = f'each("{s.check}", default=list())'
        else:
            spec[s.name] = s.check
    return spec
