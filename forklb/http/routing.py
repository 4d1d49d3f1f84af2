"""Which ``server`` and which ``location`` handle a request, as nginx decides.

Pure functions and tables built once per configuration: no sockets here.

* :func:`normalize_path` is nginx's URI normalisation (``%XX`` decoded,
  slashes merged, ``.`` and ``..`` resolved); ``..`` above the root, a
  malformed ``%`` escape and an encoded NUL are errors.
* :class:`LocationMatcher`: ``=`` exact match stops the search; otherwise the
  longest prefix is remembered; if it is ``^~`` regexes are skipped; regexes
  are tried in config order and the first match wins; else the longest prefix.
* :class:`VirtualHosts`: per listening address, exact name, then the longest
  leading wildcard (``*.example.org``, ``.example.org``), then the longest
  trailing wildcard (``www.example.*``), then the first regex (``~...``),
  then the ``default_server`` (else the first server of that address).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import unquote_to_bytes

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
URIS_KEPT = 4096  # URIs whose location a LocationMatcher remembers


class BadPath(ValueError):
    """The request path cannot be normalised (nginx answers 400)."""


def normalize_path(path: str) -> str:
    """Decode, merge slashes and resolve dot segments of an absolute path."""
    if not path.startswith("/"):
        raise BadPath(path)
    if "%" in path:
        if _BAD_ESCAPE.search(path):
            raise BadPath(path)
        raw = unquote_to_bytes(path)
        if b"\0" in raw:
            raise BadPath(path)
        path = raw.decode("utf-8", "surrogateescape")
    if "//" not in path and "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if not out:
                raise BadPath(path)
            out.pop()
        else:
            out.append(seg)
    trailing = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


class _LocationLike(Protocol):
    modifier: str
    pattern: str
    regex: re.Pattern[str] | None


L = TypeVar("L", bound=_LocationLike)


class LocationMatcher(Generic[L]):
    """nginx's location lookup over one server's locations.

    Locations nested in a prefix location (their ``nested`` attribute) are
    searched when that prefix is the longest match, as ngx_http_core_find_location
    does: an exact or regex match inside wins; otherwise the innermost prefix is
    remembered and the outer regexes are tried unless the outer prefix is ``^~``.
    ``locations`` may list nested ones too (they are told apart by ``nested``).
    """

    def __init__(self, locations: Sequence[L]):
        self.exact: dict[str, L] = {}
        prefixes: list[L] = []
        self.regexes: list[L] = []
        inside = {id(c) for loc in locations for c in getattr(loc, "nested", ())}
        self.inner: dict[int, LocationMatcher[L]] = {}
        for loc in locations:
            if id(loc) in inside:
                continue
            if getattr(loc, "nested", ()):
                self.inner[id(loc)] = LocationMatcher(loc.nested)
            if loc.modifier == "=":
                self.exact.setdefault(loc.pattern, loc)
            elif loc.modifier in ("~", "~*"):
                self.regexes.append(loc)
            else:
                prefixes.append(loc)
        # Longest first; a stable sort keeps config order among equals.
        self.prefixes = sorted(prefixes, key=lambda loc: -len(loc.pattern))
        # uri -> its location, for the URIs seen first (a site's working set; the
        # bound keeps a scan of random URIs from growing it)
        self.seen: dict[str, L | None] = {}

    def match(self, uri: str) -> L | None:
        """The location for normalised ``uri``, or None if nothing matches."""
        seen = self.seen
        if uri in seen:
            return seen[uri]
        found = self._find(uri)[0]
        if len(seen) < URIS_KEPT:
            seen[uri] = found
        return found

    def _find(self, uri: str) -> tuple[L | None, bool]:
        """(location, final): final when an exact or a regex location matched."""
        exact = self.exact.get(uri)
        if exact is not None:
            return exact, True
        best = None
        for loc in self.prefixes:
            if uri.startswith(loc.pattern):
                best = loc
                break
        noregex = False
        if best is not None:
            noregex = best.modifier == "^~"  # the outer one's: an inner ^~ does not count
            inner = self.inner.get(id(best)) if self.inner else None
            if inner is not None:
                found, final = inner._find(uri)
                if final:
                    return found, True
                best = found or best
        if not noregex:
            for loc in self.regexes:
                if loc.regex is not None and loc.regex.search(uri):
                    return loc, True
        return best, False


S = TypeVar("S")


class VirtualHosts(Generic[S]):
    """Name-based server selection for one listening address."""

    def __init__(self, servers: Sequence[tuple[S, Sequence[str], bool]]):
        """``servers``: (server, its server_name list, is default_server) in order."""
        if not servers:
            raise ValueError("an address needs at least one server")
        self.exact: dict[str, S] = {}
        leading: list[tuple[str, S]] = []  # ".example.org" suffix to match
        trailing: list[tuple[str, S]] = []  # "www.example." prefix to match
        self.regexes: list[tuple[re.Pattern[str], S]] = []
        self.default = servers[0][0]
        for server, names, is_default in servers:
            if is_default:
                self.default = server
            for name in names:
                if name.startswith("~"):  # compiled as written: lower-casing \S gives \s
                    self.regexes.append((server_regex(name[1:]), server))
                    continue
                name = name.lower()
                if name.startswith("*."):
                    leading.append((name[1:], server))
                elif name.startswith("."):
                    self.exact.setdefault(name[1:], server)
                    leading.append((name, server))
                elif name.endswith(".*"):
                    trailing.append((name[:-1], server))
                else:
                    self.exact.setdefault(name, server)
        self.leading = sorted(leading, key=lambda p: -len(p[0]))
        self.trailing = sorted(trailing, key=lambda p: -len(p[0]))

    def select(self, host: str) -> S:
        """The server for ``host`` (lower-case, without port)."""
        server = self.exact.get(host)
        if server is not None:
            return server
        if host:
            for suffix, server in self.leading:
                if host.endswith(suffix):
                    return server
            for prefix, server in self.trailing:
                if host.startswith(prefix):
                    return server
            for regex, server in self.regexes:
                if regex.search(host):
                    return server
        return self.default


class BadHost(ValueError):
    """The ``Host`` value is not a valid host (nginx: "client sent invalid host header")."""


_BAD_HOST = re.compile(r"\.\.|[/\x00-\x20\x7f]")


def split_host(value: str) -> str:
    """``Host`` header value to the lower-case name nginx matches (no port).

    As ``ngx_http_validate_host``: ``..``, ``/``, controls and spaces are refused,
    one trailing dot is dropped, and nothing left (``""``, ``.``) is refused.
    """
    if _BAD_HOST.search(value):
        raise BadHost(value)
    if value.startswith("["):
        end = value.find("]")
        host = value[: end + 1].lower() if end > 0 else value.lower()
    else:
        host = value.split(":", 1)[0].lower()
        if host.endswith("."):
            host = host[:-1]
    if not host:
        raise BadHost(value)
    return host


_PCRE_NAMED = re.compile(r"(?<!\\)\(\?(?:<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)')")


def pcre_pattern(pattern: str) -> str:
    """A PCRE pattern as Python's ``re`` reads it: ``(?<name>...)`` and ``(?'name'...)``
    (nginx configs use them for named captures) become ``(?P<name>...)``."""
    if "(?" not in pattern:
        return pattern
    return _PCRE_NAMED.sub(lambda m: f"(?P<{m.group(1) or m.group(2)}>", pattern)


@lru_cache(maxsize=1024)
def server_regex(pattern: str) -> re.Pattern[str]:
    """A ``server_name ~pattern`` compiled (host names are matched case-insensitively)."""
    return re.compile(pcre_pattern(pattern), re.IGNORECASE)


def _plain_name_matches(name: str, host: str) -> bool:
    if name.startswith("*."):
        return host.endswith(name[1:])
    if name.startswith("."):
        return host == name[1:] or host.endswith(name)
    if name.endswith(".*"):
        return host.startswith(name[:-1])
    return host == name


def server_name_match(names: Sequence[str], host: str) -> re.Match[str] | None:
    """The ``server_name`` regex match that chose this server for ``host``, if a regex
    did (nginx tries regexes only when no exact or wildcard name matched)."""
    if not host or any(_plain_name_matches(n, host) for n in names if not n.startswith("~")):
        return None
    for name in names:
        if name.startswith("~"):
            m = server_regex(name[1:]).search(host)
            if m is not None:
                return m
    return None


def capture(r: Any, key: int | str) -> str:
    """nginx's ``$1``..``$9`` (``key`` int) or a named capture ``$name`` for request ``r``.

    The last regex that matched sets them: the location's regex if the location is
    one, else the ``server_name`` regex that chose the server. A named capture the
    location's regex lacks keeps the server's value, as in nginx. Computed only when
    a config uses captures, so routing itself never keeps match objects.
    """
    loc = r.location
    if loc is not None and loc.regex is not None:
        m = loc.regex.search(r.uri)
        if m is not None and (isinstance(key, int) or key in m.re.groupindex):
            return _group(m, key)
    server = r.server
    m = server_name_match(server.names, r.host) if server is not None else None
    return _group(m, key) if m is not None else ""


def _group(m: re.Match[str], key: int | str) -> str:
    if isinstance(key, int):
        return (m.group(key) or "") if key <= m.re.groups else ""
    return (m.group(key) or "") if key in m.re.groupindex else ""
