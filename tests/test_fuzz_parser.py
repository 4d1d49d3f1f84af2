"""hypothesis fuzzing of ClientConnection's request parsing (no sockets).

Valid requests (pipelined, Content-Length and chunked bodies, extensions,
trailers) and mutated ones are cut into reads at random points. Properties:

- the parse result (complete requests and the error status) does not depend on
  how the bytes are split into reads;
- only forklb's own error (BadRequest) comes out, never another exception;
- forklb accepts nothing llhttp alone refuses (it is only ever stricter).
"""

from __future__ import annotations

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parsing import socketless_connection

from forklb.http.connection import BadRequest


def parse(reads: list[bytes]) -> tuple[list[tuple], int | None]:
    """Feed ``reads`` as the serve loop would: stop at the first error or once the
    connection must close. Returns (complete requests, error status or None)."""
    conn = socketless_connection()
    status = None
    try:
        for data in reads:
            if conn.must_close:
                break
            conn._feed(data)
    except BadRequest as e:
        status = e.status
    done = [(ex.method_b, ex.target_raw, ex.version, tuple(ex.headers), b"".join(ex.body),
             ex.chunked, ex.content_length) for ex in conn.pending if ex.complete]
    return done, status


class _Sink:
    """httptools protocol that records nothing (llhttp's own verdict only)."""


def llhttp_accepts(data: bytes) -> bool:
    try:
        httptools.HttpRequestParser(_Sink()).feed_data(data)
    except httptools.HttpParserUpgrade:
        return True
    except httptools.HttpParserError:
        return False
    return True


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!",
                min_size=1, max_size=12).map(str.encode)
VALUE = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if 0x20 <= c < 0x7f or c == 0x09).strip(b" \t"))
# Bodies that look like framing too: a CRLFCRLF in a body must not end a header.
BODY = st.one_of(st.binary(max_size=300), st.lists(
    st.sampled_from([b"\r\n\r\n", b"abc", b"0\r\n", b"GET / HTTP/1.1\r\n"]),
    max_size=8).map(b"".join))


@st.composite
def chunked_body(draw) -> bytes:
    body = draw(BODY)
    out = b""
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        ext = draw(st.sampled_from([b"", b";a=b", b";x", b";" + b"e" * 4200]))
        width = draw(st.sampled_from(["x", "X", "04x", "016x", "017x"]))
        out += format(size, width).encode() + ext + b"\r\n" + body[pos:pos + size] + b"\r\n"
        pos += size
    trailer = draw(st.sampled_from([b"", b"T: v\r\n"]))
    return out + b"0\r\n" + trailer + b"\r\n"


@st.composite
def request(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE"]))
    target = b"/" + draw(st.text("abc/?=&%.", max_size=10)).encode()
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    headers = [(b"Host", b"example.com")] if draw(st.booleans()) or version == b"1.1" else []
    headers += draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))
    framing = draw(st.sampled_from(["none", "length", "chunked", "te-other"]))
    body = b""
    if framing == "length":
        body = draw(BODY)
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = draw(chunked_body())
    elif framing == "te-other":
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(
            [b"gzip, chunked", b"chunked, gzip", b"identity", b"Chunked"]))))
        body = draw(chunked_body())
    head = b"%s %s HTTP/%s\r\n" % (method, target, version)
    head += b"".join(n + b": " + v + b"\r\n" for n, v in draw(st.permutations(headers)))
    return head + b"\r\n" + body


INTERESTING = st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b":", b"\x00", b"_", b"0", b";",
                               b"\t", b"-", b"x", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
                               b"Content-Length: 5\r\n", b"ffffffffffffffffff"])


@st.composite
def mutated(draw, data: bytes) -> bytes:
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        if kind == "insert":
            data = data[:pos] + draw(INTERESTING) + data[pos:]
        elif kind == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 4)):]
        else:
            data = data[:pos] + draw(INTERESTING) + data[pos + 1:]
    return data


@st.composite
def stream_and_cuts(draw) -> tuple[bytes, list[bytes]]:
    data = b"".join(draw(st.lists(request(), min_size=1, max_size=3)))
    if draw(st.booleans()):
        data = draw(mutated(data))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    reads = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return data, reads


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_and_cuts())
def test_parse_does_not_depend_on_read_boundaries(case):
    data, reads = case
    whole = parse([data])
    assert parse(reads) == whole
    assert parse([data[i:i + 1] for i in range(len(data))]) == whole
    if whole[1] is None:
        assert llhttp_accepts(data), "forklb accepted what llhttp refuses"


@settings(max_examples=50, deadline=None)
@given(st.lists(request(), min_size=1, max_size=3))
def test_valid_requests_parse_completely(requests):
    """Unmutated requests: each is refused for a listed reason or parsed completely."""
    done, status = parse([b"".join(requests)])
    if status is None:
        assert len(done) == len(requests)
