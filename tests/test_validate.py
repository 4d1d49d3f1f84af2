"""Unit tests of forklb.http.validate and of ClientConnection's parsing, no sockets."""

from __future__ import annotations

import httptools
import pytest
from parsing import socketless_connection

from forklb.http.connection import BadRequest
from forklb.http.validate import (
    ChunkScanner,
    Invalid,
    header_name_allowed,
    response_start_ok,
    transfer_coding,
)


def parse(*reads: bytes) -> tuple[list[tuple], int | None]:
    """Feed ``reads`` to a socket-less ClientConnection: (complete requests, error status)."""
    conn = socketless_connection()
    status = None
    try:
        for data in reads:
            conn._feed(data)
    except BadRequest as e:
        status = e.status
    done = [(ex.method_b, ex.target_raw, ex.headers, b"".join(ex.body), ex.chunked)
            for ex in conn.pending if ex.complete]
    return done, status


@pytest.mark.parametrize("name, ok", [
    (b"Host", True), (b"X-Forwarded-For", True), (b"X_Forwarded_For", False),
    (b"X.A", False), (b"X!A", False), (b"", False), (b"a1-B2", True),
])
def test_header_name_allowed(name, ok):
    assert header_name_allowed(name) is ok


@pytest.mark.parametrize("values, version, result", [
    ([], "1.1", False),
    ([b"chunked"], "1.1", True),
    ([b"CHUNKED"], "1.1", True),
    ([b" chunked\t"], "1.1", True),
    ([b"gzip, chunked"], "1.1", 501),
    ([b"gzip"], "1.1", 501),
    ([b"identity"], "1.1", 501),
    ([b"chunked, identity"], "1.1", 400),
    ([b"chunked, chunked"], "1.1", 400),
    ([b"chunked,"], "1.1", 400),
    ([b"chunked"], "1.0", 400),
    ([b"chunked", b"chunked"], "1.1", 400),
])
def test_transfer_coding(values, version, result):
    if isinstance(result, bool):
        assert transfer_coding(values, version) is result
    else:
        with pytest.raises(Invalid) as info:
            transfer_coding(values, version)
        assert info.value.status == result


def test_response_start():
    assert response_start_ok(b"HTTP/")
    assert response_start_ok(b"HT")
    assert not response_start_ok(b"RTSP/")
    assert not response_start_ok(b"<html")


def _scan(data: bytes, step: int) -> tuple[int, bool]:
    scanner = ChunkScanner()
    used = 0
    for i in range(0, len(data), step):
        used += scanner.advance(data[i:i + step])
        if scanner.done:
            break
    return used, scanner.done


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunk_scanner_finds_the_end_at_any_split(step):
    body = b"3;x=y\r\nabc\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\nT: v\r\n\r\n"
    assert _scan(body + b"GET / HTTP/1.1\r\n", step) == (len(body), True)


@pytest.mark.parametrize("body", [
    b"0" * 17 + b"3\r\nabc\r\n0\r\n\r\n",  # 18 digits, value 3
    b"3;" + b"e" * 5000 + b"\r\nabc\r\n0\r\n\r\n",
    b"3;" + b"e" * 5000,  # the extension is refused before its line ends
    b"-3\r\nabc\r\n0\r\n\r\n",
    b"0\r\n" + b"T: " + b"v" * 40000,
])
def test_chunk_scanner_refuses(body):
    with pytest.raises(Invalid):
        _scan(body, 1)
    with pytest.raises(Invalid):
        _scan(body, len(body))


def test_sixteen_digits_and_4k_extension_pass():
    assert _scan(b"0" * 15 + b"3;" + b"e" * 4000 + b"\r\nabc\r\n0\r\n\r\n", 5)[1]


GOOD = (b"GET /a HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz"
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n"
        b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n")


def test_pipelined_requests_parse_the_same_at_every_split():
    whole = parse(GOOD)
    assert whole[1] is None
    assert [r[1] for r in whole[0]] == [b"/a", b"/b", b"/c", b"/d"]
    assert whole[0][0][2] == [(b"Host", b"a")]  # X_Forwarded_For dropped
    assert whole[0][1][3] == b"xyz" and whole[0][2][3] == b"hi" and whole[0][2][4]
    for cut in range(1, len(GOOD)):
        assert parse(GOOD[:cut], GOOD[cut:]) == whole, cut
    assert parse(*(GOOD[i:i + 1] for i in range(len(GOOD)))) == whole


@pytest.mark.parametrize("raw, status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"00000000000000003\r\nabc\r\n0\r\n\r\n", 400),
])
def test_checks_llhttp_does_not_make(raw, status):
    assert parse(raw) == ([], status)
    assert parse(*(raw[i:i + 1] for i in range(len(raw))))[1] == status


def test_llhttp_callback_errors_come_out_as_bad_request():
    # The mechanism _feed relies on: an exception in on_headers_complete is the
    # parser error's __context__.
    class Proto:
        def on_headers_complete(self):
            raise BadRequest(501, "x")

    parser = httptools.HttpRequestParser(Proto())
    with pytest.raises(httptools.HttpParserError) as info:
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(info.value.__context__, BadRequest)
