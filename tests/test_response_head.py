"""forklb.http.response_head: an upstream's response head read with llhttp and
rewritten for the client as bytes (no sockets)."""

from __future__ import annotations

import httptools
import pytest

from forklb.http.protocol import HOP_BY_HOP_RESPONSE
from forklb.http.response_head import HEAD_MAX, ResponseHead, hidden_lines
from forklb.http.validate import Invalid

NGINX_REPLY = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 05:00:00 GMT\r\n"
               b"Content-Type: text/plain\r\nContent-Length: 15\r\n"
               b"Last-Modified: Wed, 02 Dec 2026 04:00:00 GMT\r\nConnection: keep-alive\r\n"
               b'ETag: "6a2f-f"\r\nX-Backend: b1\r\nAccept-Ranges: bytes\r\n\r\n'
               b"fifteen bytes!\n")


def read(*pieces: bytes, head_request: bool = False) -> ResponseHead:
    resp = ResponseHead(head_request)
    for piece in pieces:
        resp.feed(piece)
    return resp


def test_usual_reply_in_one_read() -> None:
    resp = read(NGINX_REPLY)
    assert (resp.status, resp.reason, resp.content_length) == (200, b"OK", 15)
    assert resp.headers_done and resp.complete and resp.keep_alive and resp.regular
    assert resp.block.startswith(b"Server: nginx/1.22.1\r\n")
    assert resp.block.endswith(b"Accept-Ranges: bytes\r\n")
    assert b"".join(resp.body) == b"fifteen bytes!\n"
    assert resp.received == b""  # not kept once the head is taken


def test_head_split_at_every_byte_gives_the_same_head() -> None:
    whole = read(NGINX_REPLY)
    pieces = read(*(NGINX_REPLY[i:i + 1] for i in range(len(NGINX_REPLY))))
    assert (pieces.block, pieces.reason, pieces.content_length, pieces.status) == \
        (whole.block, whole.reason, whole.content_length, whole.status)
    assert b"".join(pieces.body) == b"fifteen bytes!\n"


def test_interim_responses_are_skipped() -> None:
    resp = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n")
    assert (resp.status, resp.reason) == (404, b"Not Found")
    assert resp.block == b"Content-Length: 0\r\nX-A: 1\r\n"


def test_status_line_without_reason_and_no_headers() -> None:
    resp = read(b"HTTP/1.0 204\r\n\r\n")
    assert (resp.status, resp.reason, resp.block, resp.content_length) == (204, b"", b"", None)


@pytest.mark.parametrize("line", [b"X:a", b"X:  a", b"X: a ", b"X: a\t", b"X:\ta", b"X: "])
def test_irregular_lines_are_rebuilt(line: bytes) -> None:
    resp = read(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")
    assert not resp.regular
    assert resp.header_pairs() == [(b"X", line.partition(b":")[2].strip(b" \t")),
                                   (b"Content-Length", b"0")]


def test_values_with_colons_and_inner_spaces_are_regular() -> None:
    resp = read(b"HTTP/1.1 302 Found\r\nLocation: http://a:80/b c\r\nContent-Length: 0\r\n\r\n")
    assert resp.regular


def test_connection_listing_a_header_is_not_regular() -> None:
    resp = read(b"HTTP/1.1 200 OK\r\nConnection: X-Hop, close\r\nX-Hop: 1\r\n"
                b"Content-Length: 0\r\n\r\n")
    assert resp.listed == frozenset({b"x-hop"}) and not resp.regular
    assert not resp.keep_alive


def test_framing_headers_in_any_case() -> None:
    resp = read(b"HTTP/1.1 200 OK\r\ncOnTeNt-LeNgTh: 7\r\n\r\n")
    assert resp.content_length == 7
    chunked = read(b"HTTP/1.1 200 OK\r\ntransfer-ENCODING:  chunked \r\n\r\n0\r\n\r\n")
    assert chunked.codings == [b"chunked"] and chunked.complete


def test_unknown_transfer_coding_is_refused() -> None:
    with pytest.raises(Invalid) as e:
        read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert e.value.status == 501


@pytest.mark.parametrize("reply", [b"RTSP/1.0 200 OK\r\n\r\n", b"ICE/1.0 200 OK\r\n\r\n",
                                   b"<html>"])
def test_not_http_is_refused(reply: bytes) -> None:
    with pytest.raises(Invalid):
        read(reply[:2], reply[2:])


@pytest.mark.parametrize("reply", [b"HTTP/1.1 200 OK\nX: a\n\n", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nX: a\x01\r\n\r\n"])
def test_what_would_make_raw_lines_ambiguous_is_refused_by_llhttp(reply: bytes) -> None:
    with pytest.raises(httptools.HttpParserError):
        read(reply)


def test_a_head_over_the_limit_is_refused_as_it_grows() -> None:
    resp = ResponseHead(False)
    resp.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(Invalid) as e:
        for _ in range(HEAD_MAX // 1000 + 1):
            resp.feed(b"X-Big: " + b"a" * 991 + b"\r\n")
    assert "too big header" in e.value.message


def test_head_request_completes_with_the_head() -> None:
    resp = read(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", head_request=True)
    assert resp.complete and resp.content_length == 100 and resp.body == []


def test_upgrade_keeps_the_bytes_after_the_head() -> None:
    resp = read(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: upgrade\r\n\r\n\x81\x02hi")
    assert resp.status == 101 and resp.upgrade_rest == b"\x81\x02hi" and resp.regular
    assert resp.header_pairs() == [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")]


def test_hidden_lines_cut_exactly_the_named_headers() -> None:
    cut = hidden_lines(HOP_BY_HOP_RESPONSE | {b"x-a.b+c"})
    block = (b"Server: x\r\nX-Server: kept\r\nServers: kept\r\nDATE: y\r\nX-A.b+C: gone\r\n"
             b"X-AxbbC: kept\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\nVary: *\r\n")
    assert cut.sub(b"", block) == b"X-Server: kept\r\nServers: kept\r\nX-AxbbC: kept\r\nVary: *\r\n"
