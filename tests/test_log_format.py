"""Unit tests of forklb.log.line_renderer: access-log lines rendered from a real Exchange.

The e2e test ``test_access_log_escaping_matches_nginx`` compares whole log files with
nginx's; these check each path of the generated code on its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from forklb.http import protocol
from forklb.http.connection import Exchange
from forklb.http.variables import compile_template
from forklb.log import AccessLogFile, conditional, line_renderer
from forklb.model import LogBuffer

COMBINED = ('$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
            '"$http_referer" "$http_user_agent"')
NOON = 1_700_049_600.0  # 2023-11-15 12:00:00 UTC


@pytest.fixture(autouse=True)
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """TZ=UTC, and the process clock (which a worker's timer keeps current) at NOON."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    protocol.CLOCK.update(NOON)
    yield
    monkeypatch.undo()
    time.tzset()
    protocol.CLOCK.now()


def exchange(target: bytes = b"/small", method: bytes = b"GET", **attrs: object) -> Exchange:
    listener = SimpleNamespace(port=8080, host="127.0.0.1")
    conn = SimpleNamespace(remote_addr="192.0.2.7", remote_port=40000, serial=12, requests=3,
                           listener=listener, scheme="http")
    ex = Exchange(conn, 0.0)
    ex.method_b, ex.target_raw, ex.status, ex.body_bytes_sent = method, target, 200, 15
    for name, value in attrs.items():
        setattr(ex, name, value)
    return ex


def line(fmt: str, ex: Exchange, escape: str = "default") -> str:
    return line_renderer(compile_template(fmt), escape, end="\n")(ex)


def test_combined_line() -> None:
    assert line(COMBINED, exchange()) == (
        '192.0.2.7 - - [15/Nov/2023:12:00:00 +0000] "GET /small HTTP/1.1" 200 15 "-" "-"\n')


def test_headers_noted_while_parsing_are_shown() -> None:
    ex = exchange(header_map={"referer": "http://a/", "user-agent": "curl/8"})
    assert line(COMBINED, ex).endswith(' 200 15 "http://a/" "curl/8"\n')


def test_time_local_is_the_clocks_not_the_requests_start() -> None:
    ex = exchange()
    ex.start_time = NOON - 3600
    protocol.CLOCK.update(NOON + 61)
    assert "[15/Nov/2023:12:01:01 +0000]" in line(COMBINED, ex)


def test_request_line_keeps_the_method_error_page_replaced() -> None:
    ex = exchange(method=b"GET", request_method_b=b"POST", version="1.0")
    assert line('"$request"', ex) == '"POST /small HTTP/1.0"\n'


@pytest.mark.parametrize("method", [b"PROPFIND", b"MKCALENDAR", b"PATCH", b"HEAD"])
def test_request_line_with_any_method(method: bytes) -> None:
    assert line("$request", exchange(method=method)) == f"{method.decode()} /small HTTP/1.1\n"


def test_default_escape_of_request_and_header_values() -> None:
    ex = exchange(target=b'/p?q="x"\\y\x7f\xe9', header_map={"user-agent": "a\tb"})
    assert line('"$request" "$http_user_agent"', ex) == (
        '"GET /p?q=\\x22x\\x22\\x5Cy\\x7F\\xE9 HTTP/1.1" "a\\x09b"\n')


def test_json_escape() -> None:
    ex = exchange(target=b'/p?q="x"\\y\xe9', header_map={"user-agent": "a\tb\x01"})
    fmt = '{"r":"$request","ua":"$http_user_agent","ref":"$http_referer"}'
    assert line(fmt, ex, "json") == (
        '{"r":"GET /p?q=\\"x\\"\\\\y\xe9 HTTP/1.1","ua":"a\\tb\\u0001","ref":""}\n')


def test_escape_none_copies_values() -> None:
    ex = exchange(target=b'/p?"\\', header_map={"user-agent": "a\tb"})
    assert line("$request_uri|$http_user_agent|$http_referer", ex, "none") == '/p?"\\|a\tb|\n'


def test_empty_values_are_a_dash_only_with_escape_default() -> None:
    fmt = "[$upstream_addr][$http_x_missing][$remote_user]"
    assert line(fmt, exchange()) == "[-][-][-]\n"
    assert line(fmt, exchange(), "json") == "[][][]\n"


def test_numbers_are_never_a_dash() -> None:
    ex = exchange(status=0, body_bytes_sent=0)
    assert line("$status $body_bytes_sent", ex) == "0 0\n"


def test_values_read_through_the_connection() -> None:
    fmt = "$remote_addr:$remote_port $server_port #$connection/$connection_requests"
    assert line(fmt, exchange()) == "192.0.2.7:40000 8080 #12/3\n"


def test_forklbs_own_text_is_not_escaped_but_a_variable_called_is() -> None:
    ex = exchange(upstream_status="502", upstream_addr='10.0.0.1:80"')
    assert line("$upstream_status $upstream_addr", ex) == '502 10.0.0.1:80\\x22\n'


@pytest.mark.parametrize("literal", [
    "a'b", 'a"b', "a\\b", "{a}}", "{v0}", "é€", "\x01\n", "'); import os; ('", "\\U0000",
    "f'{x}'", "end\\",
])
def test_config_literal_text_is_copied_as_it_is(literal: str) -> None:
    """Literal text goes into the generated source: nothing in it may end the string,
    open a field or run."""
    assert line(f"{literal}${{status}}{literal}", exchange()) == f"{literal}200{literal}\n"


def test_a_format_without_variables() -> None:
    assert line("static text", exchange()) == "static text\n"


def test_log_file_writes_the_lines_on_flush(tmp_path) -> None:
    f = AccessLogFile(str(tmp_path / "logs" / "a.log"))
    render = line_renderer(compile_template("$request_uri é"), "none", end="\n")
    f.lines += [render(exchange(target=b"/x\xe9")), render(exchange(target=b"/y"))]
    assert (tmp_path / "logs" / "a.log").read_bytes() == b""
    f.flush()
    assert (tmp_path / "logs" / "a.log").read_bytes() == b"/x\xe9 \xe9\n/y \xe9\n"
    assert f.lines == []


def _append(f: AccessLogFile, text: str) -> None:
    """What a worker does with each line (Worker.access_log)."""
    f.lines.append(text)
    f.size += len(text)
    if f.size >= f.limit:
        f.spill()


def test_buffer_is_written_before_the_line_that_would_not_fit(tmp_path) -> None:
    path = tmp_path / "a.log"
    f = AccessLogFile(str(path), LogBuffer(30, None))
    for text in ("a" * 11 + "\n", "b" * 11 + "\n"):
        _append(f, text)
    assert path.read_bytes() == b""
    _append(f, "c" * 11 + "\n")  # 36 bytes: the first two go, this one waits
    assert path.read_bytes() == b"a" * 11 + b"\n" + b"b" * 11 + b"\n"
    assert (f.lines, f.size) == (["c" * 11 + "\n"], 12)


def test_a_line_longer_than_the_buffer_goes_at_once(tmp_path) -> None:
    path = tmp_path / "a.log"
    f = AccessLogFile(str(path), LogBuffer(30, None))
    _append(f, "a" * 9 + "\n")
    _append(f, "b" * 39 + "\n")
    assert path.read_bytes() == b"a" * 9 + b"\n" + b"b" * 39 + b"\n"
    assert (f.lines, f.size) == ([], 0)


def test_conditional_render_writes_nothing_for_empty_or_zero() -> None:
    render = conditional(line_renderer(compile_template("$http_x_log"), end="\n"),
                         compile_template("$http_x_log"))
    lines = [render(exchange(header_map=h)) for h in ({"x-log": "yes"}, {"x-log": "0"},
                                                      {"x-log": ""}, {})]
    assert lines == ["yes\n", "", "", ""]
