"""Unit tests of forklb.http.protocol: pure HTTP/1.1 message pieces."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from forklb.http import protocol
from forklb.http.protocol import (
    HOP_BY_HOP_REQUEST,
    HOP_BY_HOP_RESPONSE,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    SERVER_NAME,
    CachedTime,
    chunk,
    connection_tokens,
    error_page,
    reason,
    simple_response,
)

DATE = b"Thu, 01 Jan 1970 00:00:00 GMT"


def split_response(raw: bytes) -> tuple[bytes, dict[bytes, bytes], list[bytes], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no end of header"
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return status, headers, [line.partition(b": ")[0] for line in lines], body


# -- connection_tokens ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "tokens"),
    [
        ([], set()),
        ([b"close"], set()),
        ([b"Close"], set()),
        ([b"keep-alive, Upgrade"], set()),
        ([b"close, X-Secret"], {b"x-secret"}),
        ([b"  TE ,  X-Custom  "], {b"te", b"x-custom"}),
        ([b"a", b"b, c"], {b"a", b"b", b"c"}),
        ([b"a,,b, ,"], {b"a", b"b"}),
        ([b""], set()),
    ],
)
def test_connection_tokens(values: list[bytes], tokens: set[bytes]) -> None:
    assert connection_tokens(values) == frozenset(tokens)


def test_connection_tokens_is_frozen() -> None:
    assert isinstance(connection_tokens([b"x-a"]), frozenset)


# -- chunk ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "framed"),
    [
        (b"hello", b"5\r\nhello\r\n"),
        (b"x" * 26, b"1a\r\n" + b"x" * 26 + b"\r\n"),
        (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
        (b"\r\n", b"2\r\n\r\n\r\n"),
    ],
)
def test_chunk(data: bytes, framed: bytes) -> None:
    assert chunk(data) == framed


def test_chunk_size_is_lower_case_hex_without_padding() -> None:
    assert chunk(b"y" * 255).startswith(b"ff\r\n")


def test_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_chunks_concatenate_into_a_parsable_body() -> None:
    body = chunk(b"Wiki") + chunk(b"pedia") + LAST_CHUNK
    assert body == b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"


# -- reason ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(200, b"OK"), (404, b"Not Found"), (502, b"Bad Gateway"), (504, b"Gateway Timeout"),
     (400, b"Bad Request"), (301, b"Moved Permanently"), (599, b"Unknown"), (499, b"Unknown")],
)
def test_reason(status: int, phrase: bytes) -> None:
    assert reason(status) == phrase


# -- error_page -------------------------------------------------------------------------


def test_error_page_is_nginx_layout() -> None:
    assert error_page(502) == (
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>forklb</center>\r\n"
        b"</body>\r\n</html>\r\n"
    )


@pytest.mark.parametrize("status", [400, 404, 500, 503, 504])
def test_error_page_names_the_status(status: int) -> None:
    title = b"%d %s" % (status, reason(status))
    page = error_page(status)
    assert page.count(title) == 2 and SERVER_NAME in page


# -- simple_response ---------------------------------------------------------------------


def test_simple_response_status_line_and_headers() -> None:
    status, headers, order, body = split_response(simple_response(404, DATE))
    assert status == b"HTTP/1.1 404 Not Found"
    assert order == [b"Server", b"Date", b"Content-Type", b"Content-Length", b"Connection"]
    assert headers[b"server"] == b"forklb"
    assert headers[b"date"] == DATE
    assert headers[b"content-type"] == b"text/html"
    assert body == error_page(404)


@pytest.mark.parametrize("status", [400, 404, 502, 504])
def test_content_length_matches_the_default_body(status: int) -> None:
    _status, headers, _order, body = split_response(simple_response(status, DATE))
    assert int(headers[b"content-length"]) == len(body) == len(error_page(status))


@pytest.mark.parametrize("body", [b"", b"ok", b"x" * 10000, "\u00e9t\u00e9".encode()])
def test_content_length_matches_a_given_body(body: bytes) -> None:
    _status, headers, _order, sent = split_response(simple_response(200, DATE, body))
    assert sent == body and int(headers[b"content-length"]) == len(body)


def test_head_response_has_no_body_but_the_same_content_length() -> None:
    full = simple_response(502, DATE)
    head = simple_response(502, DATE, head_only=True)
    _s, headers, _o, body = split_response(head)
    assert body == b""
    assert int(headers[b"content-length"]) == len(error_page(502))
    assert full.startswith(head) and head.endswith(b"\r\n\r\n")


def test_head_response_with_a_given_body() -> None:
    raw = simple_response(200, DATE, b"hello", head_only=True)
    _s, headers, _o, body = split_response(raw)
    assert (body, headers[b"content-length"]) == (b"", b"5")


@pytest.mark.parametrize(("keep_alive", "value"), [(False, b"close"), (True, b"keep-alive")])
def test_connection_header(keep_alive: bool, value: bytes) -> None:
    _s, headers, _o, _b = split_response(simple_response(400, DATE, keep_alive=keep_alive))
    assert headers[b"connection"] == value


def test_content_type_can_be_set() -> None:
    raw = simple_response(200, DATE, b"{}", content_type=b"application/json")
    assert split_response(raw)[1][b"content-type"] == b"application/json"


def test_extra_headers_follow_the_standard_ones() -> None:
    raw = simple_response(301, DATE, b"", extra=((b"Location", b"http://x/"), (b"X-A", b"1")))
    _s, headers, order, _b = split_response(raw)
    assert order[-2:] == [b"Location", b"X-A"]
    assert headers[b"location"] == b"http://x/"


def test_response_is_one_header_block_then_body() -> None:
    raw = simple_response(200, DATE, b"a\r\n\r\nb")
    assert raw.count(b"\r\n\r\n") == 2 and raw.endswith(b"a\r\n\r\nb")


# -- CachedTime ----------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A fake clock for protocol.CachedTime, in UTC; counts the seconds formatted."""
    state = SimpleNamespace(now=0.0, gmtime_calls=0)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()

    def gmtime(seconds: float) -> time.struct_time:
        state.gmtime_calls += 1
        return time.gmtime(seconds)

    fake = SimpleNamespace(time=lambda: state.now, strftime=time.strftime, gmtime=gmtime,
                           localtime=time.localtime)
    monkeypatch.setattr(protocol, "time", fake)
    yield state
    monkeypatch.undo()
    time.tzset()


def test_http_date_format(clock: SimpleNamespace) -> None:
    clock.now = 0.0
    assert CachedTime().now() == DATE


def test_http_date_of_a_known_time(clock: SimpleNamespace) -> None:
    clock.now = 784111777.9  # RFC 9110's example date
    assert CachedTime().now() == b"Sun, 06 Nov 1994 08:49:37 GMT"


def test_http_date_is_cached_within_a_second(clock: SimpleNamespace) -> None:
    clock.now = 100.1
    d = CachedTime()
    first = d.now()
    clock.now = 100.9
    assert d.now() is first
    assert clock.gmtime_calls == 1


def test_http_date_changes_with_the_second(clock: SimpleNamespace) -> None:
    clock.now = 100.9
    d = CachedTime()
    first = d.now()
    clock.now = 101.0
    second = d.now()
    assert first != second and second.endswith(b":41 GMT") and clock.gmtime_calls == 2


def test_update_formats_every_string_of_that_second(clock: SimpleNamespace) -> None:
    d = CachedTime()
    d.update(86400.0 + 3661.5)
    assert d.second == 90061
    assert d.http_date == b"Fri, 02 Jan 1970 01:01:01 GMT"
    assert d.own_lines == b"Server: forklb\r\nDate: Fri, 02 Jan 1970 01:01:01 GMT\r\n"
    assert d.time_local == "02/Jan/1970:01:01:01 +0000"
    assert d.time_iso8601 == "1970-01-02T01:01:01+00:00"


def test_update_within_the_same_second_keeps_the_strings(clock: SimpleNamespace) -> None:
    d = CachedTime()
    d.update(500.2)
    first = d.time_local
    d.update(500.8)
    assert d.time_local is first and clock.gmtime_calls == 2  # at creation, then 500


def test_attributes_are_not_refreshed_by_reading_them(clock: SimpleNamespace) -> None:
    """The hot path reads the attributes; only update() and now() ask the clock
    (a worker's timer calls update() every second)."""
    clock.now = 10.0
    d = CachedTime()
    clock.now = 20.0
    assert d.http_date.endswith(b":10 GMT")
    assert d.now().endswith(b":20 GMT") and d.http_date.endswith(b":20 GMT")


def test_http_date_with_real_clock_looks_right() -> None:
    value = CachedTime().now()
    assert value.endswith(b" GMT") and len(value) == len(DATE)
    time.strptime(value.decode(), "%a, %d %b %Y %H:%M:%S GMT")


# -- header sets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"transfer-encoding",
             b"proxy-connection", b"host", b"content-length", b"expect"],
)
def test_hop_by_hop_request_headers(name: bytes) -> None:
    assert name in HOP_BY_HOP_REQUEST


@pytest.mark.parametrize(
    "name", [b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date",
             b"server", b"x-pad", b"upgrade"],
)
def test_hop_by_hop_response_headers(name: bytes) -> None:
    assert name in HOP_BY_HOP_RESPONSE


@pytest.mark.parametrize("name", [b"content-type", b"cookie", b"authorization", b"x-forwarded-for"])
def test_end_to_end_request_headers_are_forwarded(name: bytes) -> None:
    assert name not in HOP_BY_HOP_REQUEST


@pytest.mark.parametrize("name", [b"content-type", b"set-cookie", b"location", b"etag"])
def test_end_to_end_response_headers_are_forwarded(name: bytes) -> None:
    assert name not in HOP_BY_HOP_RESPONSE


def test_header_sets_are_lower_case() -> None:
    for name in HOP_BY_HOP_REQUEST | HOP_BY_HOP_RESPONSE:
        assert name == name.lower()


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [(b"GET", True), (b"HEAD", True), (b"PUT", True), (b"DELETE", True), (b"OPTIONS", True),
     (b"TRACE", True), (b"POST", False), (b"PATCH", False), (b"CONNECT", False)],
)
def test_idempotent_methods(method: bytes, idempotent: bool) -> None:
    assert (method in IDEMPOTENT_METHODS) is idempotent
