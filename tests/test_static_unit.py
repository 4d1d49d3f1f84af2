"""Unit tests of the pure parts of static files and error pages: range parsing,
ETag and conditional logic, try_files resolution, path mapping, and the
``alias``/``try_files``/``error_page`` directives (messages checked with
``nginx -t`` 1.22 on the same files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forklb.config import ConfigError, load
from forklb.http.static import (
    FULL,
    PARTIAL,
    REGEX_ALIAS,
    UNSATISFIABLE,
    etag,
    etag_matches,
    http_date,
    if_range_allows,
    map_uri,
    parse_http_date,
    parse_range,
    path_kind,
    precondition,
    resolve_try_files,
)

MTIME = 1_800_000_000
TAG = etag(MTIME, 10)
LM = http_date(MTIME)


# -- ranges (ngx_http_range_parse) ---------------------------------------------------

@pytest.mark.parametrize(("header", "expected"), [
    (b"bytes=2-4", (PARTIAL, 2, 5)),
    (b"bytes=2-", (PARTIAL, 2, 10)),
    (b"bytes=-3", (PARTIAL, 7, 10)),
    (b"bytes=-30", (PARTIAL, 0, 10)),  # a suffix longer than the file: all of it
    (b"bytes=0-99", (PARTIAL, 0, 10)),  # the end is clamped
    (b"BYTES= 1 - 2 ", (PARTIAL, 1, 3)),  # nginx skips spaces, "bytes=" is case-blind
    (b"bytes=9-9", (PARTIAL, 9, 10)),
    (b"bytes=10-", (UNSATISFIABLE, 0, 0)),
    (b"bytes=20-30", (UNSATISFIABLE, 0, 0)),
    (b"bytes=5-2", (UNSATISFIABLE, 0, 0)),
    (b"bytes=-0", (UNSATISFIABLE, 0, 0)),
    (b"bytes=0-0,-0", (PARTIAL, 0, 1)),  # the empty range is dropped
    (b"bytes=a-b", (UNSATISFIABLE, 0, 0)),
    (b"bytes=1", (UNSATISFIABLE, 0, 0)),
    (b"bytes=-", (UNSATISFIABLE, 0, 0)),
    (b"bytes=0-1,4-5", (FULL, 0, 10)),  # several ranges: the whole file (no multipart)
    (b"items=1-2", (FULL, 0, 10)),  # not a byte range: ignored
])
def test_parse_range(header: bytes, expected: tuple) -> None:
    assert parse_range(header, 10) == expected


def test_parse_range_empty_file() -> None:
    assert parse_range(b"bytes=0-", 0) == (FULL, 0, 0)  # start 0 on nothing: declined
    assert parse_range(b"bytes=1-1", 0) == (UNSATISFIABLE, 0, 0)


def test_if_range() -> None:
    assert if_range_allows(None, TAG, MTIME)
    assert if_range_allows(TAG, TAG, MTIME)
    assert not if_range_allows(b'"other"', TAG, MTIME)
    assert if_range_allows(LM, TAG, MTIME)
    assert not if_range_allows(http_date(MTIME - 1), TAG, MTIME)


# -- ETag, dates and preconditions ----------------------------------------------------

def test_etag_is_nginx_format() -> None:
    assert etag(0x6B0F5827, 10) == b'"6b0f5827-a"'
    assert etag(1, 0) == b'"1-0"'


def test_http_dates_round_trip_in_all_three_formats() -> None:
    assert http_date(784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    for text in (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT",
                 b"Sun Nov  6 08:49:37 1994"):
        assert parse_http_date(text) == 784111777, text
    assert parse_http_date(b"yesterday") is None


def test_etag_matches() -> None:
    assert etag_matches(b"*", TAG, weak=False)
    assert etag_matches(b'"x", ' + TAG, TAG, weak=True)
    assert etag_matches(b"W/" + TAG, TAG, weak=True)
    assert not etag_matches(b"W/" + TAG, TAG, weak=False)  # If-Match compares strongly
    assert not etag_matches(b'"x"', TAG, weak=True)


@pytest.mark.parametrize(("headers", "verdict"), [
    ({}, None),
    ({b"if-modified-since": LM}, 304),
    ({b"if-modified-since": http_date(MTIME + 60)}, None),  # nginx's default is "exact"
    ({b"if-modified-since": http_date(MTIME - 60)}, None),
    ({b"if-modified-since": b"garbage"}, None),
    ({b"if-none-match": TAG}, 304),
    ({b"if-none-match": b'"nope"'}, None),
    ({b"if-none-match": TAG, b"if-modified-since": http_date(MTIME - 1)}, None),  # both must hold
    ({b"if-none-match": TAG, b"if-modified-since": LM}, 304),
    ({b"if-match": b'"nope"'}, 412),
    ({b"if-match": TAG}, None),
    ({b"if-unmodified-since": http_date(MTIME - 1)}, 412),
    ({b"if-unmodified-since": LM}, None),
])
def test_precondition(headers: dict, verdict: int | None) -> None:
    assert precondition(headers, TAG, MTIME) == verdict


# -- paths and try_files ----------------------------------------------------------------

def test_map_uri_root_and_alias() -> None:
    assert map_uri("/a/b.txt", "/srv/www", None) == "/srv/www/a/b.txt"
    assert map_uri("/img/x.png", "/data/pics/", len("/img/")) == "/data/pics/x.png"
    assert map_uri("/img", "/data/pics/", len("/img")) == "/data/pics/"
    assert map_uri("/anything.php", "/srv/one.php", REGEX_ALIAS) == "/srv/one.php"


def test_map_uri_refuses_to_climb_out_of_an_alias() -> None:
    # location /i { alias /data/w/; }: "/i../etc/passwd" would be /data/w/../etc/passwd
    assert map_uri("/i../etc/passwd", "/data/w/", len("/i")) is None
    assert map_uri("/i..x", "/data/w/", len("/i")) == "/data/w/..x"  # just a name


def test_resolve_try_files(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()

    def to_path(name: str) -> str:
        return str(tmp_path) + name

    def resolve(*tries: tuple[str, bool]) -> str | None:
        return resolve_try_files(tries, to_path, path_kind)

    assert resolve(("/f.txt", False)) == "/f.txt"
    assert resolve(("/f.txt", True)) is None  # "$uri/" wants a directory
    assert resolve(("/d", False), ("/d", True)) == "/d"  # a directory is not a file
    assert resolve(("/missing", False), ("/missing", True)) is None
    assert resolve(("/missing", False), ("/f.txt", False)) == "/f.txt"


# -- directives --------------------------------------------------------------------------

def _load(tmp_path: Path, server: str, http: str = ""):
    (tmp_path / "nginx.conf").write_text(
        "events {}\nhttp {\n" + http + "\nserver {\n" + server + "\n}\n}\n")
    return load("nginx.conf", prefix=str(tmp_path))


def _error(tmp_path: Path, server: str, http: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, server, http)
    return str(info.value)


def test_alias_and_root_in_one_location_are_refused(tmp_path: Path) -> None:
    msg = _error(tmp_path, "location /a/ {\n root /x;\n alias /y/;\n}")
    assert '"alias" directive is duplicate, "root" directive was specified earlier' in msg
    assert "nginx.conf:7" in msg
    msg = _error(tmp_path, "location /a/ {\n alias /y/;\n root /x;\n}")
    assert '"root" directive is duplicate, "alias" directive was specified earlier' in msg
    assert "nginx.conf:7" in msg


def test_alias_with_inherited_root_is_fine(tmp_path: Path) -> None:
    loc = _load(tmp_path, "root /srv;\nlocation /a/ { alias /y/; }").http.servers[0].locations[0]
    assert loc.alias == "/y/"


def test_alias_in_named_location(tmp_path: Path) -> None:
    msg = _error(tmp_path, "location @x { alias /y/; }")
    assert 'the "alias" directive cannot be used inside the named location' in msg


@pytest.mark.parametrize(("args", "message"), [
    ("404", 'invalid number of arguments in "error_page" directive'),
    ("abc /x", 'invalid value "abc"'),
    ("200 /x", 'value "200" must be between 300 and 599'),
    ("600 /x", 'value "600" must be between 300 and 599'),
    ("499 /x", 'invalid value "499"'),
    ("404 =abc /x", 'invalid value "=abc"'),
    ("=200 /x", 'invalid value "=200"'),
])
def test_error_page_errors(tmp_path: Path, args: str, message: str) -> None:
    msg = _error(tmp_path, f"error_page {args};")
    assert message in msg
    assert "nginx.conf:5" in msg


def test_error_page_values_and_inheritance(tmp_path: Path) -> None:
    server = _load(tmp_path, "location /a/ { }\nlocation /b/ { error_page 500 =200 /b.html; }",
                   http="error_page 404 403 /e.html;\nerror_page 404 =302 http://x/;").http.servers[0]
    a, b, level = server.locations
    assert set(a.error_pages) == {403, 404}
    assert a.error_pages[404].uri.source == "/e.html"  # the first directive for a code wins
    assert a.error_pages[404].overwrite == -1
    assert set(b.error_pages) == {500}  # a level with its own error_page inherits none
    assert b.error_pages[500].overwrite == 200
    assert level.error_pages == a.error_pages


def test_try_files_values(tmp_path: Path) -> None:
    server = _load(tmp_path, "location / { try_files $uri $uri/ /index.html; }\n"
                             "location /c/ { try_files $uri =404; }").http.servers[0]
    tf = server.locations[0].try_files
    assert [(t.source, d) for t, d in tf.tries] == [("$uri", False), ("$uri", True)]
    assert tf.fallback.source == "/index.html" and tf.code is None
    assert server.locations[1].try_files.code == 404
    assert server.locations[2].try_files is None  # not inherited


def test_try_files_errors(tmp_path: Path) -> None:
    assert 'invalid code "=abc"' in _error(tmp_path, "location / { try_files $uri =abc; }")
    assert 'invalid number of arguments in "try_files"' in _error(
        tmp_path, "location / { try_files $uri; }")
    assert '"try_files" directive is not allowed here' in _error(tmp_path, "", "try_files a b;")


def test_named_locations_are_listed_and_never_matched(tmp_path: Path) -> None:
    from forklb.http.routing import LocationMatcher

    server = _load(tmp_path, "location @back { }\nlocation / { }").http.servers[0]
    assert list(server.named) == ["@back"]
    assert LocationMatcher(server.locations).match("/@back").pattern == "/"


def test_types_per_server_and_location(tmp_path: Path) -> None:
    server = _load(tmp_path, "types { text/css css; }\n"
                             "location /a/ { types { image/png png; } }\nlocation /b/ { }",
                   http="types { text/html html; }").http.servers[0]
    a, b, level = server.locations
    assert dict(a.mime_types) == {"png": "image/png"}  # its own types replace the server's
    assert dict(b.mime_types) == {"css": "text/css"} == dict(level.mime_types)
    assert _load(tmp_path, "location / { }").http.servers[0].locations[0].mime_types is None
