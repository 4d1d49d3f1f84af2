"""Unit tests of forklb.http.variables: $variables compiled into templates."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from types import SimpleNamespace

import pytest

from forklb.http import protocol, variables
from forklb.http.variables import (
    VARIABLES,
    Template,
    UnknownVariable,
    compile_template,
    getter,
)


class FakeRequest:
    """Just what the getters read: plain attributes and ``header(name)``."""

    def __init__(self, headers: dict[str, str] | None = None, **attrs: object) -> None:
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.asked: list[str] = []
        defaults = dict(
            host="example.org", remote_addr="192.0.2.1", remote_port=54321,
            request_line="GET /a?b=1 HTTP/1.1", method="GET", target="/a?b=1", uri="/a",
            args="b=1", protocol="HTTP/1.1", server_port=8080, server_addr="0.0.0.0",
            server_name="example.org", proxy_host="backend:9000", status=200,
            body_bytes_sent=1234, bytes_sent=1500, upstream_addr="127.0.0.1:9000",
            upstream_status="200", upstream_response_time="0.012", start_time=0.0, pid=4242,
            connection_id=7, connection_requests=3, scheme="http", https="",
            ssl_protocol="TLSv1.3", ssl_cipher="TLS_AES_256_GCM_SHA384",
            ssl_server_name="example.org",
        )
        defaults.update(attrs)
        for name, value in defaults.items():
            setattr(self, name, value)

    def header(self, name: str) -> str:
        self.asked.append(name)
        return self._headers.get(name, "")


def render(text: str, empty: str = "", **kw: object) -> str:
    return compile_template(text).render(FakeRequest(**kw), empty)


@pytest.fixture
def utc() -> Iterator[None]:
    """Run with TZ=UTC so local-time variables are predictable."""
    import os

    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(time=lambda: 1000.25, strftime=time.strftime,
                           localtime=time.localtime)
    monkeypatch.setattr(variables, "time", fake)


# -- compiling ------------------------------------------------------------------


def test_literal_text() -> None:
    t = compile_template("plain text")
    assert (t.parts, t.is_literal, t.source) == (("plain text",), True, "plain text")
    assert t.render(FakeRequest()) == "plain text"


def test_empty_text() -> None:
    t = compile_template("")
    assert t.parts == () and t.is_literal and t.render(FakeRequest()) == ""


def test_variable_is_not_literal() -> None:
    t = compile_template("$host")
    assert not t.is_literal and len(t.parts) == 1 and callable(t.parts[0])


def test_parts_split_around_variables() -> None:
    t = compile_template("a ${host} b $remote_addr")
    assert [p if isinstance(p, str) else "<var>" for p in t.parts] == [
        "a ", "<var>", " b ", "<var>",
    ]


def test_source_is_kept() -> None:
    assert compile_template("x$host").source == "x$host"


def test_template_is_frozen() -> None:
    t = compile_template("$host")
    with pytest.raises(FrozenInstanceError):
        t.source = "other"  # type: ignore[misc]


def test_template_type() -> None:
    assert isinstance(compile_template("x"), Template)


# -- rendering ------------------------------------------------------------------


def test_single_variable() -> None:
    assert render("$host") == "example.org"


def test_braced_variable() -> None:
    assert render("${host}") == "example.org"


def test_braces_separate_a_name_from_following_letters() -> None:
    assert render("${host}name") == "example.orgname"


def test_name_stops_at_non_name_characters() -> None:
    assert render("$host:$server_port/$uri?") == "example.org:8080//a?"


def test_adjacent_variables() -> None:
    assert render("$remote_addr$remote_port") == "192.0.2.154321"


def test_mixed_text_and_variables() -> None:
    assert render('"$request" $status') == '"GET /a?b=1 HTTP/1.1" 200'


def test_name_without_braces_is_greedy() -> None:
    with pytest.raises(UnknownVariable) as info:
        compile_template("$hostname_x")
    assert info.value.name == "hostname_x"


@pytest.mark.parametrize("text", ["$", "a$", "5$ each", "$-x", "$.", "${", "${}", "$ host"])
def test_dollar_without_a_name_is_literal(text: str) -> None:
    t = compile_template(text)
    assert t.is_literal and t.render(FakeRequest()) == text


def test_unknown_variable() -> None:
    with pytest.raises(UnknownVariable) as info:
        compile_template("x $foo y")
    assert info.value.name == "foo"
    assert str(info.value) == 'unknown "foo" variable'
    assert isinstance(info.value, ValueError)


def test_unknown_braced_variable() -> None:
    with pytest.raises(UnknownVariable) as info:
        compile_template("${foo}bar")
    assert info.value.name == "foo"


def test_first_unknown_variable_is_reported() -> None:
    with pytest.raises(UnknownVariable) as info:
        compile_template("$host $bad1 $bad2")
    assert info.value.name == "bad1"


def test_empty_variable_renders_empty_by_default() -> None:
    assert render("[$remote_user]") == "[]"


def test_empty_variable_renders_as_given_placeholder() -> None:
    assert render("[$remote_user] [$http_referer] [$host]", empty="-") == "[-] [-] [example.org]"


def test_placeholder_does_not_touch_literal_text() -> None:
    assert render("", empty="-") == "" and render("x", empty="-") == "x"


def test_render_reads_the_request_each_time() -> None:
    t = compile_template("$host")
    assert [t.render(FakeRequest(host=h)) for h in ("a", "b")] == ["a", "b"]


# -- headers ----------------------------------------------------------------------


def test_http_header_variable() -> None:
    req = FakeRequest(headers={"X-Forwarded-For": "10.0.0.1"})
    assert compile_template("$http_x_forwarded_for").render(req) == "10.0.0.1"
    assert req.asked == ["x-forwarded-for"]


@pytest.mark.parametrize(
    ("name", "header"),
    [("http_user_agent", "user-agent"), ("http_referer", "referer"), ("http_host", "host"),
     ("http_x_real_ip", "x-real-ip"), ("http_a", "a")],
)
def test_http_variables_map_underscores_to_dashes(name: str, header: str) -> None:
    req = FakeRequest()
    compile_template(f"${name}").render(req)
    assert req.asked == [header]


def test_missing_header_is_empty() -> None:
    assert render("[$http_x_missing]") == "[]"


def test_bare_http_prefix_is_unknown() -> None:
    with pytest.raises(UnknownVariable):
        compile_template("$http_")


def test_variable_names_are_case_insensitive() -> None:
    assert render("$HOST") == "example.org"


def test_http_variable_with_upper_case_name_reads_the_header() -> None:
    assert render("$http_X_Real_IP", headers={"x-real-ip": "10.9.9.9"}) == "10.9.9.9"


# -- $proxy_add_x_forwarded_for --------------------------------------------------------


def test_proxy_add_x_forwarded_for_without_incoming_header() -> None:
    assert render("$proxy_add_x_forwarded_for") == "192.0.2.1"


def test_proxy_add_x_forwarded_for_appends_client_address() -> None:
    out = render("$proxy_add_x_forwarded_for", headers={"X-Forwarded-For": "10.0.0.1"})
    assert out == "10.0.0.1, 192.0.2.1"


def test_proxy_add_x_forwarded_for_with_a_chain() -> None:
    out = render("$proxy_add_x_forwarded_for",
                 headers={"x-forwarded-for": "203.0.113.9, 10.0.0.1"}, remote_addr="10.0.0.2")
    assert out == "203.0.113.9, 10.0.0.1, 10.0.0.2"


# -- every simple variable ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("host", "example.org"),
        ("remote_addr", "192.0.2.1"),
        ("remote_port", "54321"),
        ("remote_user", ""),
        ("request", "GET /a?b=1 HTTP/1.1"),
        ("request_method", "GET"),
        ("request_uri", "/a?b=1"),
        ("uri", "/a"),
        ("document_uri", "/a"),
        ("args", "b=1"),
        ("query_string", "b=1"),
        ("scheme", "http"),
        ("https", ""),
        ("ssl_protocol", "TLSv1.3"),
        ("ssl_cipher", "TLS_AES_256_GCM_SHA384"),
        ("ssl_server_name", "example.org"),
        ("server_protocol", "HTTP/1.1"),
        ("server_port", "8080"),
        ("server_addr", "0.0.0.0"),
        ("server_name", "example.org"),
        ("proxy_host", "backend:9000"),
        ("status", "200"),
        ("body_bytes_sent", "1234"),
        ("bytes_sent", "1500"),
        ("upstream_addr", "127.0.0.1:9000"),
        ("upstream_status", "200"),
        ("upstream_response_time", "0.012"),
        ("pid", "4242"),
        ("connection", "7"),
        ("connection_requests", "3"),
    ],
)
def test_simple_variables(name: str, expected: str) -> None:
    assert render(f"${name}") == expected


def test_every_listed_variable_has_a_getter() -> None:
    for name in VARIABLES:
        assert getter(name) is VARIABLES[name]


def test_getter_of_unknown_name_is_none() -> None:
    assert getter("no_such_variable") is None
    assert getter("http_x") is not None


def test_zero_numbers_are_not_empty() -> None:
    assert render("$body_bytes_sent", empty="-", body_bytes_sent=0) == "0"


# -- time variables -------------------------------------------------------------------


@pytest.fixture
def clock_at(utc: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """protocol.CLOCK reads a fake time (``.now``), in UTC; put right afterwards."""
    state = SimpleNamespace(now=0.0)
    fake = SimpleNamespace(time=lambda: state.now, strftime=time.strftime,
                           gmtime=time.gmtime, localtime=time.localtime)
    monkeypatch.setattr(protocol, "time", fake)
    yield state
    monkeypatch.undo()
    protocol.CLOCK.now()


def test_time_local_is_the_time_now(clock_at: SimpleNamespace) -> None:
    """nginx's $time_local is the (cached) time when it is read, not the request's start."""
    clock_at.now = 86400.0 + 3661
    assert render("$time_local", start_time=5.0) == "02/Jan/1970:01:01:01 +0000"
    clock_at.now += 1
    assert render("$time_local") == "02/Jan/1970:01:01:02 +0000"


def test_time_iso8601_date_and_time(clock_at: SimpleNamespace) -> None:
    assert render("$time_iso8601", start_time=99.0).startswith("1970-01-01T00:00:00")


def test_time_iso8601_offset_has_a_colon(clock_at: SimpleNamespace) -> None:
    assert render("$time_iso8601") == "1970-01-01T00:00:00+00:00"


def test_request_time(frozen_clock: None) -> None:
    assert render("$request_time", start_time=999.0) == "1.250"


def test_msec(frozen_clock: None) -> None:
    assert render("$msec") == "1000.250"
