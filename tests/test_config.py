"""Unit tests of forklb.config.loader and forklb.config.directives.

Config files live in ``tmp_path`` and are loaded as ``nginx.conf`` relative to it,
so error messages read ``... in nginx.conf:L``.  Name resolution is replaced by a
fake resolver (see ``fake_dns``) so no test touches the network.

Messages marked "nginx -t" were compared by hand with Debian's nginx 1.22 on the
same file.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from forklb.config import ConfigError, load, loader
from forklb.config import directives as D
from forklb.model import Config, Listen, Location, LogBuffer, Server

REPO = Path(__file__).resolve().parent.parent
_REAL_GETADDRINFO = socket.getaddrinfo
FAKE_HOSTS = {
    "localhost": ["127.0.0.1"],
    "backend.test": ["10.0.0.1", "10.0.0.2", "10.0.0.1"],  # a repeated address
}


def _fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    if host in FAKE_HOSTS:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in FAKE_HOSTS[host]]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return _REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.socket, "getaddrinfo", _fake_getaddrinfo)


# -- helpers ------------------------------------------------------------------


def load_text(tmp_path: Path, text: str, extra: str | None = None) -> Config:
    (tmp_path / "nginx.conf").write_text(text)
    return load("nginx.conf", prefix=str(tmp_path), extra=extra)


def load_error(tmp_path: Path, text: str, extra: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, extra)
    return info.value


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line of ``text`` containing ``needle`` (-1: the last)."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1] if nth > 0 else hits[nth]


def http(body: str) -> str:
    return "events {}\nhttp {\n" + body + "\n}\n"


def server(body: str, http_body: str = "") -> str:
    return http(http_body + "\nserver {\n" + body + "\n}")


def first_server(tmp_path: Path, body: str, http_body: str = "") -> Server:
    return load_text(tmp_path, server(body, http_body)).http.servers[0]


def location(tmp_path: Path, body: str, server_body: str = "", http_body: str = "") -> Location:
    s = first_server(tmp_path, server_body + "\nlocation / {\n" + body + "\n}", http_body)
    return s.locations[0]


def ctx(**kw) -> SimpleNamespace:
    headers = {k.lower(): v for k, v in kw.pop("headers", {}).items()}
    base = dict(host="example.org", remote_addr="192.0.2.1", proxy_host="backend")
    base.update(kw)
    return SimpleNamespace(header=lambda name: headers.get(name, ""), **base)


def header_values(loc: Location) -> list[tuple[str, str]]:
    return [(name, t.render(ctx())) for name, t in loc.proxy_set_header]


# -- main context and defaults ------------------------------------------------


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "events {}\n")
    main = config.main
    assert main.worker_processes == 1
    assert main.worker_connections == 512
    assert main.worker_shutdown_timeout == 30.0
    assert main.daemon is False
    assert main.error_log_level == "error"


def test_default_paths_are_under_the_prefix(tmp_path: Path) -> None:
    main = load_text(tmp_path, "events {}\n").main
    assert main.error_log == os.path.join(str(tmp_path), "logs", "error.log")
    assert main.pid == os.path.join(str(tmp_path), "logs", "forklb.pid")


def test_config_records_path_prefix_and_files(tmp_path: Path) -> None:
    config = load_text(tmp_path, "events {}\n")
    assert config.path == "nginx.conf"
    assert config.prefix == str(tmp_path)
    assert config.files == (str(tmp_path / "nginx.conf"),)


def test_without_http_block_there_are_no_servers(tmp_path: Path) -> None:
    h = load_text(tmp_path, "events {}\n").http
    assert h.servers == () and dict(h.upstreams) == {} and dict(h.mime_types) == {}
    assert h.default_type == "text/plain"


def test_prefix_defaults_to_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "nginx.conf").write_text("events {}\n")
    monkeypatch.chdir(tmp_path)
    config = load("nginx.conf")
    assert config.prefix == str(tmp_path)
    assert config.main.pid == str(tmp_path / "logs" / "forklb.pid")


def test_absolute_config_path_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "x.conf"
    path.parent.mkdir()
    path.write_text("events {}\n")
    config = load(str(path), prefix="/somewhere/else")
    assert config.files == (str(path),) and config.prefix == "/somewhere/else"


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("4", 4), ("64", 64), ("auto", None)])
def test_worker_processes(tmp_path: Path, value: str, expected: int | None) -> None:
    main = load_text(tmp_path, f"worker_processes {value};\nevents {{}}\n").main
    assert main.worker_processes == expected


def test_worker_connections(tmp_path: Path) -> None:
    main = load_text(tmp_path, "events { worker_connections 1024; }\n").main
    assert main.worker_connections == 1024


@pytest.mark.parametrize(("value", "expected"), [("on", True), ("off", False)])
def test_daemon_flag(tmp_path: Path, value: str, expected: bool) -> None:
    assert load_text(tmp_path, f"daemon {value};\nevents {{}}\n").main.daemon is expected


@pytest.mark.parametrize(("value", "expected"), [("-5", -5), ("+3", 3), ("10", 10), ("0", 0)])
def test_worker_priority(tmp_path: Path, value: str, expected: int) -> None:
    main = load_text(tmp_path, f"worker_priority {value};\nevents {{}}\n").main
    assert main.worker_priority == expected
    assert load_text(tmp_path, "events {}\n").main.worker_priority == 0


def test_worker_shutdown_timeout(tmp_path: Path) -> None:
    main = load_text(tmp_path, "worker_shutdown_timeout 1m5s;\nevents {}\n").main
    assert main.worker_shutdown_timeout == 65.0


@pytest.mark.parametrize(
    ("directive", "path", "level"),
    [
        ("error_log logs/e.log;", "logs/e.log", "error"),
        ("error_log logs/e.log debug;", "logs/e.log", "debug"),
        ("error_log /var/log/x.log warn;", "/var/log/x.log", "warn"),
        ("error_log stderr info;", "stderr", "info"),
    ],
)
def test_error_log(tmp_path: Path, directive: str, path: str, level: str) -> None:
    main = load_text(tmp_path, f"{directive}\nevents {{}}\n").main
    expected = path if path == "stderr" or path.startswith("/") else str(tmp_path / path)
    assert (main.error_log, main.error_log_level) == (expected, level)


@pytest.mark.parametrize(("value", "expected_rel"), [("run/x.pid", "run/x.pid"), ("/x.pid", None)])
def test_pid_path(tmp_path: Path, value: str, expected_rel: str | None) -> None:
    pid = load_text(tmp_path, f"pid {value};\nevents {{}}\n").main.pid
    assert pid == (str(tmp_path / expected_rel) if expected_rel else value)


def test_relative_paths_are_normalised(tmp_path: Path) -> None:
    pid = load_text(tmp_path, "pid ./a/../b.pid;\nevents {}\n").main.pid
    assert pid == str(tmp_path / "b.pid")


# -- servers, listen, server_name ---------------------------------------------


def test_server_defaults(tmp_path: Path) -> None:
    s = first_server(tmp_path, "")
    assert s.listens == (Listen("0.0.0.0", 80),)
    assert s.names == ("",)
    assert s.keepalive_timeout == 75.0
    assert s.file == "nginx.conf" and s.line == 4


def test_server_level_fallback_location_is_last(tmp_path: Path) -> None:
    s = first_server(tmp_path, "location /a { }\nlocation = /b { }")
    assert [(loc.modifier, loc.pattern) for loc in s.locations] == [
        ("", "/a"), ("=", "/b"), ("", ""),
    ]
    assert s.locations[-1].proxy is None


@pytest.mark.parametrize(
    ("args", "host", "port"),
    [
        ("8080", "0.0.0.0", 8080),
        ("127.0.0.1:8081", "127.0.0.1", 8081),
        ("127.0.0.2", "127.0.0.2", 80),
        ("*:8082", "0.0.0.0", 8082),
        ("*", "0.0.0.0", 80),
        ("localhost:8083", "127.0.0.1", 8083),
        ("[::1]:8084", "::1", 8084),
        ("[::]:8085", "::", 8085),
        ("[::1]", "::1", 80),
    ],
)
def test_listen_addresses(tmp_path: Path, args: str, host: str, port: int) -> None:
    (listen,) = first_server(tmp_path, f"listen {args};").listens
    assert (listen.host, listen.port, listen.address) == (host, port, (host, port))


@pytest.mark.parametrize("flag", ["default_server", "default"])
def test_listen_default_server(tmp_path: Path, flag: str) -> None:
    (listen,) = first_server(tmp_path, f"listen 8080 {flag};").listens
    assert listen.default_server is True


def test_listen_backlog(tmp_path: Path) -> None:
    (listen,) = first_server(tmp_path, "listen 8080 backlog=1024 default_server;").listens
    assert (listen.backlog, listen.default_server) == (1024, True)


def test_listen_defaults_not_default_server_backlog_511(tmp_path: Path) -> None:
    (listen,) = first_server(tmp_path, "listen 8080;").listens
    assert (listen.default_server, listen.backlog) == (False, 511)


def test_several_listens_keep_order(tmp_path: Path) -> None:
    s = first_server(tmp_path, "listen 81;\nlisten 127.0.0.1:82;")
    assert [lst.address for lst in s.listens] == [("0.0.0.0", 81), ("127.0.0.1", 82)]


def test_listen_addresses_dedup_first_declaration_wins(tmp_path: Path) -> None:
    text = http("server { listen 81; listen 82; }\nserver { listen 81 default_server; }")
    config = load_text(tmp_path, text)
    assert config.listen_addresses() == (Listen("0.0.0.0", 81), Listen("0.0.0.0", 82))


def test_server_names_are_lower_cased_and_ordered(tmp_path: Path) -> None:
    s = first_server(tmp_path, "server_name Example.COM www.example.com *.Example.org;")
    assert s.names == ("example.com", "www.example.com", "*.example.org")


def test_server_name_regex_is_kept_as_written(tmp_path: Path) -> None:
    s = first_server(tmp_path, r"server_name ~^\S+\.Example\.com$;")
    assert s.names == (r"~^\S+\.Example\.com$",)


def test_repeated_server_name_adds_names(tmp_path: Path) -> None:
    s = first_server(tmp_path, "server_name a.test;\nserver_name b.test;")
    assert s.names == ("a.test", "b.test")


def test_servers_keep_config_order_and_lines(tmp_path: Path) -> None:
    text = http("server { server_name a; }\n\nserver { server_name b; }")
    servers = load_text(tmp_path, text).http.servers
    assert [(s.names, s.line) for s in servers] == [(("a",), 3), (("b",), 5)]


# -- upstreams ----------------------------------------------------------------


UPSTREAM = """
upstream backend {
    server 127.0.0.1:9001 weight=5;
    server 127.0.0.2:9002;
    server 127.0.0.3 weight=2;
}
"""


def test_upstream_servers_weights_and_addresses(tmp_path: Path) -> None:
    up = load_text(tmp_path, http(UPSTREAM)).http.upstreams["backend"]
    assert up.name == "backend"
    assert [(s.name, s.address, s.weight) for s in up.servers] == [
        ("127.0.0.1:9001", ("127.0.0.1", 9001), 5),
        ("127.0.0.2:9002", ("127.0.0.2", 9002), 1),
        ("127.0.0.3", ("127.0.0.3", 80), 2),
    ]


def test_upstream_keepalive_default_and_value(tmp_path: Path) -> None:
    text = http(UPSTREAM + "upstream b2 { server 127.0.0.1:1; keepalive 8; }")
    ups = load_text(tmp_path, text).http.upstreams
    assert (ups["backend"].keepalive, ups["b2"].keepalive) == (32, 8)


def test_upstream_hostname_gives_one_server_per_distinct_address(tmp_path: Path) -> None:
    up = load_text(tmp_path, http("upstream u { server backend.test:8080 weight=3; }"))
    servers = up.http.upstreams["u"].servers
    assert [(s.name, s.address, s.weight) for s in servers] == [
        ("backend.test:8080", ("10.0.0.1", 8080), 3),
        ("backend.test:8080", ("10.0.0.2", 8080), 3),
    ]


def test_upstream_localhost_resolves(tmp_path: Path) -> None:
    up = load_text(tmp_path, http("upstream u { server localhost:9000; }")).http.upstreams["u"]
    assert up.servers[0].address == ("127.0.0.1", 9000)


def test_upstream_ipv6_server(tmp_path: Path) -> None:
    up = load_text(tmp_path, http("upstream u { server [::1]:9000; }")).http.upstreams["u"]
    assert up.servers[0].address == ("::1", 9000)


def test_upstream_may_be_declared_after_its_use(tmp_path: Path) -> None:
    text = http("server { location / { proxy_pass http://late; } }\n"
                "upstream late { server 127.0.0.1:9000; }")
    config = load_text(tmp_path, text)
    assert config.http.servers[0].locations[0].proxy.upstream == "late"
    assert set(config.http.upstreams) == {"late"}


# -- proxy_pass ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "upstream", "proxy_host", "uri"),
    [
        ("http://backend", "backend", "backend", None),
        ("http://backend/", "backend", "backend", "/"),
        ("http://backend/api/v2", "backend", "backend", "/api/v2"),
        ("http://127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000", None),
        ("http://127.0.0.1:9000/x/", "127.0.0.1:9000", "127.0.0.1:9000", "/x/"),
        ("http://127.0.0.1", "127.0.0.1:80", "127.0.0.1", None),
        ("http://127.0.0.1:80", "127.0.0.1:80", "127.0.0.1", None),
        ("http://localhost:8080/", "localhost:8080", "localhost:8080", "/"),
        ("HTTP://127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000", None),
    ],
)
def test_proxy_pass_targets(
    tmp_path: Path, target: str, upstream: str, proxy_host: str, uri: str | None
) -> None:
    loc = location(tmp_path, f"proxy_pass {target};", http_body=UPSTREAM)
    assert (loc.proxy.upstream, loc.proxy.proxy_host, loc.proxy.uri) == (
        upstream, proxy_host, uri,
    )


def test_direct_target_creates_an_implicit_upstream(tmp_path: Path) -> None:
    loc_text = "location / { proxy_pass http://127.0.0.1:9000/app; }"
    ups = load_text(tmp_path, server(loc_text)).http.upstreams
    up = ups["127.0.0.1:9000"]
    assert up.name == "127.0.0.1:9000" and up.keepalive == 32
    assert [(s.name, s.address, s.weight) for s in up.servers] == [
        ("127.0.0.1:9000", ("127.0.0.1", 9000), 1),
    ]


def test_direct_targets_to_one_address_share_an_upstream(tmp_path: Path) -> None:
    text = server("location /a { proxy_pass http://127.0.0.1; }\n"
                  "location /b { proxy_pass http://127.0.0.1:80/b; }")
    config = load_text(tmp_path, text)
    assert list(config.http.upstreams) == ["127.0.0.1:80"]
    locs = config.http.servers[0].locations
    assert locs[0].proxy.upstream == locs[1].proxy.upstream == "127.0.0.1:80"


def test_direct_target_hostname_resolves_every_address(tmp_path: Path) -> None:
    loc = "location / { proxy_pass http://backend.test:81; }"
    up = load_text(tmp_path, server(loc)).http.upstreams["backend.test:81"]
    assert [s.address for s in up.servers] == [("10.0.0.1", 81), ("10.0.0.2", 81)]
    assert {s.name for s in up.servers} == {"backend.test:81"}


def test_location_without_proxy_pass_serves_files(tmp_path: Path) -> None:
    assert location(tmp_path, "root html;").proxy is None


@pytest.mark.parametrize(
    ("target", "proxy_host"), [("http://[::1]:9000", "[::1]:9000"), ("http://[::1]", "[::1]")]
)
def test_proxy_host_of_ipv6_target_keeps_brackets(
    tmp_path: Path, target: str, proxy_host: str
) -> None:
    assert location(tmp_path, f"proxy_pass {target};").proxy.proxy_host == proxy_host


def test_proxy_pass_upstream_name_is_case_insensitive(tmp_path: Path) -> None:
    loc = location(tmp_path, "proxy_pass http://BACKEND;", http_body=UPSTREAM)
    assert loc.proxy.upstream == "backend"
    assert loc.proxy.proxy_host == "BACKEND"  # $proxy_host is the host as written


def test_upstream_names_collide_case_insensitively(tmp_path: Path) -> None:
    text = http("upstream U { server 127.0.0.1; }\nupstream u { server 127.0.0.1; }")
    # nginx -t: duplicate upstream "u" in F:4
    assert str(load_error(tmp_path, text)) == 'duplicate upstream "u" in nginx.conf:4'


def test_proxy_pass_to_an_upstream_may_not_have_a_port(tmp_path: Path) -> None:
    text = server("location / { proxy_pass http://backend:8080; }", UPSTREAM)
    # nginx -t: upstream "backend" may not have port 8080 in F:L (the proxy_pass line)
    assert str(load_error(tmp_path, text)) == (
        f'upstream "backend" may not have port 8080 in nginx.conf:{line_of(text, "proxy_pass")}'
    )


# -- locations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "modifier", "pattern"),
    [("/", "", "/"), ("= /x", "=", "/x"), ("^~ /img/", "^~", "/img/"),
     ("~ \\.php$", "~", "\\.php$"), ("~* \\.PNG$", "~*", "\\.PNG$")],
)
def test_location_modifiers(tmp_path: Path, args: str, modifier: str, pattern: str) -> None:
    loc = first_server(tmp_path, f"location {args} {{ }}").locations[0]
    assert (loc.modifier, loc.pattern) == (modifier, pattern)


def test_regex_location_is_compiled(tmp_path: Path) -> None:
    loc = first_server(tmp_path, "location ~ \\.php$ { }").locations[0]
    assert loc.regex is not None
    assert loc.regex.search("/a/index.php") and not loc.regex.search("/a/index.PHP")


def test_case_insensitive_regex_location(tmp_path: Path) -> None:
    loc = first_server(tmp_path, "location ~* \\.png$ { }").locations[0]
    assert loc.regex is not None and loc.regex.search("/A.PNG")


def test_prefix_location_has_no_regex(tmp_path: Path) -> None:
    assert first_server(tmp_path, "location /x { }").locations[0].regex is None


def test_location_records_its_line(tmp_path: Path) -> None:
    text = server("\n\nlocation /x { }")
    loc = load_text(tmp_path, text).http.servers[0].locations[0]
    assert (loc.file, loc.line) == ("nginx.conf", line_of(text, "location /x"))


@pytest.mark.parametrize(
    ("args", "modifier", "pattern"),
    [("=/x", "=", "/x"), ("~\\.php$", "~", "\\.php$"), ("^~/img/", "^~", "/img/"),
     ("~*\\.png$", "~*", "\\.png$"), ("=", "=", "")],
)
def test_location_modifier_without_space(
    tmp_path: Path, args: str, modifier: str, pattern: str
) -> None:
    loc = first_server(tmp_path, f"location {args} {{ }}").locations[0]
    assert (loc.modifier, loc.pattern) == (modifier, pattern)


# -- inheritance http -> server -> location -----------------------------------


def test_timeouts_default_to_60s(tmp_path: Path) -> None:
    loc = location(tmp_path, "")
    assert (loc.proxy_connect_timeout, loc.proxy_read_timeout, loc.proxy_send_timeout) == (
        60.0, 60.0, 60.0,
    )


def test_keepalive_timeout_defaults_to_75s_everywhere(tmp_path: Path) -> None:
    s = first_server(tmp_path, "location / { }")
    assert s.keepalive_timeout == 75.0
    assert {loc.keepalive_timeout for loc in s.locations} == {75.0}


def test_keepalive_timeout_inherits_http_to_server_to_location(tmp_path: Path) -> None:
    s = first_server(tmp_path, "location / { }", http_body="keepalive_timeout 30s;")
    assert s.keepalive_timeout == 30.0
    assert [loc.keepalive_timeout for loc in s.locations] == [30.0, 30.0]


def test_keepalive_timeout_server_overrides_http(tmp_path: Path) -> None:
    s = first_server(tmp_path, "keepalive_timeout 5;\nlocation / { keepalive_timeout 1; }",
                     http_body="keepalive_timeout 30s;")
    assert s.keepalive_timeout == 5.0
    assert [loc.keepalive_timeout for loc in s.locations] == [1.0, 5.0]


@pytest.mark.parametrize(("value", "expected"), [("75s 60s", 75.0), ("0", 0.0), ("2m", 120.0)])
def test_keepalive_timeout_values(tmp_path: Path, value: str, expected: float) -> None:
    assert first_server(tmp_path, f"keepalive_timeout {value};").keepalive_timeout == expected


def test_proxy_timeouts_inherit_and_override(tmp_path: Path) -> None:
    loc = location(tmp_path, "proxy_read_timeout 1m30s;",
                   server_body="proxy_connect_timeout 500ms;",
                   http_body="proxy_send_timeout 10s; proxy_read_timeout 5s;")
    assert (loc.proxy_connect_timeout, loc.proxy_read_timeout, loc.proxy_send_timeout) == (
        0.5, 90.0, 10.0,
    )


def test_root_defaults_to_html_under_prefix(tmp_path: Path) -> None:
    assert location(tmp_path, "").root == str(tmp_path / "html")


def test_root_inherits_http_to_server_to_location(tmp_path: Path) -> None:
    s = first_server(tmp_path, "location / { }\nlocation /b { root /b; }", http_body="root /srv;")
    assert [loc.root for loc in s.locations] == ["/srv", "/b", "/srv"]


def test_relative_root_is_under_prefix(tmp_path: Path) -> None:
    assert location(tmp_path, "root site/www;").root == str(tmp_path / "site" / "www")


def test_index_default_and_inheritance(tmp_path: Path) -> None:
    s = first_server(tmp_path, "index a.html b.html;\nlocation / { }\nlocation /x { index x; }")
    ab = ("a.html", "b.html")
    assert [loc.index for loc in s.locations] == [ab, ("x",), ab]
    assert location(tmp_path, "").index == ("index.html",)


def test_default_type_default_and_inheritance(tmp_path: Path) -> None:
    config = load_text(tmp_path, server("location / { }\nlocation /j { default_type a/j; }",
                                        "default_type application/octet-stream;"))
    assert config.http.default_type == "application/octet-stream"
    types = [loc.default_type for loc in config.http.servers[0].locations]
    assert types == ["application/octet-stream", "a/j", "application/octet-stream"]
    assert location(tmp_path, "").default_type == "text/plain"


def test_proxy_set_header_inherited_from_http(tmp_path: Path) -> None:
    loc = location(tmp_path, "", http_body="proxy_set_header X-A a;\nproxy_set_header X-B b;")
    assert header_values(loc) == [("X-A", "a"), ("X-B", "b")]


def test_proxy_set_header_server_replaces_http(tmp_path: Path) -> None:
    loc = location(tmp_path, "", server_body="proxy_set_header X-S s;",
                   http_body="proxy_set_header X-A a;")
    assert header_values(loc) == [("X-S", "s")]


def test_location_proxy_set_header_replaces_inherited_list_entirely(tmp_path: Path) -> None:
    loc = location(tmp_path, "proxy_set_header X-L l;", server_body="proxy_set_header X-S s;",
                   http_body="proxy_set_header X-A a;\nproxy_set_header X-B b;")
    assert header_values(loc) == [("X-L", "l")]


def test_server_fallback_location_gets_server_headers(tmp_path: Path) -> None:
    s = first_server(tmp_path, "proxy_set_header X-S s;\nlocation / { proxy_set_header X-L l; }")
    assert header_values(s.locations[-1]) == [("X-S", "s")]


def test_no_proxy_set_header_by_default(tmp_path: Path) -> None:
    assert location(tmp_path, "").proxy_set_header == ()


def test_proxy_set_header_values_are_templates(tmp_path: Path) -> None:
    loc = location(tmp_path, 'proxy_set_header Host $proxy_host;\n'
                             'proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n'
                             'proxy_set_header X-Mix "${host}:$remote_addr";')
    r = ctx(headers={"X-Forwarded-For": "10.1.1.1"})
    assert [(n, t.render(r)) for n, t in loc.proxy_set_header] == [
        ("Host", "backend"),
        ("X-Forwarded-For", "10.1.1.1, 192.0.2.1"),
        ("X-Mix", "example.org:192.0.2.1"),
    ]


def test_proxy_set_header_empty_value(tmp_path: Path) -> None:
    loc = location(tmp_path, 'proxy_set_header Accept-Encoding "";')
    (name, template), = loc.proxy_set_header
    assert (name, template.render(ctx()), template.is_literal) == ("Accept-Encoding", "", True)


# -- access_log and log_format --------------------------------------------------


def test_access_log_default_is_combined_under_prefix(tmp_path: Path) -> None:
    (log,) = location(tmp_path, "").access_log
    assert log.path == str(tmp_path / "logs" / "access.log")
    assert log.format.name == "combined"
    assert log.format.template.source == loader.COMBINED


def test_combined_format_is_nginx_combined() -> None:
    assert loader.COMBINED == (
        '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
        '"$http_referer" "$http_user_agent"'
    )


def test_access_log_with_custom_format(tmp_path: Path) -> None:
    http_body = "log_format main '$remote_addr $host' ' $status';\n"
    (log,) = location(tmp_path, "access_log /var/log/a.log main;", http_body=http_body).access_log
    assert (log.path, log.format.name) == ("/var/log/a.log", "main")
    assert log.format.template.source == "$remote_addr $host $status"
    r = ctx(status=200)
    assert log.format.template.render(r) == "192.0.2.1 example.org 200"


def test_log_format_escape_parameter_is_skipped(tmp_path: Path) -> None:
    http_body = "log_format j escape=json '{\"a\":\"$host\"}';\n"
    (log,) = location(tmp_path, "access_log x.log j;", http_body=http_body).access_log
    assert log.format.template.source == '{"a":"$host"}'


def test_access_log_off(tmp_path: Path) -> None:
    assert location(tmp_path, "access_log off;").access_log == ()


def test_access_log_off_is_inherited(tmp_path: Path) -> None:
    s = first_server(tmp_path, "location / { }\nlocation /on { access_log on.log; }",
                     http_body="access_log off;")
    assert [len(loc.access_log) for loc in s.locations] == [0, 1, 0]


def test_access_log_inherited_from_http(tmp_path: Path) -> None:
    s = first_server(tmp_path, "location / { }", http_body="access_log logs/h.log;")
    assert {loc.access_log[0].path for loc in s.locations} == {str(tmp_path / "logs" / "h.log")}


def test_several_access_logs(tmp_path: Path) -> None:
    logs = location(tmp_path, "access_log a.log;\naccess_log b.log combined;").access_log
    assert [(lg.path, lg.format.name) for lg in logs] == [
        (str(tmp_path / "a.log"), "combined"), (str(tmp_path / "b.log"), "combined"),
    ]


def test_log_format_may_follow_access_log(tmp_path: Path) -> None:
    text = http("access_log x.log late;\nlog_format late '$host';\nserver { }")
    loc = load_text(tmp_path, text).http.servers[0].locations[0]
    assert loc.access_log[0].format.name == "late"


def test_access_log_without_buffer_parameters_has_none(tmp_path: Path) -> None:
    (log,) = location(tmp_path, "access_log a.log;").access_log
    assert (log.buffer, log.condition) == (None, None)


@pytest.mark.parametrize(
    ("params", "buffer"),
    [
        ("buffer=32k", LogBuffer(32 * 1024, None, 0)),
        ("buffer=4096 flush=5m", LogBuffer(4096, 300.0, 0)),
        ("buffer=1m flush=500ms", LogBuffer(1024 * 1024, 0.5, 0)),
        ("gzip", LogBuffer(64 * 1024, None, 1)),  # nginx: 64K and level 1
        ("gzip=9 flush=1s", LogBuffer(64 * 1024, 1.0, 9)),
        ("buffer=8k gzip=5", LogBuffer(8192, None, 5)),
        ("gzip buffer=8k", LogBuffer(8192, None, 1)),  # a later buffer= wins
    ],
)
def test_access_log_buffer_parameters(tmp_path: Path, params: str, buffer: LogBuffer) -> None:
    (log,) = location(tmp_path, f"access_log a.log combined {params};").access_log
    assert log.buffer == buffer


def test_access_log_condition_is_a_template(tmp_path: Path) -> None:
    (log,) = location(tmp_path, "access_log a.log combined if=$arg_log;").access_log
    assert log.condition is not None
    assert log.condition.render(ctx(args="log=1")) == "1"


@pytest.mark.parametrize(
    ("directive", "message"),
    [
        ("access_log a.log combined buffer=0;", 'invalid buffer size "0"'),
        ("access_log a.log combined buffer=12q;", 'invalid buffer size "12q"'),
        ("access_log a.log combined buffer=4k flush=0;", 'invalid flush time "0"'),
        ("access_log a.log combined buffer=4k flush=x;", 'invalid flush time "x"'),
        ("access_log a.log combined gzip=0;", 'invalid compression level "0"'),
        ("access_log a.log combined gzip=10;", 'invalid compression level "10"'),
        ("access_log a.log combined gzip=+1;", 'invalid compression level "+1"'),
        ("access_log a.log combined gzipx;", 'invalid parameter "gzipx"'),
        ("access_log a.log combined buffer;", 'invalid parameter "buffer"'),
        ("access_log a.log combined mode=0600;", 'invalid parameter "mode=0600"'),
        ("access_log a.log combined flush=1s;", 'no buffer is defined for access_log "a.log"'),
        ("access_log off combined;", 'invalid parameter "combined"'),
        # parameters come after a format, as in nginx
        ("access_log a.log buffer=4k;", 'unknown log format "buffer=4k"'),
        ("access_log a.log combined if=$nosuch;", 'unknown "nosuch" variable'),
    ],
)
def test_access_log_parameter_errors(tmp_path: Path, directive: str, message: str) -> None:
    text = server(f"location / {{\n{directive}\n}}")
    assert str(load_error(tmp_path, text)) == f"{message} in nginx.conf:{line_of(text, directive)}"


def test_access_log_buffers_must_agree_for_one_file(tmp_path: Path) -> None:
    text = server("location / { access_log a.log combined buffer=4k; }\n"
                  "location /b { access_log a.log combined buffer=8k; }")
    assert str(load_error(tmp_path, text)) == (
        'access_log "a.log" already defined with conflicting parameters in nginx.conf:'
        f'{line_of(text, "buffer=8k")}')
    # the same parameters, or none, share the one buffer
    same = server("location / { access_log a.log combined buffer=4k flush=2s; }\n"
                  "location /b { access_log a.log combined buffer=4k flush=2s; }\n"
                  "location /c { access_log a.log; }")
    locations = load_text(tmp_path, same).http.servers[0].locations
    assert [(loc.pattern, loc.access_log[0].buffer) for loc in locations[:3]] == [
        ("/", LogBuffer(4096, 2.0)), ("/b", LogBuffer(4096, 2.0)), ("/c", None)]


# -- MIME types -----------------------------------------------------------------


def test_types_block(tmp_path: Path) -> None:
    text = http("types {\n  text/html html htm;\n  image/PNG PNG;\n  text/plain html;\n}")
    mime = load_text(tmp_path, text).http.mime_types
    # extensions are lower-cased; a later type for an extension wins (as in nginx).
    assert dict(mime) == {"html": "text/plain", "htm": "text/html", "png": "image/PNG"}


def test_include_mime_types_file(tmp_path: Path) -> None:
    (tmp_path / "mime.types").write_text(
        "types {\n    text/css css;\n    application/javascript js mjs;\n}\n")
    mime = load_text(tmp_path, http("include mime.types;\ndefault_type a/b;")).http.mime_types
    assert dict(mime) == {"css": "text/css", "js": "application/javascript",
                          "mjs": "application/javascript"}


@pytest.mark.skipif(not (REPO / "conf" / "mime.types").exists(),
                    reason="conf/mime.types is not in the repository yet")
def test_repo_mime_types_loads(tmp_path: Path) -> None:
    (tmp_path / "mime.types").write_text((REPO / "conf" / "mime.types").read_text())
    mime = load_text(tmp_path, http("include mime.types;")).http.mime_types
    assert mime["html"] == "text/html" and mime["css"] == "text/css"


def test_two_types_blocks_are_merged(tmp_path: Path) -> None:
    (tmp_path / "mime.types").write_text("types { text/css css; }\n")
    text = http("include mime.types;\ntypes { text/x-foo foo; }")
    assert dict(load_text(tmp_path, text).http.mime_types) == {
        "css": "text/css", "foo": "text/x-foo",
    }


# -- include and -g ---------------------------------------------------------------


def test_included_files_are_recorded(tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "a.conf").write_text("server { server_name a; }\n")
    (tmp_path / "sites" / "b.conf").write_text("server { server_name b; }\n")
    config = load_text(tmp_path, http("include sites/*.conf;"))
    assert [s.names for s in config.http.servers] == [("a",), ("b",)]
    assert config.files == (
        str(tmp_path / "nginx.conf"), str(tmp_path / "sites" / "a.conf"),
        str(tmp_path / "sites" / "b.conf"),
    )


def test_extra_directives_apply(tmp_path: Path) -> None:
    main = load_text(tmp_path, "events {}\n", extra="daemon on; worker_processes 3;").main
    assert (main.daemon, main.worker_processes) == (True, 3)


# -- error messages -------------------------------------------------------------


def test_unknown_directive(tmp_path: Path) -> None:
    text = server("listen 80;\nlocaton / { }")
    err = load_error(tmp_path, text)
    # nginx -t: unknown directive "locaton" in F:L
    assert str(err) == f'unknown directive "locaton" in nginx.conf:{line_of(text, "locaton")}'


def test_unknown_directive_at_top_level(tmp_path: Path) -> None:
    assert str(load_error(tmp_path, "events {}\nfoo bar;\n")) == (
        'unknown directive "foo" in nginx.conf:2'
    )


@pytest.mark.parametrize(
    ("text", "name", "needle"),
    [
        (server("proxy_pass http://127.0.0.1;"), "proxy_pass", "proxy_pass"),
        (http("listen 80;"), "listen", "listen"),
        ("events {}\nworker_connections 10;\n", "worker_connections", "worker_connections"),
        ("events { worker_processes 2; }\n", "worker_processes", "worker_processes"),
        (http("location /a { }"), "location", "location /a"),
        ("proxy_read_timeout 5s;\nevents {}\n", "proxy_read_timeout", "proxy_read"),
        (http("keepalive 4;"), "keepalive", "keepalive"),
        (http("upstream u { server 127.0.0.1; listen 80; }"), "listen", "listen"),
        ("server { }\nevents {}\n", "server", "server"),
        (server("upstream u { server 127.0.0.1; }"), "upstream", "upstream"),
    ],
)
def test_directive_not_allowed_here(tmp_path: Path, text: str, name: str, needle: str) -> None:
    err = load_error(tmp_path, text)
    line = line_of(text, needle)
    assert str(err) == f'"{name}" directive is not allowed here in nginx.conf:{line}'


@pytest.mark.parametrize(
    ("text", "name", "needle"),
    [
        (server("listen;"), "listen", "listen"),
        ("worker_processes 1 2;\nevents {}\n", "worker_processes", "worker_processes"),
        ("daemon;\nevents {}\n", "daemon", "daemon"),
        ("events x {}\n", "events", "events"),
        (http("server foo { }"), "server", "server foo"),
        (server("location { }"), "location", "location"),
        (server("location = /a /b { }"), "location", "location"),
        (server("proxy_set_header X-A;"), "proxy_set_header", "proxy_set_header"),
        (server("location / { proxy_pass a b; }"), "proxy_pass", "proxy_pass"),
        (http("upstream { server 127.0.0.1; }"), "upstream", "upstream"),
        (http("upstream u { server; }"), "server", "server;"),
        (http("log_format main;"), "log_format", "log_format"),
        (http("access_log;"), "access_log", "access_log"),
        (server("server_name;"), "server_name", "server_name"),
        ("error_log a b c;\nevents {}\n", "error_log", "error_log"),
    ],
)
def test_invalid_number_of_arguments(tmp_path: Path, text: str, name: str, needle: str) -> None:
    err = load_error(tmp_path, text)
    assert str(err) == (
        f'invalid number of arguments in "{name}" directive in nginx.conf:{line_of(text, needle)}'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("events;\n", 'directive "events" has no opening "{"'),
        (http("server;"), 'directive "server" has no opening "{"'),
        ("events {}\ndaemon off { }\n", 'directive "daemon" is not terminated by ";"'),
        ("events {}\ninclude x.conf { }\n", 'directive "include" is not terminated by ";"'),
    ],
)
def test_block_or_not(tmp_path: Path, text: str, message: str) -> None:
    assert load_error(tmp_path, text).message == message


def test_unexpected_end_of_file(tmp_path: Path) -> None:
    text = "events {}\nhttp {\n  server {\n"
    # nginx -t: unexpected end of file, expecting "}" in F:4
    assert str(load_error(tmp_path, text)) == (
        'unexpected end of file, expecting "}" in nginx.conf:4'
    )


def test_no_events_section(tmp_path: Path) -> None:
    err = load_error(tmp_path, "http { }\n")
    assert str(err) == 'no "events" section in configuration' and err.file is None


def test_missing_main_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load("missing.conf", prefix=str(tmp_path))
    missing = tmp_path / "missing.conf"
    assert str(info.value) == f'open() "{missing}" failed (2: No such file or directory)'


def test_missing_include_file(tmp_path: Path) -> None:
    text = http("include missing.conf;")
    assert str(load_error(tmp_path, text)) == (
        f'open() "{tmp_path / "missing.conf"}" failed (2: No such file or directory) '
        f'in nginx.conf:{line_of(text, "include")}'
    )


def test_error_in_included_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "bad.conf").write_text("server {\n  listen 80;\n  locaton / {}\n}\n")
    err = load_error(tmp_path, http("include inc/*.conf;"))
    # nginx -t: unknown directive "locaton" in /.../inc/bad.conf:3
    assert str(err) == f'unknown directive "locaton" in {tmp_path / "inc" / "bad.conf"}:3'


@pytest.mark.parametrize(
    ("text", "host"),
    [
        (http("upstream u {\n  server x.invalid;\n}"), "x.invalid"),
        (http("upstream u {\n  server x.invalid:9000 weight=2;\n}"), "x.invalid:9000"),
        (server("location / {\n  proxy_pass http://x.invalid;\n}"), "x.invalid"),
        (server("location / {\n  proxy_pass http://x.invalid/a/;\n}"), "x.invalid"),
    ],
)
def test_host_not_found_in_upstream(tmp_path: Path, text: str, host: str) -> None:
    err = load_error(tmp_path, text)
    line = line_of(text, "x.invalid")
    assert str(err) == f'host not found in upstream "{host}" in nginx.conf:{line}'


def test_host_not_found_in_proxy_pass_with_port_names_the_host(tmp_path: Path) -> None:
    text = server("location / { proxy_pass http://x.invalid:9000; }")
    assert load_error(tmp_path, text).message == 'host not found in upstream "x.invalid"'


def test_unknown_log_format(tmp_path: Path) -> None:
    text = server("access_log logs/a.log main;")
    # nginx -t: unknown log format "main" in F:L (the access_log line)
    assert str(load_error(tmp_path, text)) == (
        f'unknown log format "main" in nginx.conf:{line_of(text, "access_log")}'
    )


def test_unknown_log_format_in_http_points_at_access_log(tmp_path: Path) -> None:
    text = server("location / { }", http_body="\naccess_log x.log nope;\n")
    err = load_error(tmp_path, text)
    assert (err.message, err.line) == ('unknown log format "nope"', line_of(text, "nope"))


@pytest.mark.parametrize(
    ("text", "name", "needle"),
    [
        ("worker_processes 1;\nworker_processes 2;\nevents {}\n", "worker_processes",
         "worker_processes 2"),
        ("events {}\ndaemon on;\ndaemon off;\n", "daemon", "daemon off"),
        ("events {}\npid a;\npid b;\n", "pid", "pid b"),
        ("events {}\nevents {}\n", "events", "events"),
        ("events {}\nhttp {}\nhttp {}\n", "http", "http {}"),
        ("events { worker_connections 1;\n worker_connections 2; }\n", "worker_connections",
         "worker_connections 2"),
        (http("keepalive_timeout 1;\nkeepalive_timeout 2;"), "keepalive_timeout",
         "keepalive_timeout 2"),
        (server("root a;\nroot b;"), "root", "root b"),
        (server("location / {\nproxy_pass http://127.0.0.1;\nproxy_pass http://127.0.0.2;\n}"),
         "proxy_pass", "127.0.0.2"),
        (http("upstream u { server 127.0.0.1;\nkeepalive 1;\nkeepalive 2; }"), "keepalive",
         "keepalive 2"),
        (http("default_type a/b;\ndefault_type c/d;"), "default_type", "c/d"),
    ],
)
def test_directive_is_duplicate(tmp_path: Path, text: str, name: str, needle: str) -> None:
    assert str(load_error(tmp_path, text)) == (
        f'"{name}" directive is duplicate in nginx.conf:{line_of(text, needle, -1)}'
    )


@pytest.mark.parametrize("value", ["maybe", "yes", "1", "of"])
def test_invalid_flag(tmp_path: Path, value: str) -> None:
    # nginx -t: invalid value "maybe" in "daemon" directive, it must be "on" or "off" in F:2
    assert str(load_error(tmp_path, f"events {{}}\ndaemon {value};\n")) == (
        f'invalid value "{value}" in "daemon" directive, it must be "on" or "off" in nginx.conf:2'
    )


def test_flag_is_case_insensitive(tmp_path: Path) -> None:
    assert load_text(tmp_path, "events {}\ndaemon ON;\n").main.daemon is True


@pytest.mark.parametrize(
    ("param", "needle"),
    [("foo", "foo"), ("weight=0", "weight=0"), ("weight=x", "weight=x"), ("weight", "weight"),
     ("weight=", "weight="), ("weight=-1", "weight=-1")],
)
def test_invalid_upstream_server_parameter(tmp_path: Path, param: str, needle: str) -> None:
    text = http(f"upstream u {{\n  server 127.0.0.1:9000;\n  server 127.0.0.2 {param};\n}}")
    # nginx -t: invalid parameter "foo" in F:L
    assert str(load_error(tmp_path, text)) == (
        f'invalid parameter "{needle}" in nginx.conf:{line_of(text, "127.0.0.2")}'
    )


@pytest.mark.parametrize("param", ["foo", "443", "ssl_whatever"])
def test_invalid_listen_parameter(tmp_path: Path, param: str) -> None:
    text = server(f"listen 80;\nlisten 81 {param};")
    assert str(load_error(tmp_path, text)) == (
        f'invalid parameter "{param}" in nginx.conf:{line_of(text, "listen 81")}'
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (server("location / {\nproxy_set_header X-A $foo;\n}"), "$foo"),
        (server("location / {\nproxy_set_header X-A ${foo}bar;\n}"), "${foo}"),
        (http("log_format main '$remote_addr $foo';\nserver { }"), "$foo"),
        (server("location / {\nproxy_set_header X-A x;\nproxy_set_header X-B $foo;\n}"),
         "$foo"),
    ],
)
def test_unknown_variable(tmp_path: Path, text: str, needle: str) -> None:
    # nginx -t prints: unknown "foo" variable (forklb adds where it is written)
    assert str(load_error(tmp_path, text)) == (
        f'unknown "foo" variable in nginx.conf:{line_of(text, needle)}'
    )


@pytest.mark.parametrize(
    "text",
    [
        server("location / { }", http_body="\nproxy_set_header X $foo;\n"),
        server("proxy_set_header X-A x;\nproxy_set_header X-B $foo;"),
    ],
)
def test_unknown_variable_in_outer_header_points_at_the_header(
    tmp_path: Path, text: str
) -> None:
    assert load_error(tmp_path, text).line == line_of(text, "$foo")


def test_regex_location_proxy_pass_with_uri(tmp_path: Path) -> None:
    text = server("location ~ \\.php$ {\n  proxy_pass http://127.0.0.1:9000/x;\n}")
    # nginx -t wording, line of the proxy_pass directive
    assert str(load_error(tmp_path, text)) == (
        '"proxy_pass" cannot have URI part in location given by regular expression, or inside '
        'named location, or inside "if" statement, or inside "limit_except" block in '
        f'nginx.conf:{line_of(text, "proxy_pass")}'
    )


@pytest.mark.parametrize("modifier", ["~", "~*"])
@pytest.mark.parametrize("target", ["http://127.0.0.1:9000/", "http://backend/x"])
def test_regex_location_rejects_any_uri_part(tmp_path: Path, modifier: str, target: str) -> None:
    text = server(f"location {modifier} ^/a {{ proxy_pass {target}; }}", UPSTREAM)
    assert load_error(tmp_path, text).message.startswith('"proxy_pass" cannot have URI part')


@pytest.mark.parametrize("modifier", ["~", "~*"])
def test_regex_location_accepts_proxy_pass_without_uri(tmp_path: Path, modifier: str) -> None:
    text = server(f"location {modifier} ^/a {{ proxy_pass http://127.0.0.1:9000; }}")
    loc = load_text(tmp_path, text).http.servers[0].locations[0]
    assert loc.proxy.uri is None and loc.modifier == modifier


@pytest.mark.parametrize("modifier", ["=", "^~"])
def test_non_regex_location_accepts_uri_part(tmp_path: Path, modifier: str) -> None:
    text = server(f"location {modifier} /a {{ proxy_pass http://127.0.0.1:9000/b; }}")
    assert load_text(tmp_path, text).http.servers[0].locations[0].proxy.uri == "/b"


TWO_DEFAULT_SERVERS = """server {
  listen 80 default_server;
}
server {
  listen 80 default_server;
}"""


def test_duplicate_default_server(tmp_path: Path) -> None:
    text = http(TWO_DEFAULT_SERVERS)
    err = load_error(tmp_path, text)
    assert err.message == "a duplicate default server for 0.0.0.0:80"
    assert err.file == "nginx.conf"


def test_default_server_on_different_ports_is_fine(tmp_path: Path) -> None:
    text = http("server { listen 80 default_server; }\nserver { listen 81 default_server; }")
    servers = load_text(tmp_path, text).http.servers
    assert [s.listens[0].default_server for s in servers] == [True, True]


def test_duplicate_default_server_wildcard_spellings_collide(tmp_path: Path) -> None:
    text = http("server { listen 8080 default; }\nserver { listen *:8080 default_server; }")
    assert load_error(tmp_path, text).message == "a duplicate default server for 0.0.0.0:8080"


def test_duplicate_default_server_points_at_the_listen_line(tmp_path: Path) -> None:
    text = http(TWO_DEFAULT_SERVERS)
    assert load_error(tmp_path, text).line == line_of(text, "listen", 2)


def test_duplicate_default_server_ipv6_message(tmp_path: Path) -> None:
    text = http("server { listen [::]:80 default_server; }\n"
                "server { listen [::]:80 default_server; }")
    assert load_error(tmp_path, text).message == "a duplicate default server for [::]:80"


def test_duplicate_listen_in_one_server(tmp_path: Path) -> None:
    err = load_error(tmp_path, server("listen 80;\nlisten 80;"))
    assert err.message == "a duplicate listen 0.0.0.0:80"


def test_duplicate_location(tmp_path: Path) -> None:
    err = load_error(tmp_path, server("location / { }\nlocation / { }"))
    assert err.message == 'duplicate location "/"'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # nginx -t: ^~ and plain prefixes collide, at the later location's line
        ("location ^~ /a { }\nlocation /a { }", 'duplicate location "/a"'),
        ("location = / { }\nlocation / { }\nlocation =/ { }", 'duplicate location "/"'),
        # nginx -t accepts these
        ("location = /a { }\nlocation /a { }", None),
        ("location ~ /a { }\nlocation ~ /a { }", None),
        ("location ~* /a { }\nlocation ~ /a { }", None),
    ],
)
def test_duplicate_location_kinds(tmp_path: Path, body: str, message: str | None) -> None:
    text = server(body)
    if message is None:
        load_text(tmp_path, text)
    else:
        err = load_error(tmp_path, text)
        assert (err.message, err.line) == (message, len(text.splitlines()) - 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # ngx_http_add_addresses' order: same server, then options, then default server
        (server("listen 80 default_server;\nlisten 80 default_server;"),
         "a duplicate listen 0.0.0.0:80"),
        (http("server { listen 80 backlog=1; }\nserver { listen 80 backlog=2; }"),
         "duplicate listen options for 0.0.0.0:80"),
        (http("server { listen [::]:80; listen [::]:80; }"), "a duplicate listen [::]:80"),
    ],
)
def test_listen_conflicts(tmp_path: Path, text: str, message: str) -> None:
    assert load_error(tmp_path, text).message == message


def test_listen_options_once_per_address_is_fine(tmp_path: Path) -> None:
    text = http("server { listen 80 backlog=1; }\nserver { listen 80; }")
    assert load_text(tmp_path, text).listen_addresses() == (Listen("0.0.0.0", 80, False, 1),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (http("upstream u { server 127.0.0.1; }\nupstream u { server 127.0.0.2; }"),
         'duplicate upstream "u"'),
        (http("upstream u { }"), "no servers are inside upstream"),
        (http("upstream u { keepalive 4; }"), "no servers are inside upstream"),
        (http("log_format a x;\nlog_format a y;"), 'duplicate "log_format" name "a"'),
        (server("location / /x { }"), 'invalid location modifier "/"'),
        ("error_log logs/e.log verbose;\nevents {}\n", 'invalid log level "verbose"'),
        (server("listen foo.invalid:80;"),
         'host not found in "foo.invalid:80" of the "listen" directive'),
        (http("upstream u { server :80; }"), 'no host in upstream ":80"'),
        (http("upstream u { server unix:/tmp/x.sock; }"),
         'unix socket upstream "unix:/tmp/x.sock" is not supported'),
        (server("location / { proxy_pass https://127.0.0.1; }"),
         "https upstreams are not supported yet"),
    ],
)
def test_other_errors(tmp_path: Path, text: str, message: str) -> None:
    err = load_error(tmp_path, text)
    assert err.message == message and err.file == "nginx.conf"


def test_invalid_regex_location(tmp_path: Path) -> None:
    text = server("location ~ ( { }")
    err = load_error(tmp_path, text)
    assert err.message.startswith('invalid regular expression "("')
    assert err.line == line_of(text, "location")


def test_value_error_points_at_the_bad_occurrence(tmp_path: Path) -> None:
    text = server("listen 80;\nlisten 81;\nlisten 82 bogus;\nlisten 83;")
    assert load_error(tmp_path, text).line == line_of(text, "bogus")


def test_configobj_type_error_is_reported(tmp_path: Path) -> None:
    err = load_error(tmp_path, "events {\n worker_connections abc; }\n")
    assert 'invalid' in err.message and '"abc"' in err.message
    assert (err.file, err.line) == ("nginx.conf", 2)


def test_configobj_range_error_is_reported(tmp_path: Path) -> None:
    err = load_error(tmp_path, http("upstream u { server 127.0.0.1;\nkeepalive -1; }"))
    assert err.message.startswith('invalid value "-1" in "keepalive" directive')
    assert err.line == 4


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (server("listen 70000;"), '"70000"'),
        (server("listen 127.0.0.1:0;"), '"127.0.0.1:0"'),
        (server("listen [::1;"), '"[::1"'),
        (server("location / { proxy_pass ftp://x; }"), "invalid URL prefix"),
        (server("location / { proxy_pass http://; }"), "no host"),
        (server("location / { proxy_pass http://127.0.0.1:0; }"), '"127.0.0.1:0'),
    ],
)
def test_bad_addresses_are_rejected(tmp_path: Path, text: str, fragment: str) -> None:
    err = load_error(tmp_path, text)
    assert fragment in err.message and err.line == 5


@pytest.mark.parametrize(
    "directive", ["proxy_read_timeout abc", "proxy_read_timeout 10x", "keepalive_timeout s"]
)
def test_invalid_time_value(tmp_path: Path, directive: str) -> None:
    name, value = directive.split()
    err = load_error(tmp_path, http(f"\n{directive};"))
    assert err.message.startswith(f'"{name}" directive invalid value')
    assert err.line == 4


# nginx -t's exact wording for other bad values, checked by hand.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (http("proxy_read_timeout abc;"), '"proxy_read_timeout" directive invalid value'),
        ("worker_processes abc;\nevents {}\n", '"worker_processes" directive invalid value'),
        ("events { worker_connections abc; }\n", 'invalid number "abc"'),
        ("events { worker_connections -1; }\n", 'invalid number "-1"'),
        ("worker_priority x;\nevents {}\n", '"worker_priority" directive invalid number'),
        ("worker_priority -;\nevents {}\n", '"worker_priority" directive invalid number'),
        (http("upstream u { server 127.0.0.1; keepalive -1; }"),
         'invalid value "-1" in "keepalive" directive'),
        (server("listen 70000;"), 'invalid port in "70000" of the "listen" directive'),
        (server("listen [::1;"), 'invalid host in "[::1" of the "listen" directive'),
        (server("location / { proxy_pass http://127.0.0.1:abc; }"),
         'invalid port in upstream "127.0.0.1:abc"'),
        (server("location / { proxy_pass http://; }"), 'no host in upstream ""'),
        (server("location / { proxy_pass ftp://x; }"), "invalid URL prefix"),
        (server("listen 80 backlog=0;"), 'invalid backlog "backlog=0"'),
        (server("listen 80 backlog=-1;"), 'invalid backlog "backlog=-1"'),
        (server("listen 80 backlog=x;"), 'invalid backlog "backlog=x"'),
        (http("upstream u { server 127.0.0.1 foo; }"), 'invalid parameter "foo"'),
        (server("listen 80 443;"), 'invalid parameter "443"'),
        (server("listen foo.invalid:80;"),
         'host not found in "foo.invalid:80" of the "listen" directive'),
        (http("upstream u { server :80; }"), 'no host in upstream ":80"'),
        ("error_log e.log verbose;\nevents {}\n", 'invalid log level "verbose"'),
        (server("location / /x { }"), 'invalid location modifier "/"'),
        (http("log_format a x;\nlog_format a y;"), 'duplicate "log_format" name "a"'),
        (server("listen :80;"), 'no host in ":80" of the "listen" directive'),
        (server("listen [zz]:80;"), 'invalid IPv6 address in "[zz]:80" of the "listen" directive'),
        (server("location / { proxy_pass http://[::1]x; }"),
         'invalid host in upstream "[::1]x"'),
        (http("keepalive_timeout 5 1ms;"), '"keepalive_timeout" directive invalid value'),
        ("events {}\nworker_shutdown_timeout 1y;\n",
         '"worker_shutdown_timeout" directive invalid value'),
    ],
)
def test_message_matches_nginx(tmp_path: Path, text: str, expected: str) -> None:
    assert load_error(tmp_path, text).message == expected


def test_multiline_directive_error_line_matches_nginx(tmp_path: Path) -> None:
    assert load_error(tmp_path, "events {}\nfoo\n  bar\n  ;\n").line == 4


def test_empty_upstream_is_reported_at_its_closing_brace(tmp_path: Path) -> None:
    # nginx -t: no servers are inside upstream in F:7 (the "}" line)
    text = "events {}\nhttp {\nupstream u {\n\n keepalive 2;\n\n}\n}\n"
    assert load_error(tmp_path, text).line == 7


def test_invalid_server_name_regex_is_reported(tmp_path: Path) -> None:
    text = server("\nserver_name ~(;")
    err = load_error(tmp_path, text)
    assert err.message.startswith('invalid regular expression "("')
    assert err.line == line_of(text, "server_name")


# -- -g (command line) directives ----------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("daemon maybe;", 'invalid value "maybe" in "daemon" directive, it must be "on" or "off"'),
        ("foo;", 'unknown directive "foo"'),
        ("daemon off; daemon on;", '"daemon" directive is duplicate'),
        ("listen 80;", '"listen" directive is not allowed here'),
        ("worker_processes;", 'invalid number of arguments in "worker_processes" directive'),
        ("daemon off; }", 'unexpected "}"'),
        ("; daemon off;", 'unexpected ";"'),
    ],
)
def test_extra_directive_errors_end_in_command_line(
    tmp_path: Path, extra: str, message: str
) -> None:
    err = load_error(tmp_path, "events {}\n", extra=extra)
    # nginx -t -g "...": <message> in command line
    assert str(err) == f"{message} in command line"
    assert err.file == "command line"


def test_extra_directive_then_config_duplicate_points_at_the_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, "events {}\ndaemon on;\n", extra="daemon off;")
    assert str(err) == '"daemon" directive is duplicate in nginx.conf:2'


def test_extra_directive_without_semicolon(tmp_path: Path) -> None:
    err = load_error(tmp_path, "events {}\n", extra="daemon off")
    assert str(err) == 'unexpected end of parameter, expecting ";" in command line'


def test_extra_block_directive_is_rejected(tmp_path: Path) -> None:
    err = load_error(tmp_path, "events {}\n", extra="http { }")
    assert str(err) == "block directives are not supported in -g option in command line"


# -- nginx time and size values ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0), ("10", 10), ("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("1s500ms", 1.5),
        ("1h", 3600), ("2h30m", 9000), ("1d", 86400), ("1w", 604800),
        ("1h1m1s", 3661), ("75s", 75),
        # ngx_parse_time's corners, each accepted by nginx -t as proxy_read_timeout
        ("m1", 1), ("1m 30s", 90), ("1m 30", 90), ("1s30", 31), ("1s ", 1),
    ],
)
def test_parse_time(text: str, seconds: float) -> None:
    assert D.parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "abc", "10x", "s", "ms", "1.5s", "-1", "1 s", "1S", "1s5 ", "9223372036854776"]
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(D.DirectiveError):
        D.parse_time(text)


@pytest.mark.parametrize("text", ["1y", "1M"])
def test_parse_time_in_milliseconds_rejects_years_and_months(text: str) -> None:
    # Every forklb time directive is a millisecond one (ngx_parse_time(v, 0)):
    # nginx -t: "proxy_read_timeout" directive invalid value for 1y and 1M.
    with pytest.raises(D.DirectiveError):
        D.parse_time(text)


@pytest.mark.parametrize(("text", "seconds"), [("1M", 2592000), ("1y", 31536000)])
def test_parse_time_in_seconds_accepts_years_and_months(text: str, seconds: int) -> None:
    assert D.parse_time(text, is_sec=True) == seconds


def test_parse_time_in_seconds_rejects_milliseconds() -> None:
    # nginx -t: "keepalive_timeout" directive invalid value for keepalive_timeout 5 1ms
    with pytest.raises(D.DirectiveError):
        D.parse_time("1ms", is_sec=True)


@pytest.mark.parametrize("text", ["30s1m", "1s1s", "500ms1s", "1m1h"])
def test_parse_time_rejects_units_out_of_order(text: str) -> None:
    with pytest.raises(D.DirectiveError):
        D.parse_time(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("512", 512), ("8k", 8192), ("8K", 8192), ("1m", 1048576), ("2M", 2097152),
     ("1g", 1073741824), ("1G", 1073741824)],
)
def test_parse_size(text: str, size: int) -> None:
    assert D.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "k", "1t", "1.5k", "-1", "1 k", "1kb"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(D.DirectiveError):
        D.parse_size(text)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("80", None, ("", 80)),
        ("127.0.0.1", 80, ("127.0.0.1", 80)),
        ("127.0.0.1", None, ("127.0.0.1", None)),
        ("host:81", None, ("host", 81)),
        ("*:82", 80, ("*", 82)),
        ("[::1]:83", None, ("::1", 83)),
        ("[::1]", 80, ("::1", 80)),
        ("host:65535", None, ("host", 65535)),
    ],
)
def test_parse_address(text: str, default: int | None, expected: tuple) -> None:
    assert D.parse_address(text, default) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host:0", 'invalid port in "host:0"'),
        ("host:65536", 'invalid port in "host:65536"'),
        ("host:x", 'invalid port in "host:x"'),
        ("host:", 'invalid port in "host:"'),
        ("[::1", 'invalid host in "[::1"'),
        ("[::1]x", 'invalid host in "[::1]x"'),
        ("[::1]:", 'invalid port in "[::1]:"'),
    ],
)
def test_parse_address_rejects(text: str, message: str) -> None:
    with pytest.raises(D.DirectiveError) as info:
        D.parse_address(text, 80)
    assert info.value.message == message


# -- the directive table ------------------------------------------------------------


def test_directive_error_is_a_configobj_validate_error() -> None:
    from validate import ValidateError

    assert issubclass(D.DirectiveError, ValidateError)


def test_server_has_two_specs() -> None:
    specs = D.specs_named("server")
    assert {s.block for s in specs} == {D.SERVER, None}
    assert {next(iter(s.contexts)) for s in specs} == {D.HTTP, D.UPSTREAM}


def test_unknown_name_has_no_specs() -> None:
    assert D.specs_named("locaton") == []


def test_include_is_in_the_table() -> None:
    (spec,) = D.specs_named("include")
    assert D.LOCATION in spec.contexts and (spec.min_args, spec.max_args) == (1, 1)


@pytest.mark.parametrize(
    "context", [D.MAIN, D.EVENTS, D.HTTP, D.UPSTREAM, D.SERVER, D.LOCATION]
)
def test_empty_block_of_every_context_validates_to_defaults(context: str) -> None:
    block = loader.check_tree([], context)
    spec = D.configspec_for(context)
    assert set(block.values) == set(spec)
    assert block.explicit == set()


def test_configspec_marks_multiple_directives_with_each() -> None:
    spec = D.configspec_for(D.SERVER)
    assert spec["listen"].startswith('each("listen()"')
    assert spec["server_name"].startswith('each("string_list()"')


def test_every_check_names_a_known_validator_function() -> None:
    v = D.make_validator()
    for s in D.TABLE:
        if s.check is not None:
            assert s.check.split("(")[0] in v.functions, s.name


def test_scalar_means_exactly_one_argument() -> None:
    for s in D.TABLE:
        assert s.scalar == (s.max_args == 1)


def test_check_tree_records_explicit_and_where() -> None:
    from forklb.config.parser import Parser

    tree = Parser("/nonexistent").parse_text("listen 80;\nlisten 81;\nroot x;", "t")
    block = loader.check_tree(tree, D.SERVER)
    assert block.explicit == {"listen", "root"}
    assert [d.line for d in block.where["listen"]] == [1, 2]
    assert block.values["root"] == "x"
    assert block.values["keepalive_timeout"] == 75.0
