"""From a config file to a :class:`forklb.model.Config`.

Three passes, each with one job:

1. :class:`~forklb.config.parser.Parser` reads files into a directive tree.
2. :func:`check_tree` walks the tree against the directive table (unknown,
   misplaced, wrong arity, duplicate, block or not) and validates every
   block's values with configobj against a configspec generated from the
   table.  The result is a tree of :class:`Block` objects holding converted
   values with defaults filled in.
3. :func:`build` resolves names (upstreams, log formats, host names),
   applies nginx's inheritance (http -> server -> location) and creates the
   immutable model.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from configobj import ConfigObj, flatten_errors

from forklb.config import directives as D
from forklb.config.errors import ConfigError
from forklb.config.parser import Directive, Parser
from forklb.http import next_upstream
from forklb.http import tls as tls_files
from forklb.http.next_upstream import NextUpstream
from forklb.http.routing import pcre_pattern
from forklb.http.variables import Template, UnknownVariable, compile_template
from forklb.model import (
    DEFAULT_SIDECAR_LISTEN,
    RESOLVE_SLOTS,
    AccessLog,
    Balancing,
    Config,
    ErrorPage,
    HealthCheck,
    Http,
    Listen,
    Location,
    LogBuffer,
    LogFormat,
    Main,
    ProxyPass,
    Server,
    Sidecar,
    Tls,
    TryFiles,
    Upstream,
    UpstreamServer,
    show_address,
)

COMBINED = ('$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
            '"$http_referer" "$http_user_agent"')


@dataclass
class Block:
    """One checked block: converted values plus the nested blocks in order."""

    context: str
    values: dict[str, Any]
    explicit: set[str]  # directives written in this block (not defaults)
    where: dict[str, list[Directive]]  # directive name -> its occurrences
    children: list[tuple[Directive, Block]] = field(default_factory=list)
    mime_types: dict[str, str] = field(default_factory=dict)  # for "types" blocks

    def blocks(self, name: str) -> list[tuple[Directive, Block]]:
        return [(d, b) for d, b in self.children if d.name == name]


def load(path: str, prefix: str | None = None, extra: str | None = None) -> Config:
    """Read, check and build the configuration at ``path``.

    ``prefix`` is the directory relative paths in the config resolve against
    (default: the current directory).  ``extra`` holds ``-g`` directives.
    Raises :class:`ConfigError` on any problem.
    """
    prefix = os.path.abspath(prefix or os.getcwd())
    full = path if os.path.isabs(path) else os.path.join(prefix, path)
    parser = Parser(conf_dir=os.path.dirname(full))
    tree = []
    if extra:
        tree.extend(parser.parse_text(extra, "command line"))
    tree.extend(parser.parse_file(full, display=path))
    root = check_tree(tree, D.MAIN)
    return build(root, path, prefix, tuple(parser.files))


# -- pass 2: the directive table and configobj validation ---------------------

_VALIDATOR = D.make_validator()
_CONFIGSPECS: dict[str, ConfigObj] = {}


def _configspec(context: str) -> ConfigObj:
    if context not in _CONFIGSPECS:
        _CONFIGSPECS[context] = ConfigObj(
            D.configspec_for(context), list_values=False, _inspec=True, interpolation=False
        )
    return _CONFIGSPECS[context]


def _table_spec(d: Directive, context: str) -> D.Spec:
    specs = D.specs_named(d.name)
    if not specs:
        raise ConfigError(f'unknown directive "{d.name}"', d.file, d.line)
    allowed = [s for s in specs if context in s.contexts]
    if not allowed:
        raise ConfigError(f'"{d.name}" directive is not allowed here', d.file, d.line)
    s = allowed[0]
    if s.block and d.children is None:
        raise ConfigError(f'directive "{d.name}" has no opening "{{"', d.file, d.line)
    if not s.block and d.children is not None:
        raise ConfigError(f'directive "{d.name}" is not terminated by ";"', d.file, d.line)
    n = len(d.args)
    if n < s.min_args or (s.max_args is not None and n > s.max_args):
        raise ConfigError(f'invalid number of arguments in "{d.name}" directive', d.file, d.line)
    return s


def check_tree(directives: list[Directive], context: str) -> Block:
    """Check ``directives`` (the inside of one ``context`` block) recursively."""
    if context == D.TYPES:
        return _check_types(directives)
    raw: dict[str, Any] = {}
    where: dict[str, list[Directive]] = {}
    block = Block(context, {}, set(), where)
    for d in directives:
        s = _table_spec(d, context)
        if d.name in where and not s.multiple:
            raise ConfigError(f'"{d.name}" directive is duplicate', d.file, d.line)
        where.setdefault(d.name, []).append(d)
        if s.check is not None:
            value = d.args[0].text if s.scalar else list(d.values)
            if s.multiple:
                raw.setdefault(d.name, []).append(value)
            else:
                raw[d.name] = value
        if s.block:
            block.children.append((d, check_tree(list(d.children or ()), s.block)))
    section = ConfigObj(raw, configspec=_configspec(context), interpolation=False)
    result = section.validate(_VALIDATOR, preserve_errors=True)
    if result is not True:
        for _path, key, error in flatten_errors(section, result):
            _raise_value_error(key, error, where)
    block.values = dict(section)
    block.explicit = set(raw)
    return block


def _raise_value_error(key: str, error: Any, where: dict[str, list[Directive]]) -> None:
    occurrences = where.get(key, [])
    index = getattr(error, "index", None) or 0
    d = occurrences[index] if occurrences else None
    file, line = (d.file, d.line) if d else (None, None)
    if isinstance(error, D.DirectiveError):
        raise ConfigError(error.message.replace("{directive}", key), file, line)
    # A configobj built-in check failed: nginx's generic wording.
    arg = " ".join(d.values) if d else ""
    raise ConfigError(f'invalid value "{arg}" in "{key}" directive', file, line)


def _check_types(directives: list[Directive]) -> Block:
    block = Block(D.TYPES, {}, set(), {})
    for d in directives:
        if d.children is not None or not d.args:
            raise ConfigError(f'invalid number of arguments in "{d.name}" directive',
                              d.file, d.line)
        for ext in d.values:
            block.mime_types[ext.lower()] = d.name
    return block


# -- pass 3: names, inheritance, model ---------------------------------------

def _fail(message: str, d: Directive) -> ConfigError:
    return ConfigError(message, d.file, d.line)


Where = dict[str, list[Directive]]  # directive name -> the occurrences a value came from


class _Builder:
    def __init__(self, root: Block, path: str, prefix: str):
        self.root = root
        self.path = path
        self.prefix = prefix
        # named captures of every server_name/location regex: variables, as in nginx
        self.captures: frozenset[str] = _capture_names(root)
        self.log_buffers: dict[str, LogBuffer] = {}  # access log path -> its buffer=...
        self.log_formats: dict[str, LogFormat] = {"combined": self._log_format("combined",
                                                                                 COMBINED, None)}
        self.upstreams: dict[str, Upstream] = {}
        self.upstream_names: dict[str, str] = {}  # lower-case name -> name as declared
        self.default_listens: set[tuple[str, int]] = set()  # addresses with a default server
        # addresses given listen options (backlog=, reuseport): nginx's lsopt.set
        self.listen_options: set[tuple[str, int]] = set()
        self.tls_loaded: set[Tls] = set()  # ssl settings whose files loaded fine
        full = path if os.path.isabs(path) else os.path.join(prefix, path)
        self.conf_dir = os.path.dirname(full)  # nginx's conf prefix: ssl_* files resolve here

    def abs(self, path: str) -> str:
        if path == "stderr" or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.prefix, path))

    def _template(self, text: str, d: Directive | None) -> Template:
        try:
            return compile_template(text, self.captures)
        except UnknownVariable as e:
            raise ConfigError(str(e), d.file if d else None, d.line if d else None) from None

    def _log_format(self, name: str, text: str, d: Directive | None,
                    escape: str = "default") -> LogFormat:
        return LogFormat(name, self._template(text, d), escape)

    def main(self) -> Main:
        v = self.root.values
        events = self.root.blocks("events")
        if not events:
            raise ConfigError('no "events" section in configuration', None)
        ev = events[0][1].values
        error_path, level = v["error_log"]
        return Main(
            worker_processes=v["worker_processes"],
            worker_connections=ev["worker_connections"],
            worker_shutdown_timeout=v["worker_shutdown_timeout"],
            pid=self.abs(v["pid"]),
            error_log=self.abs(error_path),
            error_log_level=level,
            daemon=v["daemon"],
            worker_timeout=v["worker_timeout"],
            user=v["user"],
            worker_rlimit_nofile=v["worker_rlimit_nofile"],
            worker_priority=v["worker_priority"],
            worker_cpu_affinity=v["worker_cpu_affinity"],
        )

    def http(self) -> Http:
        blocks = self.root.blocks("http")
        if not blocks:
            return Http((), MappingProxyType({}), MappingProxyType({}), "text/plain")
        http = blocks[0][1]
        mime: dict[str, str] = {}
        for _d, t in http.blocks("types"):
            mime.update(t.mime_types)
        for d, (name, text, escape) in zip(http.where.get("log_format", []),
                                           http.values["log_format"], strict=True):
            if name in self.log_formats and name != "combined":
                raise _fail(f'duplicate "log_format" name "{name}"', d)
            self.log_formats[name] = self._log_format(name, text, d, escape)
        for d, b in http.blocks("upstream"):
            self.upstream(d, b)
        self.http_access = _access_rules(blocks[0][0], http)
        servers = tuple(self.server(d, b, http.values, http.where)
                        for d, b in http.blocks("server"))
        _check_ssl_listens(servers)
        return Http(servers, MappingProxyType(dict(self.upstreams)), MappingProxyType(mime),
                    http.values["default_type"])

    def sidecar(self, http: Http) -> Sidecar | None:
        blocks = self.root.blocks("sidecar")
        if not blocks:
            return None
        d, block = blocks[0]
        for ld, (*_address, ssl, reuseport) in zip(block.where.get("listen", []),
                                                   block.values["listen"], strict=True):
            if ssl:
                raise _fail('the sidecar does not support the "ssl" parameter', ld)
            if reuseport:  # one process: nothing to spread
                raise _fail('the sidecar does not support the "reuseport" parameter', ld)
        listens = tuple(Listen(h, p, ds, bl) for h, p, ds, bl, *_ in block.values["listen"])
        listens = listens or (DEFAULT_SIDECAR_LISTEN,)
        taken = {lst.address for server in http.servers for lst in server.listens}
        for listen in listens:
            if listen.address in taken:
                raise _fail(f"sidecar listen {listen.host}:{listen.port} is also a server's "
                            "listen address", d)
        token = block.values["admin_token_file"]
        return Sidecar(listens, self.abs(token) if token else None, _access_rules(d, block))

    def upstream(self, d: Directive, b: Block) -> None:
        name = d.args[0].text
        if name.lower() in self.upstream_names:
            raise _fail(f'duplicate upstream "{name}"', d)
        entries = b.values["server"]
        if not entries:
            raise ConfigError("no servers are inside upstream", d.file, d.end_line or d.line)
        balancing = self._balancing(b)
        servers = []
        for sd, (written, host, port, options) in zip(b.where["server"], entries, strict=True):
            if options["backup"] and balancing.method in ("ip_hash", "hash", "random"):
                raise _fail('balancing method does not support parameter "backup"', sd)
            if options["resolve"]:
                # A fixed number of peers whose addresses the sidecar keeps current;
                # the ones resolved now fill the first slots (or none, if it fails).
                try:
                    found = self._resolve(host, port, written, sd)[:RESOLVE_SLOTS]
                except ConfigError:
                    found = []
                for j in range(RESOLVE_SLOTS):
                    spare = j >= len(found)
                    servers.append(UpstreamServer(written, (host, port) if spare else found[j],
                                                  host=host, port=port, spare=spare, **options))
                continue
            for addr in self._resolve(host, port, written, sd):
                servers.append(UpstreamServer(written, addr, host=host, port=port, **options))
        servers.sort(key=lambda server: server.backup)  # primaries first, order kept
        check = b.values["health_check"]
        health = HealthCheck(**check) if check is not None else None
        self.upstreams[name] = Upstream(name, tuple(servers), b.values["keepalive"], balancing,
                                        health)
        self.upstream_names[name.lower()] = name

    def _balancing(self, b: Block) -> Balancing:
        """The upstream's method directive (at most one: nginx warns and keeps the last,
        forklb refuses the ambiguity)."""
        given = [d for m in ("least_conn", "ip_hash", "hash", "random") for d in b.where.get(m, [])]
        if len(given) > 1:
            raise _fail("load balancing method redefined", max(given, key=lambda d: d.line))
        if not given:
            return Balancing()
        d = given[0]
        if d.name == "hash":
            key, consistent = b.values["hash"]
            return Balancing("hash", key=self._template(key, d), consistent=consistent)
        if d.name == "random":
            two, least_conn = b.values["random"]
            return Balancing("random", two=two, least_conn=least_conn)
        return Balancing(d.name)

    def _resolve(self, host: str, port: int, written: str, d: Directive) -> list[tuple[str, int]]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise _fail(f'host not found in upstream "{written}"', d) from None
        out: list[tuple[str, int]] = []
        for info in infos:
            addr = (info[4][0], info[4][1])
            if addr not in out:
                out.append(addr)
        return out

    def _inherit(self, block: Block, parent: dict[str, Any],
                 parent_where: Where) -> tuple[dict[str, Any], Where]:
        """nginx's merge: a value not written at this level comes from the parent.

        Also returns, per directive, the occurrences the value was written at.
        """
        merged, where = dict(block.values), dict(block.where)
        for s in D.specs_in(block.context):
            if s.inherit and s.name not in block.explicit and s.name in parent:
                merged[s.name] = parent[s.name]
                where[s.name] = parent_where.get(s.name, [])
        return merged, where

    def server(self, d: Directive, b: Block, http_values: dict[str, Any],
               http_where: Where) -> Server:
        values, where = self._inherit(b, http_values, http_where)
        listens = self._listens(values["listen"], b.where.get("listen", []))
        names = self._server_names(values["server_name"], b.where.get("server_name", []))
        # allow/deny: a level with rules of its own replaces its parent's list whole.
        server_access = _access_rules(d, b) or self.http_access
        ret = None
        if "return" in b.explicit:
            # A server-level return runs before any location is looked up.
            ret = self._return(values["return"], b.where["return"][0])
        # types: a level with its own types blocks replaces its parent's map whole.
        locations = self._locations(b, values, where, server_access, ret, None, _types(b))
        # Requests no location matches are served at server level, as in nginx.
        fallback = self._location_from("", "", None, values, where, d)
        locations.append(dataclasses.replace(fallback, access=server_access,
                                             return_=ret or fallback.return_,
                                             mime_types=_types(b)))
        named = {loc.pattern: loc for loc in locations if loc.named}
        return Server(listens, names, tuple(locations), values["keepalive_timeout"],
                      values["client_header_timeout"], d.file, d.line, named,
                      tls=self._tls(values, where, d),
                      large_client_header_buffers=values["large_client_header_buffers"])

    def _tls(self, values: dict[str, Any], where: Where, d: Directive) -> Tls | None:
        """The server's ssl_* settings; the certificate and key files are loaded now
        (as nginx does, with or without an ssl listen), so -t and reload refuse bad ones."""
        certs, keys = values["ssl_certificate"], values["ssl_certificate_key"]
        if not certs:
            return None
        written = {name: where.get(name) or [d] for name in
                   ("ssl_certificate", "ssl_certificate_key", "ssl_ciphers")}
        for i, cert in enumerate(certs):
            if i >= len(keys):
                cd = written["ssl_certificate"][min(i, len(written["ssl_certificate"]) - 1)]
                raise _fail(f'no "ssl_certificate_key" is defined for certificate "{cert}"', cd)
        pairs = tuple((self.conf_file(c), self.conf_file(k))
                      for c, k in zip(certs, keys[:len(certs)], strict=True))
        tls = Tls(pairs, tuple(values["ssl_protocols"]), values["ssl_ciphers"],
                  values["ssl_prefer_server_ciphers"])
        if tls not in self.tls_loaded:
            problem = tls_files.load_problem(tls)
            if problem is not None:
                message, name, index = problem
                occurrences = written[name]
                raise _fail(message, occurrences[min(index, len(occurrences) - 1)])
            self.tls_loaded.add(tls)
        return tls

    def conf_file(self, path: str) -> str:
        """A file named in the config (ssl_certificate...), relative to the config's
        directory as nginx's conf prefix."""
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.conf_dir,
                                                                              path))

    def _return(self, value: tuple[int, str | None], d: Directive) -> tuple:
        code, text = value
        return (code, self._template(text, d) if text is not None else None)

    def _listens(self, entries: list[tuple], where: list[Directive]) -> tuple[Listen, ...]:
        """The server's listen addresses, checked as ``ngx_http_add_addresses`` does."""
        if not entries:
            return (Listen("0.0.0.0", 80),)
        listens: list[Listen] = []
        for ld, (host, port, default_server, backlog, ssl, reuseport) in zip(where, entries,
                                                                             strict=True):
            listen = Listen(host, port, default_server, backlog, ssl, reuseport)
            shown = show_address(host, port)
            if any(other.address == listen.address for other in listens):
                raise _fail(f"a duplicate listen {shown}", ld)
            if any(a.text.startswith("backlog=") or a.text == "reuseport" for a in ld.args[1:]):
                if listen.address in self.listen_options:
                    raise _fail(f"duplicate listen options for {shown}", ld)
                self.listen_options.add(listen.address)
            if default_server:
                if listen.address in self.default_listens:
                    raise _fail(f"a duplicate default server for {shown}", ld)
                self.default_listens.add(listen.address)
            listens.append(listen)
        return tuple(listens)

    def _server_names(self, lists: list[list[str]], where: list[Directive]) -> tuple[str, ...]:
        """Every server_name directive's names; host names lower-cased, regexes as written."""
        names: list[str] = []
        for sd, written in zip(where, lists, strict=True):
            for name in written:
                if name.startswith("~"):
                    self._compile(name[1:], re.IGNORECASE, sd)
                    names.append(name)
                else:
                    names.append(name.lower())
        return tuple(names) or ("",)

    @staticmethod
    def _compile(pattern: str, flags: int, d: Directive) -> re.Pattern[str]:
        try:
            return re.compile(pcre_pattern(pattern), flags)
        except re.error as e:
            raise _fail(f'invalid regular expression "{pattern}": {e}', d) from None

    def _locations(self, b: Block, values: dict[str, Any], where: Where, access: tuple,
                   ret: Any, parent: tuple[Directive, str, str] | None,
                   types: Mapping[str, str] | None) -> list[Location]:
        """The locations written in ``b`` (a server or a location block), each with its
        nested ones built first; returned as this level's, then every nested one."""
        self._check_duplicate_locations(values["location"], b.where.get("location", []))
        level: list[Location] = []
        inner: list[Location] = []
        for (ld, lb), (modifier, pattern) in zip(b.blocks("location"), values["location"],
                                                 strict=True):
            if parent is not None:
                _check_nested(ld, modifier, pattern, parent)
            loc_values, loc_where = self._inherit(lb, values, where)
            rules = _access_rules(ld, lb) or access
            loc_types = _types(lb) or types
            below = self._locations(lb, loc_values, loc_where, rules, ret,
                                    (ld, modifier, pattern), loc_types)
            loc = self._location_from(modifier, pattern, lb, loc_values, loc_where, ld)
            level.append(dataclasses.replace(
                loc, access=rules, return_=ret or loc.return_, mime_types=loc_types,
                nested=tuple(below[: len(lb.blocks("location"))])))
            inner += below
        return level + inner

    @staticmethod
    def _check_duplicate_locations(entries: list[tuple[str, str]],
                                   where: list[Directive]) -> None:
        """Two exact, or two prefix (plain or ``^~``), locations may not share a pattern."""
        seen: set[tuple[bool, str]] = set()
        for ld, (modifier, pattern) in zip(where, entries, strict=True):
            if modifier in ("~", "~*"):
                continue
            key = (modifier == "=", pattern)
            if key in seen:
                raise _fail(f'duplicate location "{pattern}"', ld)
            seen.add(key)

    def _location_from(self, modifier: str, pattern: str, b: Block | None,
                       values: dict[str, Any], where: Where, d: Directive) -> Location:
        proxy = ret = None
        if b is not None and "proxy_pass" in b.explicit:
            proxy = self._proxy_pass(values["proxy_pass"], b.where["proxy_pass"][0], modifier)
        if b is not None and "return" in b.explicit:
            ret = self._return(values["return"], b.where["return"][0])
        regex = None
        if modifier in ("~", "~*"):
            regex = self._compile(pattern, re.IGNORECASE if modifier == "~*" else 0, d)
        headers = self._headers(values["proxy_set_header"], where.get("proxy_set_header", []))
        return Location(
            modifier=modifier,
            pattern=pattern,
            proxy=proxy,
            proxy_set_header=headers,
            proxy_connect_timeout=values["proxy_connect_timeout"],
            proxy_read_timeout=values["proxy_read_timeout"],
            proxy_send_timeout=values["proxy_send_timeout"],
            root=self.abs(values["root"]),
            index=tuple(values["index"]),
            keepalive_timeout=values["keepalive_timeout"],
            access_log=self._access_logs(values["access_log"], where.get("access_log", [])),
            default_type=values["default_type"],
            regex=regex,
            return_=ret,
            client_max_body_size=values["client_max_body_size"],
            client_body_timeout=values["client_body_timeout"],
            client_body_min_rate=values["client_body_min_rate"],
            send_timeout=values["send_timeout"],
            keepalive_requests=values["keepalive_requests"],
            proxy_hide_header=tuple(h.lower() for h in values["proxy_hide_header"]),
            proxy_pass_header=tuple(h.lower() for h in values["proxy_pass_header"]),
            next_upstream=_next_upstream(values),
            proxy_http_version=values["proxy_http_version"],
            proxy_splice=values["proxy_splice"],
            file=d.file,
            line=d.line,
            **self._static_settings(pattern, b, values, where),
        )

    def _static_settings(self, pattern: str, b: Block | None, values: dict[str, Any],
                         where: Where) -> dict[str, Any]:
        """alias, try_files, error_page and sendfile of one location (or server level)."""
        alias = None
        if b is not None and "alias" in b.explicit:
            ad = b.where["alias"][0]
            rd = b.where.get("root", [None])[0]
            if rd is not None:
                later, first = (ad, "root") if rd.line <= ad.line else (rd, "alias")
                raise _fail(f'"{later.name}" directive is duplicate, "{first}" directive was '
                            "specified earlier", later)
            if pattern.startswith("@"):
                raise _fail('the "alias" directive cannot be used inside the named location', ad)
            alias = self.abs(values["alias"])
            if values["alias"].endswith("/") and not alias.endswith("/"):
                alias += "/"  # abs() normalises; the slash is part of what replaces the prefix
        try_files = None
        if b is not None and "try_files" in b.explicit:
            try_files = self._try_files(values["try_files"], b.where["try_files"][0])
        elif b is None and values.get("try_files") is not None:
            try_files = self._try_files(values["try_files"], where["try_files"][0])
        return {"alias": alias, "try_files": try_files, "sendfile": values["sendfile"],
                "proxy_intercept_errors": values["proxy_intercept_errors"],
                "error_pages": self._error_pages(values["error_page"],
                                                 where.get("error_page", []))}

    def _try_files(self, names: list[str], d: Directive) -> TryFiles:
        *tries, last = names
        compiled = tuple((self._template(n[:-1] if n.endswith("/") else n, d), n.endswith("/"))
                         for n in tries)
        if last.startswith("="):
            return TryFiles(compiled, None, int(last[1:]))
        return TryFiles(compiled, self._template(last, d))

    def _error_pages(self, entries: list[tuple], where: list[Directive]) -> dict[int, ErrorPage]:
        """code -> page; the first directive naming a code wins, as nginx's lookup."""
        pages: dict[int, ErrorPage] = {}
        for ed, (codes, overwrite, uri) in zip(where, entries, strict=True):
            page = ErrorPage(self._template(uri, ed), overwrite)
            for code in codes:
                pages.setdefault(code, page)
        return pages

    def _headers(self, pairs: list[list[str]],
                 where: list[Directive]) -> tuple[tuple[str, Template], ...]:
        """Compile proxy_set_header values; errors point at the header's own line."""
        return tuple((name, self._template(value, hd))
                     for hd, (name, value) in zip(where, pairs, strict=True))

    def _access_logs(self, entries: list[Any], where: list[Directive]) -> tuple[AccessLog, ...]:
        if not entries:
            return (AccessLog(self.abs("logs/access.log"), self.log_formats["combined"]),)
        logs = []
        for ad, entry in zip(where, entries, strict=True):
            if entry is None:  # access_log off
                return ()
            path, fmt, size, flush, gzip, condition = entry
            if fmt not in self.log_formats:
                raise _fail(f'unknown log format "{fmt}"', ad)
            path = self.abs(path)
            buffer = None
            if size:
                # one buffer per file: every access_log that sets one must agree
                buffer = LogBuffer(size, flush or None, gzip)
                if self.log_buffers.setdefault(path, buffer) != buffer:
                    raise _fail(f'access_log "{entry[0]}" already defined with conflicting '
                                "parameters", ad)
            logs.append(AccessLog(path, self.log_formats[fmt], buffer,
                                  None if condition is None else self._template(condition, ad)))
        return tuple(logs)

    def _proxy_pass(self, value: tuple, d: Directive, modifier: str) -> ProxyPass:
        authority, host, port, uri = value
        if uri is not None and modifier in ("~", "~*"):
            raise _fail('"proxy_pass" cannot have URI part in location given by regular '
                        'expression, or inside named location, or inside "if" statement, or '
                        'inside "limit_except" block', d)
        declared = self.upstream_names.get(host.lower())
        if declared is not None:
            if port is not None:
                raise _fail(f'upstream "{host}" may not have port {port}', d)
            return ProxyPass(declared, host, uri)
        shown_host = f"[{host}]" if ":" in host else host
        # $proxy_host: the host, with the port as written unless it is the default.
        proxy_host = shown_host if port in (None, 80) else authority
        port = port or 80
        name = f"{shown_host}:{port}"
        if name not in self.upstreams:
            addrs = self._resolve(host, port, shown_host, d)
            servers = tuple(UpstreamServer(authority, a) for a in addrs)
            self.upstreams[name] = Upstream(name, servers, keepalive=32)
        return ProxyPass(name, proxy_host, uri)


def build(root: Block, path: str, prefix: str, files: tuple[str, ...]) -> Config:
    """Pass 3: turn checked blocks into the immutable model."""
    b = _Builder(root, path, prefix)
    main = b.main()
    http = b.http()
    return Config(main=main, http=http, path=path, prefix=prefix, files=files,
                  sidecar=b.sidecar(http))


def _check_ssl_listens(servers: tuple[Server, ...]) -> None:
    """Each ssl address's default server needs a certificate (``ngx_http_ssl_init``);
    the others fall back to it when they have none."""
    ssl_addresses = {lst.address for s in servers for lst in s.listens if lst.ssl}
    for address in sorted(ssl_addresses):
        members = [(s, lst) for s in servers for lst in s.listens if lst.address == address]
        default = next((s for s, lst in members if lst.default_server), members[0][0])
        if default.tls is None:
            raise ConfigError('no "ssl_certificate" is defined for the "listen ... ssl" '
                              "directive", default.file, default.line)


def _next_upstream(values: dict[str, Any]) -> NextUpstream:
    """The retry policy: every proxy_next_upstream line of the level that sets them
    adds up (nginx's bitmask slot); none anywhere means ``error timeout``."""
    masks = values["proxy_next_upstream"]
    mask = next_upstream.DEFAULT
    if masks:
        mask = 0
        for m in masks:
            mask |= m
        if mask & next_upstream.OFF:
            mask = next_upstream.OFF
    return NextUpstream(mask, values["proxy_next_upstream_tries"],
                        values["proxy_next_upstream_timeout"])


def _capture_names(root: Block) -> frozenset[str]:
    """The named groups of every regex in ``server_name`` and ``location`` directives."""
    names: set[str] = set()

    def walk(directives) -> None:
        for d in directives or ():
            words = [t.text for t in d.args]
            if d.name == "server_name":
                patterns = [w[1:] for w in words if w.startswith("~")]
            elif d.name == "location" and words:
                joined = "".join(words[:2]) if words[0] in ("~", "~*") else words[0]
                patterns = [joined.lstrip("~*")] if joined.startswith("~") else []
            else:
                patterns = []
            for pattern in patterns:
                try:
                    names.update(re.compile(pcre_pattern(pattern)).groupindex)
                except re.error:
                    pass  # reported with file:line when the regex is compiled
            walk(d.children)

    walk(d for d, _ in root.children)
    return frozenset(names)


def _check_nested(d: Directive, modifier: str, pattern: str,
                  parent: tuple[Directive, str, str]) -> None:
    """nginx's rules for a location inside a location (ngx_http_core_location)."""
    _, parent_modifier, parent_pattern = parent
    if parent_modifier == "=":
        raise _fail(f'location "{pattern}" cannot be inside the exact location '
                    f'"{parent_pattern}"', d)
    if modifier not in ("~", "~*") and not pattern.startswith(parent_pattern):
        raise _fail(f'location "{pattern}" is outside location "{parent_pattern}"', d)


def _access_rules(d: Directive, block: Block) -> tuple:
    """The allow/deny rules written in ``block`` (the inside of ``d``), in order."""
    values = {"allow": iter(block.values["allow"]), "deny": iter(block.values["deny"])}
    return tuple((dd.name == "allow", next(values[dd.name]))
                 for dd in d.children or () if dd.name in values)


def _types(block: Block) -> MappingProxyType | None:
    """The MIME map of ``block``'s own ``types`` blocks, or None when it has none."""
    blocks = block.blocks("types")
    if not blocks:
        return None
    mime: dict[str, str] = {}
    for _d, t in blocks:
        mime.update(t.mime_types)
    return MappingProxyType(mime)
