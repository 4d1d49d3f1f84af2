"""Differential suite: the same config and the same raw requests, nginx 1.22 vs forklb.

Each config runs once per module in both proxies (see ``tests/differential.py``), in
front of the same recording backends (``tests/backend_server.py`` in echo mode). Every
case compares the status, what the backend saw (which backend, method, raw target,
every header in order, body length and sha256), the body and selected response
headers. Known, deliberate differences are listed in ``docs/NGINX-DIFFERENCES.md``;
the cases touching them assert forklb's documented behaviour.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pytest
from differential import (
    FORKLB_ADDR,
    NGINX_ADDR,
    Blackhole,
    DiffPair,
    NginxProxy,
    Seen,
    exchange,
    exchange_many,
    forklb_config,
    request,
    seen,
)
from harness import (
    NGINX_BIN,
    ForkLB,
    HangupBackend,
    NginxBackend,
    PyBackend,
    Response,
    free_port,
)

# Response headers compared as they are (Server and Date are each proxy's own).
COMPARED_RESPONSE_HEADERS = ("content-type", "x-backend", "location", "content-length")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hang() -> Iterator[HangupBackend]:
    """A backend that reads the request and closes without answering (counts requests)."""
    backend = HangupBackend(reset=False)
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def backends(tmp_path_factory, hang: HangupBackend) -> Iterator[dict[str, int]]:
    """Ports: recording backends B1, B2; NB, an nginx answering "nb" with extra response
    headers; refused DEAD, DEAD2; a blackhole HOLE; the hang-up backend HANG."""
    tmp = tmp_path_factory.mktemp("backends")
    b1 = PyBackend(tmp, "echo", name="b1").start()
    b2 = PyBackend(tmp, "echo", name="b2").start()
    # response headers to hide or pass (X-Pad and X-Accel-* are hidden by default)
    nb = NginxBackend(tmp, "nb", name="nb", server_directives=(
        "add_header X-Pad pad always; add_header X-Accel-Expires 10 always;"
        " add_header X-Custom c always;")).start()
    hole = Blackhole()
    try:
        yield {"B1": b1.port, "B2": b2.port, "NB": nb.port, "DEAD": free_port(),
               "DEAD2": free_port(), "HOLE": hole.port, "HANG": hang.port}
    finally:
        hole.stop()
        nb.stop()
        b2.stop()
        b1.stop()


def _pair(tmp_path_factory, backends, template: str, nports: int) -> Iterator[DiffPair]:
    listen = [free_port() for _ in range(nports)]
    values = dict(backends)
    values.update({f"P{i + 1}": p for i, p in enumerate(listen)})
    pair = DiffPair(tmp_path_factory.mktemp("pair"), template, values, listen).start()
    try:
        yield pair
    finally:
        pair.stop()


# --------------------------------------------------------------------------- comparison


# D3 in docs/NGINX-DIFFERENCES.md: nginx's older reason phrases (none at all for codes
# it has no text for), RFC 9110's in forklb.
NGINX_PHRASES = {"Gateway Time-out": "Gateway Timeout", "Moved Temporarily": "Found"}


def _phrase(text: str) -> str:
    for old, new in NGINX_PHRASES.items():
        text = text.replace(old, new)
    return text


def _error_body(body: bytes) -> bytes:
    """Built-in error pages differ in the server token (D4) and some phrases (D3)."""
    body = body.replace(b"nginx/1.22.1", b"SERVER").replace(b"forklb", b"SERVER")
    return _phrase(body.decode("latin-1")).encode("latin-1")


def _view(s: Seen) -> dict:
    r = s.response
    return {
        "status": s.status,
        "reason": _phrase(r.reason) or HTTPStatus(s.status).phrase,
        "backend": s.backend,
        "method": s.method,
        "target": s.target,
        "version": s.version,
        # names with their case: both keep the client's or the config's
        "headers": None if s.headers is None else list(s.headers),
        "body_len": s.body_len,
        "body_sha256": s.body_sha256,
        # (an error page's length differs with the server token; its body is compared)
        "response_headers": {h: r.header_list(h) for h in COMPARED_RESPONSE_HEADERS
                             if not (s.backend is None and h == "content-length")},
        "body": None if s.backend is not None else _error_body(r.body),
    }


Known = dict[str, tuple[list[str], list[str]]]


def compare(pair_result: tuple[Response | Exception, Response | Exception],
            known: Known | None = None) -> Seen:
    """Assert nginx's and forklb's answers are the same; return nginx's view.

    ``known``: request headers that differ as docs/NGINX-DIFFERENCES.md says,
    name -> (values nginx sends, values forklb sends); both are asserted, then
    those headers (and the echo body's length) are left out of the comparison.
    """
    n, f = pair_result
    assert isinstance(n, Response), f"nginx gave no response: {n!r}"
    assert isinstance(f, Response), f"forklb gave no response: {f!r} (nginx: {n!r})"
    sn, sf = seen(n), seen(f)
    vn, vf = _view(sn), _view(sf)
    for name, (want_nginx, want_forklb) in (known or {}).items():
        assert header(sn, name) == want_nginx, ("nginx", name, sn.headers)
        assert header(sf, name) == want_forklb, ("forklb", name, sf.headers)
        for view in (vn, vf):
            view["headers"] = [(k, v) for k, v in view["headers"]
                               if k.lower() != name.lower()]
            view["response_headers"].pop("content-length", None)
    assert vf == vn
    return sn


def header(s: Seen, name: str) -> list[str]:
    """Values of request header ``name`` as the backend saw it."""
    return [v for k, v in s.headers or [] if k.lower() == name.lower()]


# --------------------------------------------------------------------------- routing


def _loc(spec: str, tag: str, nested: str = "") -> str:
    return (f'        location {spec} {{ proxy_pass http://127.0.0.1:@B1@; '
            f'proxy_set_header X-Route "{tag}"; proxy_set_header Connection "";\n'
            f'{nested}        }}\n')


def _server(port: str, names: str | None, tag: str, locs: str = "",
            default: bool = False) -> str:
    listen = f"listen @ADDR@:@{port}@{' default_server' if default else ''};"
    name = f"server_name {names};" if names is not None else ""
    return f"    server {{\n        {listen} {name}\n{_loc('/', tag)}{locs}    }}\n"


ROUTING = "".join([
    _server("P1", "first.test", "first"),
    _server("P1", "example.com www.example.com", "root", "".join([
        _loc("= /", "exact-root"),
        _loc("/docs/", "docs"),
        _loc("/docs/api/", "docs-api"),
        _loc("^~ /static/", "static"),
        _loc("/img/", "img"),
        _loc(r"~ \.png$", "png"),
        _loc(r"~* \.JPG$", "jpg"),
        _loc("~ ^/re/a", "re-a"),
        _loc("~ ^/re/", "re-any"),
        _loc("= /exact", "exact"),
        _loc("/exact", "exact-prefix"),
        _loc("/pre", "pre"),
        _loc("/pre/longer", "pre-longer"),
        _loc("/n/", "n", "".join([
            _loc("/n/in/", "n-in", _loc("/n/in/deep/", "n-deep")),
            _loc("^~ /n/caret/", "n-caret"),
            _loc("= /n/exact", "n-exact"),
            _loc(r"~ \.png$", "n-png"),
            _loc(r"~ \.txt$", "n-txt"),
        ])),
        _loc("^~ /sn/", "sn", _loc(r"~ \.png$", "sn-png")),
    ])),
    _server("P1", "www.example.org", "exact-org"),
    _server("P1", "*.example.org", "wild-org"),
    _server("P1", "*.sub.example.org", "wild-sub"),
    _server("P1", "www.example.*", "tail-www"),
    _server("P1", "*.example.net", "wild-net"),
    _server("P1", ".dot.net", "dot"),
    _server("P1", r"~^r(\d+)\.regex\.com$", "regex-1"),
    _server("P1", r"~^r1", "regex-2"),
    _server("P1", r"~^www\.", "regex-www"),
    _server("P1", r"~^(?<sub>[a-z]+)\.(cap)\.test$", "cap:$sub:$1:$2:$1x", "".join([
        _loc(r"~ ^/c/(?<first>[^/]+)/(.*)$", "loc:$1:$2:$first:$sub:$2y"),
        _loc(r"~ ^/d/(.*)$", "d:$1:$sub"),
        _loc("/p/", "p:$1:$sub"),
    ])),
    _server("P1", r"~^(?'named'zz+)\.cap2\.test$", "cap2:$named"),
    _server("P1", '""', "empty-name"),
    _server("P1", "zdefault.test", "default", default=True),
    _server("P2", "example.com", "p2-first"),
    _server("P2", "p2.test", "p2-other"),
])


@pytest.fixture(scope="module")
def routing(tmp_path_factory, backends) -> Iterator[DiffPair]:
    yield from _pair(tmp_path_factory, backends, ROUTING, 2)


@dataclass(frozen=True)
class Case:
    """One request: raw bytes, listening port index, what nginx is expected to do."""

    id: str
    raw: bytes
    expect: str | int  # X-Route tag, or a status when the backend is not reached
    port: int = 0


def _get(target: str, host: str | None = "example.com", headers=None) -> bytes:
    return request("GET", target, headers, host=host)


ROUTING_CASES = [
    # server_name
    Case("exact-name", _get("/", "www.example.com"), "exact-root"),
    Case("exact-beats-wildcard", _get("/x", "www.example.org"), "exact-org"),
    Case("leading-wildcard", _get("/x", "a.example.org"), "wild-org"),
    Case("longest-leading-wildcard", _get("/x", "a.sub.example.org"), "wild-sub"),
    Case("trailing-wildcard", _get("/x", "www.example.io"), "tail-www"),
    Case("leading-beats-trailing", _get("/x", "www.example.net"), "wild-net"),
    Case("dot-name-bare", _get("/x", "dot.net"), "dot"),
    Case("dot-name-sub", _get("/x", "a.b.dot.net"), "dot"),
    Case("regex-first-in-order", _get("/x", "r1.regex.com"), "regex-1"),
    Case("regex-second", _get("/x", "r1x.regex.com"), "regex-2"),
    Case("wildcards-beat-regex", _get("/x", "www.other.io"), "regex-www"),
    Case("unknown-host-default-server", _get("/x", "nowhere.test"), "default"),
    Case("first-server-by-name", _get("/x", "first.test"), "first"),
    Case("no-host-http10", b"GET /x HTTP/1.0\r\n\r\n", "empty-name"),
    Case("empty-host-header", _get("/x", ""), 400),
    Case("dot-host-header", _get("/x", "."), 400),
    Case("double-dot-host", _get("/x", "a..example.org"), 400),
    Case("slash-in-host", _get("/x", "a/b"), 400),
    Case("space-in-host", _get("/x", "a b"), 400),
    Case("host-with-port", _get("/x", "example.com:8080"), "root"),
    Case("uppercase-host", _get("/x", "WWW.EXAMPLE.COM"), "root"),
    Case("trailing-dot-host", _get("/x", "example.com."), "root"),
    Case("absolute-form-wins-over-host", _get("http://www.example.org/x", "example.com"),
         "exact-org"),
    Case("absolute-form-uppercase", _get("http://WWW.Example.ORG:81/x", "example.com"),
         "exact-org"),
    Case("port2-name", _get("/x", "example.com"), "p2-first", port=1),
    Case("port2-unknown-first", _get("/x", "zdefault.test"), "p2-first", port=1),
    Case("port2-name-other", _get("/x", "p2.test"), "p2-other", port=1),
    Case("port1-ignores-port2-names", _get("/x", "p2.test"), "default"),
    # regex captures
    Case("server-name-captures", _get("/x", "abc.cap.test"), "cap:abc:abc:cap:abcx"),
    Case("location-captures-win", _get("/c/one/two/three", "abc.cap.test"),
         "loc:one:two/three:one:abc:two/threey"),
    Case("location-capture-numbered-only", _get("/d/zz", "abc.cap.test"), "d:zz:abc"),
    Case("prefix-location-keeps-server-captures", _get("/p/", "abc.cap.test"), "p:abc:abc"),
    Case("pcre-quote-named-capture", _get("/", "zzz.cap2.test"), "cap2:zzz"),
    # nested locations
    Case("nested-outer", _get("/n/x"), "n"),
    Case("nested-inner-prefix", _get("/n/in/x"), "n-in"),
    Case("nested-two-deep", _get("/n/in/deep/x"), "n-deep"),
    Case("nested-exact", _get("/n/exact"), "n-exact"),
    Case("nested-regex-before-outer-regex", _get("/n/in/a.png"), "n-png"),
    Case("nested-regex-second", _get("/n/a.txt"), "n-txt"),
    Case("nested-outer-regex-after-nested", _get("/n/in/a.jpg"), "jpg"),
    Case("nested-caret-skips-inner-regexes", _get("/n/caret/a.txt"), "n-caret"),
    Case("nested-caret-not-outer-regexes", _get("/n/caret/a.JPG"), "jpg"),
    Case("caret-own-nested-regex", _get("/sn/a.png"), "sn-png"),
    Case("caret-skips-outer-regex", _get("/sn/a.jpg"), "sn"),
    # location
    Case("location-exact-root", _get("/"), "exact-root"),
    Case("location-root-prefix", _get("/other"), "root"),
    Case("location-prefix", _get("/docs/x"), "docs"),
    Case("location-longest-prefix", _get("/docs/api/x"), "docs-api"),
    Case("location-exact", _get("/exact"), "exact"),
    Case("location-exact-then-prefix", _get("/exactly"), "exact-prefix"),
    Case("location-exact-with-query", _get("/exact?a=1"), "exact"),
    Case("location-prefix-no-slash", _get("/prefix"), "pre"),
    Case("location-prefix-longer", _get("/pre/longer/x"), "pre-longer"),
    Case("location-caret-tilde-skips-regex", _get("/static/a.png"), "static"),
    Case("location-regex-beats-prefix", _get("/img/a.png"), "png"),
    Case("location-regex-case-sensitive", _get("/img/a.PNG"), "img"),
    Case("location-regex-case-insensitive", _get("/x/a.jpg"), "jpg"),
    Case("location-regex-first-wins", _get("/re/abc"), "re-a"),
    Case("location-regex-second", _get("/re/b"), "re-any"),
    Case("location-regex-after-longest-prefix", _get("/docs/api/a.png"), "png"),
    Case("uri-percent-decoded", _get("/docs/%61pi/x"), "docs-api"),
    Case("uri-percent-dot", _get("/img/a%2Epng"), "png"),
    Case("uri-dot-segment", _get("/static/./a.png"), "static"),
    Case("uri-dotdot-segment", _get("/img/../docs/api/"), "docs-api"),
    Case("uri-merged-slashes", _get("//docs//api/"), "docs-api"),
    Case("uri-encoded-slash", _get("/docs%2Fapi%2Fx"), "docs-api"),
    Case("uri-dot-then-exact", _get("/./exact"), "exact"),
    Case("uri-encoded-question-mark-not-exact", _get("/exact%3F"), "exact-prefix"),
    Case("prefix-is-case-sensitive", _get("/DOCS/x"), "root"),
    Case("absolute-form-no-path", _get("http://www.example.org", "example.com"), "exact-org"),
    Case("absolute-form-https-scheme", _get("https://www.example.org/x", "example.com"),
         "exact-org"),
    Case("options-asterisk", request("OPTIONS", "*", host="example.com"), 400),
    Case("lowercase-method", b"get /x HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
    Case("host-with-userinfo", _get("/x", "user@example.com"), "default"),
    Case("host-ipv6-literal", _get("/x", "[::1]:8080"), "default"),
    Case("host-numeric", _get("/x", "127.0.0.1"), "default"),
    Case("missing-host-http11", b"GET /x HTTP/1.1\r\n\r\n", 400),
    Case("duplicate-host", _get("/x", "example.com", [("Host", "example.com")]), 400),
    Case("cl-and-te", b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    Case("space-before-colon", b"GET /x HTTP/1.1\r\nHost : example.com\r\n\r\n", 400),
    Case("obs-fold", b"GET /x HTTP/1.1\r\nHost: example.com\r\nX-A: a\r\n b\r\n\r\n",
         400),
    Case("http10-with-host", b"GET /x HTTP/1.0\r\nHost: www.example.org\r\n\r\n",
         "exact-org"),
    Case("uri-dotdot-above-root", _get("/../x"), 400),
    Case("uri-bad-escape", _get("/a%zz"), 400),
    Case("uri-space", _get("/a b"), 400),
    Case("uri-encoded-nul", _get("/a%00b"), 400),
]


@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: c.id)
def test_routing(routing: DiffPair, case: Case) -> None:
    s = compare(routing.send(case.raw, routing.listen[case.port]))
    if isinstance(case.expect, int):
        assert s.status == case.expect and s.backend is None
    else:
        assert s.status == 200
        assert header(s, "x-route") == [case.expect]


# --------------------------------------------------------------------------- proxy_pass URIs


PROXY = """
    proxy_set_header X-Level "http";
    proxy_set_header Connection "";
    upstream pool { server 127.0.0.1:@B1@; }
    server {
        listen @ADDR@:@P1@;
        server_name proxy.test;
        location /plain/ { proxy_pass http://127.0.0.1:@B1@; }
        location /name { proxy_pass http://127.0.0.1:@B1@/remote/; }
        location /dir/ { proxy_pass http://127.0.0.1:@B1@/remote/; }
        location /root/ { proxy_pass http://127.0.0.1:@B1@/; }
        location = /exact { proxy_pass http://127.0.0.1:@B1@/target; }
        location /up/ { proxy_pass http://pool/base/; }
        location /upraw/ { proxy_pass http://pool; }
        location ~ ^/regex/ { proxy_pass http://127.0.0.1:@B1@; }
        location /vars/ {
            proxy_pass http://127.0.0.1:@B1@;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Foo $http_x_foo;
            proxy_set_header X-Port $server_port;
            proxy_set_header X-Request-Uri $request_uri;
            proxy_set_header X-Scheme $scheme;
            proxy_set_header X-Uri $uri;
            proxy_set_header X-Args $args;
            proxy_set_header X-Remote $remote_addr;
            proxy_set_header X-Mixed "$scheme://$host:$server_port$request_uri";
            proxy_set_header Connection "";
        }
        location /empty/ {
            proxy_pass http://127.0.0.1:@B1@;
            proxy_set_header X-Drop "";
            proxy_set_header X-Keep kept;
            proxy_set_header Connection "";
        }
        location /hostport/ {
            proxy_pass http://127.0.0.1:@B1@;
            proxy_set_header Host $host:$server_port;
            proxy_set_header Connection "";
        }
    }
    server {
        listen @ADDR@:@P1@;
        server_name inherit.test;
        proxy_set_header X-Level "server";
        proxy_set_header Connection "";
        location /none/ { proxy_pass http://127.0.0.1:@B1@; }
        location /own/ {
            proxy_pass http://127.0.0.1:@B1@;
            proxy_set_header X-Own "location";
            proxy_set_header Connection "";
        }
    }
    server {
        listen @ADDR@:@P1@;
        server_name bare.test;
        location / { proxy_pass http://127.0.0.1:@B1@; }
    }
    server {
        listen @ADDR@:@P1@;
        server_name ret.test;
        location = /text { return 200 "host=$host uri=$uri args=$args"; }
        location = /relative { return 301 /elsewhere?x=1; }
        location = /absolute { return 302 http://other.test/y; }
        location = /code { return 204; }
        location = /teapot { return 418; }
        location = /bare200 { return 200; }
        location = /emptytext { return 200 ""; }
        location = /notfound { return 404; }
        location = /unprocessable { return 422 "text"; }
        location /denied/ { deny all; proxy_pass http://127.0.0.1:@B1@; }
        location /allowed/ { allow 127.0.0.1; deny all; proxy_pass http://127.0.0.1:@B1@; }
        location /small/ { client_max_body_size 10; proxy_pass http://127.0.0.1:@B1@; }
        location /nb-default/ { proxy_pass http://127.0.0.1:@NB@; }
        location /nb-hide/ { proxy_pass http://127.0.0.1:@NB@; proxy_hide_header X-Custom; }
        location /nb-pass/ {
            proxy_pass http://127.0.0.1:@NB@;
            proxy_pass_header X-Accel-Expires;
            proxy_pass_header Server;
            proxy_pass_header X-Pad;
        }
    }
"""


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, backends) -> Iterator[DiffPair]:
    yield from _pair(tmp_path_factory, backends, PROXY, 1)


@dataclass(frozen=True)
class UriCase:
    id: str
    target: str
    upstream_target: str  # what nginx sends (asserted too, so the case can fail)


URI_CASES = [
    UriCase("no-uri-part-raw", "/plain/a%20b?x=1&y=%41", "/plain/a%20b?x=1&y=%41"),
    UriCase("no-uri-part-unnormalised", "/plain/../plain/./x//y", "/plain/../plain/./x//y"),
    UriCase("no-uri-part-encoded-slash", "/plain/a%2Fb", "/plain/a%2Fb"),
    UriCase("uri-part-replaces-prefix", "/dir/x?q=1", "/remote/x?q=1"),
    UriCase("uri-part-prefix-only", "/dir/", "/remote/"),
    UriCase("uri-part-location-no-slash", "/name/x", "/remote//x"),
    UriCase("uri-part-location-no-slash-join", "/namex", "/remote/x"),
    UriCase("uri-part-location-no-slash-bare", "/name", "/remote/"),
    UriCase("uri-part-root", "/root/a/b?c", "/a/b?c"),
    UriCase("uri-part-decoded-reencoded", "/dir/a%20b%2Fc", "/remote/a%20b/c"),
    UriCase("uri-part-unreserved-decoded", "/dir/%7Ex%41", "/remote/~xA"),
    UriCase("uri-part-normalised", "/dir/a/../b/./c//d", "/remote/b/c/d"),
    UriCase("uri-part-query-untouched", "/dir/x?a=%20&b=c%2Fd#f", "/remote/x?a=%20&b=c%2Fd"),
    UriCase("uri-part-exact-location", "/exact?a=1", "/target?a=1"),
    UriCase("uri-part-upstream-group", "/up/x", "/base/x"),
    UriCase("upstream-group-raw", "/upraw/x?y", "/upraw/x?y"),
    UriCase("regex-location-raw", "/regex/a%41?b", "/regex/a%41?b"),
    UriCase("uri-part-special-chars",
            "/dir/%22%3C%3E%5C%5E%60%7B%7C%7D%27%21%2A%28%29%3B%3A%40%26%3D%2B%24%2C%5B%5D%25",
            "/remote/%22%3C%3E%5C%5E%60%7B%7C%7D'!*();:@&=+$,[]%25"),
    UriCase("uri-part-unsafe-chars-unescaped", '/dir/a{b}|c^d`e"f<g>h\\i',
            '/remote/a{b}|c^d`e"f<g>h\\i'),
    UriCase("uri-part-unsafe-chars-escaped", '/dir/a{b}|c^d`e"f<g>h\\i%41',
            "/remote/a%7Bb%7D%7Cc%5Ed%60e%22f%3Cg%3Eh%5CiA"),
    UriCase("uri-part-utf8", "/dir/%C3%A9t%C3%A9", "/remote/%C3%A9t%C3%A9"),
    UriCase("uri-part-question-mark-encoded", "/dir/a%3Fb?c", "/remote/a%3Fb?c"),
    UriCase("empty-query-dropped", "/dir/x?", "/remote/x"),
    UriCase("fragment-dropped", "/dir/x#frag", "/remote/x"),
    UriCase("fragment-raw-kept", "/plain/x?a#frag", "/plain/x?a#frag"),
]


@pytest.mark.parametrize("case", URI_CASES, ids=lambda c: c.id)
def test_proxy_pass_uri(proxied: DiffPair, case: UriCase) -> None:
    s = compare(proxied.send(request("GET", case.target, host="proxy.test")))
    assert s.status == 200
    assert s.target == case.upstream_target


# --------------------------------------------------------------------------- request headers


@dataclass(frozen=True)
class HeaderCase:
    id: str
    target: str
    host: str
    headers: tuple[tuple[str, str], ...]
    expect: tuple[tuple[str, str | None], ...]  # (name, value nginx sends or None: absent)


XFF = ("X-Forwarded-For", "10.0.0.1")
HEADER_CASES = [
    HeaderCase("default-host-is-proxy-host", "/plain/", "proxy.test", (),
               (("host", "127.0.0.1:@B1@"), ("x-level", "http"), ("connection", None))),
    HeaderCase("default-host-upstream-name", "/upraw/", "proxy.test", (), (("host", "pool"),)),
    HeaderCase("client-headers-passed-in-order", "/plain/", "proxy.test",
               (("X-B", "2"), ("X-A", "1"), ("x-lower", "v"), ("X-Dup", "1"), ("X-Dup", "2")),
               (("x-a", "1"),)),
    HeaderCase("variables", "/vars/p?a=1&b=2", "Proxy.Test:8080",
               (XFF, ("X-Foo", "bar")),
               (("host", "proxy.test"), ("x-forwarded-for", "10.0.0.1, 127.0.0.1"),
                ("x-foo", "bar"), ("x-port", "@P1@"), ("x-request-uri", "/vars/p?a=1&b=2"),
                ("x-scheme", "http"), ("x-uri", "/vars/p"), ("x-args", "a=1&b=2"),
                ("x-remote", "127.0.0.1"),
                ("x-mixed", "http://proxy.test:@P1@/vars/p?a=1&b=2"), ("x-level", None))),
    HeaderCase("variables-normalised-uri", "/vars/../vars/%41?x", "proxy.test", (),
               (("x-uri", "/vars/A"), ("x-request-uri", "/vars/../vars/%41?x"),
                ("x-forwarded-for", "127.0.0.1"), ("x-foo", None), ("x-args", "x"))),
    HeaderCase("xff-chain-two-headers", "/vars/", "proxy.test",
               (XFF, ("X-Forwarded-For", "10.0.0.2, 10.0.0.3")),
               (("x-forwarded-for", "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"),)),
    HeaderCase("http-var-underscore-name", "/vars/", "proxy.test",
               (("X_Foo", "under"), ("X_Forwarded_For", "6.6.6.6")),
               (("x-foo", None), ("x_foo", None), ("x-forwarded-for", "127.0.0.1"))),
    HeaderCase("absolute-form-host-var", "http://proxy.test/vars/q", "other.test", (),
               (("host", "proxy.test"), ("x-request-uri", "/vars/q"))),
    HeaderCase("empty-value-not-sent", "/empty/", "proxy.test",
               (("X-Drop", "client"), ("X-Keep", "client")),
               (("x-drop", None), ("x-keep", "kept"), ("x-level", None))),
    HeaderCase("host-with-server-port", "/hostport/", "proxy.test:9", (),
               (("host", "proxy.test:@P1@"),)),
    HeaderCase("inherit-from-server", "/none/", "inherit.test", (),
               (("x-level", "server"),)),
    HeaderCase("own-headers-inherit-nothing", "/own/", "inherit.test", (),
               (("x-level", None), ("x-own", "location"))),
    HeaderCase("keep-alive-stripped", "/plain/", "proxy.test",
               (("Keep-Alive", "timeout=5"),), (("keep-alive", None),)),
    HeaderCase("te-stripped", "/plain/", "proxy.test", (("TE", "trailers"),), (("te", None),)),
    HeaderCase("expect-stripped", "/plain/", "proxy.test", (("Expect", "100-continue"),),
               (("expect", None),)),
    HeaderCase("upgrade-stripped", "/plain/", "proxy.test", (("Upgrade", "foo/1"),),
               (("upgrade", None),)),
    HeaderCase("connection-close-stripped", "/plain/", "proxy.test",
               (("Connection", "close"),), (("connection", None),)),
    HeaderCase("content-length-zero-kept", "/plain/", "proxy.test",
               (("Content-Length", "0"),), (("content-length", "0"),)),
]


def _fill(text: str | None, pair: DiffPair) -> str | None:
    if text is None:
        return None
    return text.replace("@P1@", str(pair.values["P1"])).replace("@B1@", str(pair.values["B1"]))


def _expect_headers(s: Seen, expect, pair: DiffPair) -> None:
    for name, value in expect:
        got = header(s, name)
        want = _fill(value, pair)
        assert got == ([] if want is None else [want]), (name, got, s.headers)


@pytest.mark.parametrize("case", HEADER_CASES, ids=lambda c: c.id)
def test_request_headers(proxied: DiffPair, case: HeaderCase) -> None:
    raw = request("GET", case.target, list(case.headers), host=case.host)
    s = compare(proxied.send(raw))
    assert s.status == 200
    _expect_headers(s, case.expect, proxied)


# --------------------------------------------------------------------------- known differences
# Each test here pins one entry of docs/NGINX-DIFFERENCES.md, so the list stays true.


def test_known_http_variable_joins_repeated_headers(proxied: DiffPair) -> None:
    """D1: ``$http_x_foo`` of a repeated header: nginx 1.22 gives the first line,
    forklb all lines joined by ", " (as nginx >= 1.23 does; RFC 9110 5.3)."""
    raw = request("GET", "/vars/", [("X-Foo", "a"), ("X-Foo", "b")], host="proxy.test")
    compare(proxied.send(raw), known={"x-foo": (["a"], ["a, b"])})


@pytest.mark.parametrize(
    ("client_headers", "known"),
    [
        pytest.param([("Connection", "close, X-Secret"), ("X-Secret", "s")],
                     {"x-secret": (["s"], [])}, id="connection-listed-name"),
        pytest.param([("Connection", "keep-alive, X-A, x-b"), ("X-A", "1"), ("X-B", "2")],
                     {"x-a": (["1"], []), "x-b": (["2"], [])}, id="connection-listed-names"),
        pytest.param([("Proxy-Connection", "keep-alive")],
                     {"proxy-connection": (["keep-alive"], [])}, id="proxy-connection"),
        pytest.param([("Trailer", "X-Checksum")], {"trailer": (["X-Checksum"], [])},
                     id="trailer"),
    ],
)
def test_known_hop_by_hop_stripped(proxied: DiffPair, client_headers, known) -> None:
    """D2: forklb also removes what nginx forwards: the names a client's Connection
    lists (RFC 9110 7.6.1 MUST), Proxy-Connection (7.6.1 SHOULD) and Trailer (forklb
    re-frames the body and sends no trailers, 6.6.2)."""
    raw = request("GET", "/plain/", client_headers, host="proxy.test")
    compare(proxied.send(raw), known=known)


# --------------------------------------------------------------------------- upstreams, retries


UPSTREAMS = """
    proxy_set_header Connection "";
    upstream refuse_then_good { server 127.0.0.1:@DEAD@; server 127.0.0.1:@B2@; }
    upstream all_refuse { server 127.0.0.1:@DEAD@; server 127.0.0.1:@DEAD2@; }
    upstream hang_get { server 127.0.0.1:@HANG@; server 127.0.0.1:@B2@; }
    upstream hang_post { server 127.0.0.1:@HANG@; server 127.0.0.1:@B2@; }
    upstream balanced { server 127.0.0.1:@B1@; server 127.0.0.1:@B2@; }
    server {
        listen @ADDR@:@P1@;
        location /retry/ { proxy_pass http://refuse_then_good; }
        location /dead/ { proxy_pass http://all_refuse; }
        location /single-dead/ { proxy_pass http://127.0.0.1:@DEAD@; }
        location /hole/ { proxy_pass http://127.0.0.1:@HOLE@; proxy_read_timeout 1s; }
        location /hang-get/ { proxy_pass http://hang_get; }
        location /hang-post/ { proxy_pass http://hang_post; }
        location /rr/ { proxy_pass http://balanced; }
        location /body/ { proxy_pass http://127.0.0.1:@B1@; }
    }
"""


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory, backends) -> Iterator[DiffPair]:
    yield from _pair(tmp_path_factory, backends, UPSTREAMS, 1)


def test_refused_then_good(upstreams: DiffPair) -> None:
    for _ in range(2):  # the second time the refusing server is skipped (max_fails=1)
        s = compare(upstreams.send(request("GET", "/retry/x")))
        assert (s.status, s.backend, s.target) == (200, "b2", "/retry/x")


@pytest.mark.parametrize("target", ["/dead/", "/single-dead/"])
def test_all_refusing_is_502(upstreams: DiffPair, target: str) -> None:
    for _ in range(2):  # all failed: "no live upstreams" the second time, still 502
        s = compare(upstreams.send(request("GET", target)))
        assert s.status == 502 and s.backend is None


def test_blackholed_backend_read_timeout_is_504(upstreams: DiffPair) -> None:
    s = compare(upstreams.send(request("GET", "/hole/x")))
    assert s.status == 504 and s.backend is None


def test_closing_backend_get_is_retried(upstreams: DiffPair, hang: HangupBackend) -> None:
    before = hang.requests
    s = compare(upstreams.send(request("GET", "/hang-get/x")))
    assert (s.status, s.backend) == (200, "b2")
    assert hang.requests - before == 2  # once for each proxy, then the next server


def test_closing_backend_post_is_not_retried(upstreams: DiffPair,
                                             hang: HangupBackend) -> None:
    before = hang.requests
    s = compare(upstreams.send(request("POST", "/hang-post/x", body=b"payload"), method="POST"))
    assert s.status == 502 and s.backend is None  # b2 would have answered 200
    assert hang.requests - before == 2


def test_round_robin_order(upstreams: DiffPair) -> None:
    order = [compare(upstreams.send(request("GET", "/rr/"))).backend for _ in range(4)]
    assert order == ["b1", "b2", "b1", "b2"]


@pytest.mark.parametrize(
    ("method", "body"),
    [("POST", b"a=1&b=2"), ("PUT", bytes(range(256)) * 300), ("DELETE", b""),
     ("PATCH", b"{}"), ("OPTIONS", b""), ("HEAD", b"")],
    ids=["post", "put-binary-75k", "delete", "patch", "options", "head"],
)
def test_methods_and_bodies(upstreams: DiffPair, method: str, body: bytes) -> None:
    raw = request(method, "/body/x", [("Content-Type", "application/octet-stream")], body)
    s = compare(upstreams.send(raw, method=method))
    assert s.status == 200
    if method != "HEAD":
        assert (s.method, s.body_len) == (method, len(body))
        assert s.body_sha256 == hashlib.sha256(body).hexdigest()


def test_known_error_page_wording(upstreams: DiffPair) -> None:
    """D3, D4: the built-in error page names the server, and 504's phrase is RFC 9110's."""
    n, f = upstreams.send(request("GET", "/hole/x"))
    assert isinstance(n, Response) and isinstance(f, Response)
    assert (n.status, n.reason, f.status, f.reason) == (
        504, "Gateway Time-out", 504, "Gateway Timeout")
    assert b"<center>nginx/1.22.1</center>" in n.body and b"<center>forklb</center>" in f.body
    assert (n.header("server"), f.header("server")) == ("nginx/1.22.1", "forklb")


@pytest.mark.parametrize(
    ("target", "nginx_reason", "forklb_reason"),
    [("/absolute", "Moved Temporarily", "Found"), ("/teapot", "", "I'm a Teapot"),
     ("/unprocessable", "", "Unprocessable Entity")],
)
def test_known_reason_phrases(proxied: DiffPair, target: str, nginx_reason: str,
                              forklb_reason: str) -> None:
    """D3: nginx's reason phrases are its own table's, empty for codes not in it."""
    n, f = proxied.send(request("GET", target, host="ret.test"))
    assert isinstance(n, Response) and isinstance(f, Response)
    assert (n.reason, f.reason) == (nginx_reason, forklb_reason)


def test_upstream_protocol_is_http11(proxied: DiffPair) -> None:
    """Both speak HTTP/1.1 upstream here: nginx only because the suite adds
    ``proxy_http_version 1.1`` for it (docs/NGINX-DIFFERENCES.md, "equal terms"),
    and with no Connection header because the shared config says
    ``proxy_set_header Connection ""``."""
    s = compare(proxied.send(request("GET", "/plain/", host="proxy.test")))
    assert s.version == "HTTP/1.1" and header(s, "connection") == []


def test_known_raw_non_ascii_target_is_400(proxied: DiffPair) -> None:
    """D5: a raw byte above 0x7f in the request target: nginx proxies it, forklb's
    strict parser answers 400 (RFC 9112 3.2 and RFC 3986 2: a target is ASCII)."""
    n, f = proxied.send(b"GET /dir/\xe9 HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n")
    assert isinstance(n, Response) and isinstance(f, Response)
    assert (n.status, seen(n).target, f.status) == (200, "/remote/\xe9", 400)


def test_known_chunked_body_is_streamed(upstreams: DiffPair) -> None:
    """D6: a chunked request body: nginx buffers it and sends Content-Length, forklb
    streams it re-chunked (RFC 9112 7: both framings carry the same content)."""
    body = b"hello chunked world"
    raw = (b"POST /body/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n5\r\nhello\r\n0e\r\n chunked world\r\n0\r\n\r\n")
    s = compare(upstreams.send(raw, method="POST"), known={
        "content-length": ([str(len(body))], []),
        "transfer-encoding": ([], ["chunked"]),
    })
    assert (s.status, s.body_len, s.body_sha256) == (200, len(body),
                                                      hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize(
    ("raw", "method", "status"),
    [
        pytest.param(request("GET", "/body/x?__status=404"), "GET", 404, id="upstream-404"),
        pytest.param(request("GET", "/body/x?__status=503"), "GET", 503, id="upstream-503"),
        pytest.param(request("GET", "/body/x?__status=204"), "GET", 204, id="upstream-204"),
        pytest.param(request("GET", "/body/x?__chunked=1&__size=70000"), "GET", 200,
                     id="upstream-chunked"),
        pytest.param(request("GET", "/body/x?__size=300000"), "GET", 200, id="upstream-large"),
        pytest.param(request("HEAD", "/body/x?__size=1000"), "HEAD", 200, id="head-length"),
        pytest.param(b"GET /body/x HTTP/1.0\r\n\r\n", "GET", 200, id="http10-client"),
        pytest.param(b"GET /body/x?__chunked=1 HTTP/1.0\r\n\r\n", "GET", 200,
                     id="http10-client-chunked-upstream"),
        pytest.param(request("POST", "/body/x", [("Expect", "100-continue")], b"abc"), "POST",
                     200, id="expect-100-continue"),
        pytest.param(request("GET", "/body/x", [(f"X-H{i}", "v" * 100) for i in range(60)]),
                     "GET", 200, id="sixty-headers"),
    ],
)
def test_responses_relayed(upstreams: DiffPair, raw: bytes, method: str, status: int) -> None:
    s = compare(upstreams.send(raw, method=method))
    assert s.status == status


def test_pipelined_keep_alive(upstreams: DiffPair) -> None:
    """Three requests in one write on one connection: same answers, same Connection
    headers, the last one closing."""
    ka = [("Connection", "keep-alive")]
    raw = (request("GET", "/body/a", ka).replace(b"Connection: close\r\n", b"")
           + request("POST", "/body/b", ka, b"xyz").replace(b"Connection: close\r\n", b"")
           + request("GET", "/body/c"))
    methods = ["GET", "POST", "GET"]
    port = upstreams.listen[0]
    nginx = exchange_many(NGINX_ADDR, port, raw, methods)
    forklb = exchange_many(FORKLB_ADDR, port, raw, methods)
    for n, f in zip(nginx, forklb, strict=True):
        compare((n, f))
        assert n.header("connection") == f.header("connection")
    assert [seen(r).target for r in nginx] == ["/body/a", "/body/b", "/body/c"]
    assert [r.header("connection") for r in forklb] == ["keep-alive", "keep-alive", "close"]


def test_known_absolute_form_other_scheme_is_400(routing: DiffPair) -> None:
    """D7: ``GET ftp://host/x``: nginx takes any scheme and routes by the authority,
    forklb answers 400: an origin server's resources are http(s) (RFC 9110 4.2, 7.1)."""
    n, f = routing.send(_get("ftp://www.example.org/x", "example.com"))
    assert isinstance(n, Response) and isinstance(f, Response)
    assert (n.status, header(seen(n), "x-route"), f.status) == (200, ["exact-org"], 400)


def test_nginx_default_upstream_protocol_is_http10(tmp_path, backends) -> None:
    """Why the suite gives nginx ``proxy_http_version 1.1``: by default nginx 1.22 sends
    HTTP/1.0 and ``Connection: close`` (forklb: HTTP/1.1, no Connection header)."""
    port = free_port()
    nginx = NginxProxy(tmp_path, f"""
    server {{
        listen {NGINX_ADDR}:{port};
        # 1.0 is nginx's default; said here because NGINX_ONLY_HTTP sets 1.1 in http {{}}
        location / {{ proxy_pass http://127.0.0.1:{backends["B1"]}; proxy_http_version 1.0; }}
    }}""")
    try:
        nginx.start([port])
        s = seen(exchange(NGINX_ADDR, port, request("GET", "/x")))
    finally:
        nginx.stop()
    assert s.version == "HTTP/1.0"
    assert header(s, "connection") == ["close"]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(request("GET", "/text?a=1", host="Ret.Test:81"), 200, id="return-text"),
        pytest.param(request("GET", "/relative", host="ret.test"), 301, id="return-relative"),
        pytest.param(request("GET", "/relative", host="ret.test:8080"), 301,
                     id="return-relative-host-port"),
        pytest.param(request("GET", "/absolute", host="ret.test"), 302, id="return-absolute"),
        pytest.param(request("GET", "/code", host="ret.test"), 204, id="return-204"),
        pytest.param(request("GET", "/teapot", host="ret.test"), 418, id="return-418"),
        pytest.param(request("GET", "/bare200", host="ret.test"), 200, id="return-200-bare"),
        pytest.param(request("GET", "/emptytext", host="ret.test"), 200, id="return-empty-text"),
        pytest.param(request("GET", "/notfound", host="ret.test"), 404, id="return-404-page"),
        pytest.param(request("GET", "/unprocessable", host="ret.test"), 422,
                     id="return-422-text"),
        pytest.param(request("GET", "/denied/x", host="ret.test"), 403, id="deny-all"),
        pytest.param(request("GET", "/allowed/x", host="ret.test"), 200, id="allow-first"),
        pytest.param(request("POST", "/small/x", body=b"x" * 11, host="ret.test"), 413,
                     id="body-too-large"),
        pytest.param(request("POST", "/small/x", body=b"x" * 10, host="ret.test"), 200,
                     id="body-at-limit"),
    ],
)
def test_local_answers(proxied: DiffPair, raw: bytes, status: int) -> None:
    """return, allow/deny and client_max_body_size answer without (or before) a backend."""
    s = compare(proxied.send(raw, method=raw.split(b" ", 1)[0].decode()))
    assert s.status == status


@pytest.mark.parametrize(
    ("target", "present", "absent"),
    [
        ("/nb-default/", ["X-Custom"], ["X-Pad", "X-Accel-Expires"]),
        ("/nb-hide/", [], ["X-Custom", "X-Pad", "X-Accel-Expires"]),
        ("/nb-pass/", ["X-Custom", "X-Pad", "X-Accel-Expires"], []),
    ],
)
def test_response_headers_hidden_and_passed(proxied: DiffPair, target: str,
                                            present: list[str], absent: list[str]) -> None:
    """Every response header but Date (and Server unless passed) is the same; the order
    of different names differs (D8): nginx puts Server, Date, Content-Type,
    Content-Length, Connection first, forklb relays the upstream's order and adds its
    own after. Names repeated keep their order in both."""
    n, f = proxied.send(request("GET", target, host="ret.test"))
    assert isinstance(n, Response) and isinstance(f, Response)
    passed = "pass" in target

    def relayed(r: Response) -> list[tuple[str, str]]:
        own = {"date"} if passed else {"date", "server"}
        return [(k, v) for k, v in r.headers if k.lower() not in own]

    assert sorted(relayed(f)) == sorted(relayed(n))
    upstream_order = ["Content-Type", "X-Backend", "X-Pad", "X-Accel-Expires", "X-Custom"]
    assert [k for k, _ in f.headers if k in upstream_order] == [
        k for k in upstream_order if f.has_header(k)]
    if not passed:  # (a passed Server goes among the upstream's fields in nginx)
        assert [k for k, _ in n.headers][:3] == ["Server", "Date", "Content-Type"]
    assert (n.status, n.body) == (f.status, f.body) == (200, b"nb\n")
    for name in present:
        assert n.has_header(name), name
    for name in absent:
        assert not n.has_header(name), name
    if passed:
        assert n.header("server") == f.header("server") == "nginx/1.22.1"


# --------------------------------------------------------------------------- config errors

_SERVER = "    server {\n        listen 127.0.0.1:1;\n%s\n    }\n"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_SERVER % "        location /a/ {\n location /b/ { } }", id="nested-outside"),
        pytest.param(_SERVER % "        location = /a {\n location /a/b { } }",
                     id="nested-in-exact"),
        pytest.param(_SERVER % "        location /a { }\n        location /a { }",
                     id="duplicate-location"),
        pytest.param(_SERVER % "        location / {\n proxy_pass http://127.0.0.1:9;\n"
                     "proxy_set_header X $nope; }", id="unknown-variable"),
        pytest.param(_SERVER % "        location ~ ^/(.*)$ {\n proxy_pass http://127.0.0.1:9;\n"
                     "proxy_set_header X ${1}; }", id="braced-capture"),
        pytest.param(_SERVER % "        location ~ ^/(.*)$ {\n proxy_pass http://127.0.0.1:9/x; }",
                     id="uri-part-in-regex-location"),
        pytest.param(_SERVER % "        locaton / { }", id="unknown-directive"),
        pytest.param(_SERVER % "        location / {\n proxy_pass http://127.0.0.1:9;\n"
                     "proxy_set_header X; }", id="wrong-arity"),
        pytest.param("    upstream u { server 127.0.0.1:9; }\n"
                     "    upstream u { server 127.0.0.1:9; }", id="duplicate-upstream"),
        pytest.param(_SERVER % "        location / {\n proxy_pass http://nohost.invalid; }",
                     id="host-not-found"),
        pytest.param("    server {\n        listen 127.0.0.1:1 reuseport default_server;\n    }\n"
                     "    server {\n        listen 127.0.0.1:1 backlog=9;\n    }",
                     id="reuseport-duplicate-listen-options"),
    ],
)
def test_config_errors_match_nginx(tmp_path, body: str) -> None:
    """``-t`` on a bad config: the same message, naming the same line of the shared part."""
    nginx = NginxProxy(tmp_path, body)
    for sub in ("conf", "logs", "temp"):
        (nginx.workdir / sub).mkdir(exist_ok=True)
    nginx_text = nginx.config_text()
    nginx.conf_path.write_text(nginx_text)
    ran = subprocess.run([NGINX_BIN, "-t", "-p", f"{nginx.workdir}/", "-c", str(nginx.conf_path),
                          "-e", str(nginx.error_log_path)], capture_output=True, text=True,
                         timeout=30)
    lb = ForkLB(tmp_path, forklb_config(body))
    ours = lb.cli("-t")
    assert (ran.returncode, ours.returncode) == (1, 1), (ran.stderr, ours.stderr)

    def emerg(output: str, text: str, path: Path) -> tuple[str, int | None]:
        """The [emerg] message and its line counted from the shared part's start."""
        line = next(li for li in output.splitlines() if "[emerg]" in li).split("] ", 1)[1]
        if f" in {path}:" not in line:
            return line, None
        message, _, where = line.rpartition(f" in {path}:")
        return message, int(where) - text[: text.index(body)].count("\n")

    theirs = emerg(ran.stderr, nginx_text, nginx.conf_path)
    mine = emerg(ours.stderr, lb.conf_path.read_text(), lb.conf_path)
    if theirs[1] is None:
        # D9: nginx names no place for an unknown variable; forklb names the directive's
        assert mine == (theirs[0], body[: body.index("proxy_set_header X ")].count("\n") + 1)
    else:
        assert mine == theirs
