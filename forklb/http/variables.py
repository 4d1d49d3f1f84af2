"""nginx-style ``$variables`` in config values, compiled once at load time.

A value such as ``"$host:$server_port"`` becomes a :class:`Template` whose
parts are literal strings and getter functions.  Rendering a template on the
hot path is a loop over those parts; nothing is parsed per request.

Getters take a request context (the worker's ``Exchange``; any object with the
attributes used below works, which keeps this module free of I/O).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from forklb.http.protocol import CLOCK
from forklb.http.routing import capture

Getter = Callable[[Any], str]

_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


def _proxy_add_x_forwarded_for(r: Any) -> str:
    previous = r.header("x-forwarded-for")
    return f"{previous}, {r.remote_addr}" if previous else r.remote_addr


def _time_local(r: Any) -> str:
    """``$time_local``: the time now (nginx's cached log time, not the request's
    start), formatted once a second."""
    CLOCK.now()
    return CLOCK.time_local


def _time_iso8601(r: Any) -> str:
    """ISO 8601 local time with the UTC offset as ``+hh:mm`` (ngx_times.c)."""
    CLOCK.now()
    return CLOCK.time_iso8601


def _request_time(r: Any) -> str:
    return f"{time.time() - r.start_time:.3f}"


# Variables that are attributes of the request context: text, or a number shown in
# decimal.  Their getters are made from these tables, and the access-log renderer
# (forklb.log.line_renderer) reads the same attributes inline (see inline_form).
TEXT_ATTRIBUTES: dict[str, str] = {
    "host": "host", "remote_addr": "remote_addr", "request": "request_line",
    "request_method": "method", "request_uri": "target", "uri": "uri", "document_uri": "uri",
    "args": "args", "query_string": "args", "scheme": "scheme", "https": "https",
    "ssl_protocol": "ssl_protocol", "ssl_cipher": "ssl_cipher",
    "ssl_server_name": "ssl_server_name", "server_protocol": "protocol",
    "server_addr": "server_addr", "server_name": "server_name", "proxy_host": "proxy_host",
    "upstream_addr": "upstream_addr", "upstream_status": "upstream_status",
    "upstream_response_time": "upstream_response_time",
    "upstream_connect_time": "upstream_connect_time",
}
NUMBER_ATTRIBUTES: dict[str, str] = {
    "remote_port": "remote_port", "server_port": "server_port", "status": "status",
    "body_bytes_sent": "body_bytes_sent", "bytes_sent": "bytes_sent", "pid": "pid",
    "connection": "connection_id", "connection_requests": "connection_requests",
}
# The Exchange properties that only read its connection: code built for Exchanges
# (the access-log renderer) reads the connection itself, sparing a call.
CONNECTION_PATHS: dict[str, str] = {
    "remote_addr": "conn.remote_addr", "remote_port": "conn.remote_port",
    "server_port": "conn.listener.port", "connection_id": "conn.serial",
    "connection_requests": "conn.requests",
}
# Of the text variables, those forklb writes itself (addresses it accepted on, its
# own words and numbers): never anything an access log has to escape.
SAFE_TEXT: frozenset[str] = frozenset({
    "remote_addr", "scheme", "https", "server_protocol", "upstream_status",
    "upstream_response_time", "upstream_connect_time",
})


def _number_getter(attribute: str) -> Getter:
    get = attrgetter(attribute)
    return lambda r: str(get(r))


def _remote_user(r: Any) -> str:
    return ""  # no authentication module: always empty, as nginx without auth_basic


VARIABLES: dict[str, Getter] = {
    **{name: attrgetter(attribute) for name, attribute in TEXT_ATTRIBUTES.items()},
    **{name: _number_getter(attribute) for name, attribute in NUMBER_ATTRIBUTES.items()},
    "remote_user": _remote_user,
    "proxy_add_x_forwarded_for": _proxy_add_x_forwarded_for,
    "request_time": _request_time,
    "time_local": _time_local,
    "time_iso8601": _time_iso8601,
    "msec": lambda r: f"{time.time():.3f}",
}

# getter -> how inline_form reads it
_ATTRIBUTE_OF: dict[Getter, tuple[str, str]] = {
    **{VARIABLES[name]: ("safe" if name in SAFE_TEXT else "text",
                         CONNECTION_PATHS.get(attribute, attribute))
       for name, attribute in TEXT_ATTRIBUTES.items()},
    **{VARIABLES[name]: ("number", CONNECTION_PATHS.get(attribute, attribute))
       for name, attribute in NUMBER_ATTRIBUTES.items()},
    VARIABLES["request"]: ("request", ""),
    _time_local: ("clock", "time_local"),
    _time_iso8601: ("clock", "time_iso8601"),
}


def inline_form(get: Getter) -> tuple[str, str] | None:
    """How ``get`` can be read without calling it, for code built at load time:

    - ``("text", path)``, ``("safe", path)`` or ``("number", path)``: an attribute
      of an Exchange (``conn.serial``: a path, :data:`CONNECTION_PATHS`); "safe"
      text never needs escaping (:data:`SAFE_TEXT`);
    - ``("request", "")``: the request line, from the method, target and version;
    - ``("clock", attribute)``: an attribute of :data:`forklb.http.protocol.CLOCK`,
      which a worker keeps current;
    - ``("header", name)``: request header ``name`` (the worker notes it while
      parsing: :data:`NOTED_HEADERS`);
    - ``("empty", "")``: a value that is always empty.

    None when it has to be called."""
    if get is _remote_user:
        return ("empty", "")
    header = getattr(get, "header", None)
    if header is not None:
        return ("header", header)
    return _ATTRIBUTE_OF.get(get)


# The request headers variables read ($http_*, and X-Forwarded-For for
# $proxy_add_x_forwarded_for): a worker notes these as the request is parsed, so a
# variable is a dict lookup (forklb.http.connection).  Filled as templates compile,
# at config load in the master, before workers fork.
NOTED_HEADERS: set[bytes] = {b"x-forwarded-for"}
NOTED_NAMES: set[str] = {"x-forwarded-for"}  # the same, as text


def _header_getter(name: str) -> Getter:
    """``$http_x_real_ip`` reads request header ``x-real-ip`` (names are lower-case)."""
    header = name.lower().replace("_", "-")
    NOTED_HEADERS.add(header.encode("latin-1"))
    NOTED_NAMES.add(header)

    def get(r: Any) -> str:
        return r.header(header)

    get.header = header  # type: ignore[attr-defined]  # see inline_form
    return get


def _arg_getter(name: str) -> Getter:
    """``$arg_page`` is the raw value of query argument ``page`` (first one wins)."""
    def get(r: Any) -> str:
        for pair in r.args.split("&"):
            key, sep, value = pair.partition("=")
            if key == name:
                return value
        return ""

    return get


def _capture_getter(key: int | str) -> Getter:
    """``$1``..``$9`` and named captures (see :func:`forklb.http.routing.capture`)."""
    return lambda r: capture(r, key)


def getter(name: str, captures: frozenset[str] = frozenset()) -> Getter | None:
    """The getter for variable ``name``, or None when nginx would not know it.

    Names are case-insensitive, as nginx lower-cases them (``$HOST`` is ``$host``),
    except named regex captures (``captures``), which are taken as written.
    """
    if name in captures:
        return _capture_getter(name)
    name = name.lower()
    if name.startswith("http_") and len(name) > 5:
        return _header_getter(name[5:])
    if name.startswith("arg_") and len(name) > 4:
        return _arg_getter(name[4:])
    return VARIABLES.get(name)


class UnknownVariable(ValueError):
    """Raised by :func:`compile_template`; ``.name`` is the variable."""

    def __init__(self, name: str):
        super().__init__(f'unknown "{name}" variable')
        self.name = name


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled value: literal text with variables in it."""

    source: str
    parts: tuple[str | Getter, ...]

    @property
    def is_literal(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, r: Any, empty: str = "") -> str:
        """The value for request ``r``; an empty variable renders as ``empty``.

        Access logs pass ``empty="-"`` as nginx does.
        """
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(part(r) or empty)
        return "".join(out)


def compile_template(text: str, captures: frozenset[str] = frozenset()) -> Template:
    """Compile ``text``; raises :class:`UnknownVariable` for an unknown name.

    ``captures``: the named captures of the config's regexes, which are variables too.
    """
    parts: list[str | Getter] = []
    pos = 0
    for m in _VAR.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        name = m.group(1) or m.group(2)
        rest = ""
        if m.group(2) and name[0] in "123456789":
            # "$1abc" is capture 1, then "abc"; "${1}" is no capture (as in nginx)
            name, rest = name[0], name[1:]
            get: Getter | None = _capture_getter(int(name))
        else:
            get = getter(name, captures)
        if get is None:
            raise UnknownVariable(name)
        parts.append(get)
        if rest:
            parts.append(rest)
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return Template(text, tuple(parts))
