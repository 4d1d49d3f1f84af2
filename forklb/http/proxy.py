"""Proxying one request to an upstream group, nginx-style.

Per attempt: choose a peer (smooth WRR), take an idle keep-alive connection to
it or connect, send the request head and stream the body, read the response
head with httptools, then relay the body to the client as it arrives.

Retries follow nginx's default ``proxy_next_upstream error timeout``: a peer
that refuses, resets or times out before the response head is tried no more for
this request and the next peer is chosen, unless request body bytes were
already streamed (they are not buffered, so cannot be replayed) or a request
that is not idempotent (POST, PATCH, ...) was already sent.  A pooled
connection that turns out to be closed by the server is retried at once on a
fresh connection for idempotent requests, and does not count as a failure.
When every peer failed the client gets 502 (504 after a timeout).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import httptools

from forklb.http import protocol
from forklb.http.connection import RECV_SIZE, ClientConnection, Exchange
from forklb.metrics import recorder as metrics_recorder
from forklb.upstream.pool import UpstreamGroup, connect

if TYPE_CHECKING:
    from forklb.worker import LocationRuntime


class UpstreamError(Exception):
    """An attempt failed before the response head was complete."""

    def __init__(self, message: str, status: int = 502, stale: bool = False,
                 sent: bool = False, body_consumed: bool = False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.stale = stale  # a reused idle connection turned out to be closed
        self.sent = sent  # request bytes reached the upstream socket
        self.body_consumed = body_consumed  # body bytes read from the client: no replay

    def replayable(self, idempotent: bool) -> bool:
        """nginx's rule: a sent non-idempotent request is not retried; a streamed
        body cannot be (it is not buffered)."""
        return not self.body_consumed and (idempotent or not self.sent)


class ResponseHead:
    """httptools callbacks for one upstream response."""

    __slots__ = ("parser", "reason", "headers", "headers_done", "complete", "body", "status",
                 "keep_alive", "head_request")

    def __init__(self, head_request: bool):
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = False

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []
        self.headers_done = False
        self.complete = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if 100 <= self.status < 200 and self.status != 101:
            return  # interim response: skipped, the final one follows
        self.headers_done = True
        if self.head_request:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True

    def feed(self, data: bytes) -> None:
        if self.head_request and self.headers_done:
            return  # llhttp does not know HEAD responses have no body
        self.parser.feed_data(data)


def request_head(ex: Exchange, rt: LocationRuntime, uri: bytes) -> bytes:
    """The request line and headers sent upstream for ``ex``."""
    lines = [ex.method_b, b" ", uri, b" HTTP/1.1\r\n"]
    if not rt.sets_host:
        lines += (b"Host: ", ex.proxy_host.encode("latin-1"), b"\r\n")
    for name, template, literal in rt.set_headers:
        value = literal if literal is not None else template.render(ex).encode("latin-1")
        if value:
            lines += (name, b": ", value, b"\r\n")
    skip = rt.overridden
    connection_listed = None
    for name, value in ex.headers:
        lname = name.lower()
        if lname in protocol.HOP_BY_HOP_REQUEST or lname in skip:
            if lname == b"connection":
                connection_listed = protocol.connection_tokens([value])
            continue
        lines += (name, b": ", value, b"\r\n")
    if connection_listed:
        lines = [_strip_listed(b"".join(lines), connection_listed)]
    if ex.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif ex.content_length is not None:
        lines.append(b"Content-Length: %d\r\n" % ex.content_length)
    if not rt.group.keepalive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def upstream_uri(ex: Exchange, rt: LocationRuntime) -> bytes:
    """nginx's URI rewrite: with a URI part in proxy_pass the location prefix is replaced."""
    part = rt.proxy_uri
    if part is None:
        return ex.target_raw
    loc = ex.location
    if loc.modifier == "=":
        rest = ""
    else:
        rest = ex.uri[len(loc.pattern):]
    uri = (part + rest).encode("utf-8", "surrogateescape")
    uri = _quote_path(uri)
    if ex.args:
        uri += b"?" + ex.args.encode("latin-1")
    return uri


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                  b"-._~/!$&'()*+,;=:@")


def _quote_path(path: bytes) -> bytes:
    if all(b in _SAFE for b in path):
        return path
    return b"".join(bytes([b]) if b in _SAFE else b"%%%02X" % b for b in path)


def proxy(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
    """Handle ``ex`` by proxying it to the location's upstream group."""
    group: UpstreamGroup = rt.group
    ex.proxy_host = rt.proxy_host
    head = request_head(ex, rt, upstream_uri(ex, rt))
    idempotent = ex.method_b in protocol.IDEMPOTENT_METHODS
    choice = group.start(ex)
    last_error: UpstreamError | None = None
    started = time.monotonic()
    addrs: list[str] = []
    while True:
        index = choice.next()
        if index is None:
            if last_error is None:
                conn.worker.log.error(_context("no live upstreams while connecting to upstream",
                                               conn, ex, None))
            ex.upstream_addr = ", ".join(addrs)
            conn.respond_simple(ex, last_error.status if last_error else 502)
            return
        addrs.append(group.label(index))
        group.acquire(index)
        try:
            sock, relayed = _try_peer(conn, ex, rt, group, index, head, idempotent)
        except UpstreamError as e:
            conn.worker.log.error(_context(e.message, conn, ex, group.label(index)))
            group.failed(index)
            conn.worker.stats.upstream_failed(group, index, e, len(addrs) > 1)
            last_error = e
            if not e.replayable(idempotent):
                ex.upstream_addr = ", ".join(addrs)
                conn.respond_simple(ex, e.status)
                return
            continue
        finally:
            group.release(index)
        group.succeeded(index)
        conn.worker.stats.upstream_done(group, index, ex.status, started, len(addrs) > 1)
        ex.upstream_addr = ", ".join(addrs)
        ex.upstream_response_time = f"{time.monotonic() - started:.3f}"
        if relayed:
            group.give_back(index, sock)
        else:
            sock.close()
        return


def _try_peer(conn: ClientConnection, ex: Exchange, rt: LocationRuntime, group: UpstreamGroup,
              index: int, head: bytes, idempotent: bool) -> tuple[socket.socket, bool]:
    """Exchange ``ex`` with peer ``index``: on an idle pooled connection if there is
    one, again on a fresh connection if that one turns out to be closed."""
    sock = group.take_idle(index)
    while True:
        reused = sock is not None
        try:
            if sock is None:
                sock = _connect(group, index, rt)
            return sock, _attempt(conn, ex, rt, sock, head, reused)
        except UpstreamError as e:
            if sock is not None:
                sock.close()
            if not (e.stale and e.replayable(idempotent)):
                raise
            # The server closed its idle connections (restart, its keepalive_timeout):
            # the others in the pool are as dead as this one.
            group.drop_idle(index)
            sock = None
        except BaseException:  # the client went away, sent too much, ...
            if sock is not None:
                sock.close()
            raise


def _connect(group: UpstreamGroup, index: int, rt: LocationRuntime) -> socket.socket:
    try:
        t0 = time.monotonic()
        sock = connect(group.address(index), rt.connect_timeout)
        metrics_recorder.connected(group, index, t0)
        return sock
    except TimeoutError:
        raise UpstreamError("upstream timed out (110: Connection timed out) while connecting "
                            "to upstream", status=504) from None
    except OSError as e:
        raise UpstreamError(f"connect() failed ({e.errno}: {e.strerror}) while connecting to "
                            "upstream") from None


def _attempt(conn: ClientConnection, ex: Exchange, rt: LocationRuntime, sock: socket.socket,
             head: bytes, reused: bool) -> bool:
    """One try on ``sock``; True when the connection may be kept for reuse."""
    sent = body_consumed = False
    phase = "sending request to upstream"
    try:
        sock.settimeout(rt.send_timeout)
        send_all = protocol.send_all
        send_all(sock, head)
        sent = True
        if ex.has_body:
            body_consumed = True
            for data in conn.body_chunks(ex):
                send_all(sock, protocol.chunk(data) if ex.chunked else data)
            if ex.chunked:
                send_all(sock, protocol.LAST_CHUNK)
        phase = "reading response header from upstream"
        sock.settimeout(rt.read_timeout)
        resp = ResponseHead(ex.method_b == b"HEAD")
        while not resp.headers_done:
            data = sock.recv(RECV_SIZE)
            if not data:
                raise UpstreamError(f"upstream prematurely closed connection while {phase}",
                                    stale=reused, sent=sent, body_consumed=body_consumed)
            reused = False
            resp.feed(data)
    except TimeoutError:
        raise UpstreamError(f"upstream timed out (110: Connection timed out) while {phase}",
                            status=504, sent=sent, body_consumed=body_consumed) from None
    except httptools.HttpParserError as e:
        raise UpstreamError(f"upstream sent invalid header ({e}) while {phase}", sent=sent,
                            body_consumed=body_consumed) from None
    except OSError as e:
        raise UpstreamError(f"{'send' if phase.startswith('send') else 'recv'}() failed "
                            f"({e.errno}: {e.strerror}) while {phase}", stale=reused,
                            sent=sent, body_consumed=body_consumed) from None
    return _relay_response(conn, ex, rt, sock, resp)


def _relay_response(conn: ClientConnection, ex: Exchange, rt: LocationRuntime,
                    sock: socket.socket, resp: ResponseHead) -> bool:
    status = resp.status
    ex.status = status
    ex.upstream_status = str(status)
    no_body = ex.method_b == b"HEAD" or status in (204, 304)
    content_length = None
    chunked_upstream = False
    out = [b"HTTP/1.1 %d %s\r\n" % (status, resp.reason or protocol.reason(status))]
    hidden = rt.hidden
    listed: frozenset[bytes] = frozenset()
    relayed_own: set[bytes] = set()  # Server/Date from upstream (proxy_pass_header)
    for name, value in resp.headers:
        lname = name.lower()
        if lname in hidden:
            if lname == b"content-length":
                content_length = int(value)
            elif lname == b"transfer-encoding":
                chunked_upstream = True
            elif lname == b"connection":
                listed = protocol.connection_tokens([value])
            continue
        if lname in rt.passed:
            relayed_own.add(lname)
        out += (name, b": ", value, b"\r\n")
    if b"server" not in relayed_own:
        out.append(b"Server: forklb\r\n")
    if b"date" not in relayed_own:
        out += (b"Date: ", conn.worker.date.now(), b"\r\n")
    if listed:
        out = [_strip_listed(b"".join(out), listed)]
    if no_body:
        mode = "none"
        if content_length is not None:
            out.append(b"Content-Length: %d\r\n" % content_length)
    elif content_length is not None:
        mode = "length"
        out.append(b"Content-Length: %d\r\n" % content_length)
    elif ex.version == "1.1":
        mode = "chunked"  # chunked or close-delimited upstream: re-encoded
        out.append(b"Transfer-Encoding: chunked\r\n")
    else:
        mode = "close"
        conn.must_close = True
    keep = conn.keep_alive_after(ex)
    if not keep:
        conn.must_close = True
    out.append(b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n")
    head_len = sum(len(p) for p in out)
    close_delimited = not no_body and content_length is None and not chunked_upstream
    sent = 0
    while True:
        if resp.body and mode != "none":
            for data in resp.body:
                sent += len(data)
                out.append(protocol.chunk(data) if mode == "chunked" else data)
            resp.body = []
        if resp.complete and mode == "chunked":
            out.append(protocol.LAST_CHUNK)
        if out:
            conn.send(b"".join(out))
            out = []
        if resp.complete:
            break
        try:
            data = sock.recv(RECV_SIZE)
        except OSError as e:
            conn.worker.log.error(_context(f"upstream read failed ({e}) while reading upstream",
                                           conn, ex, None))
            conn.must_close = True
            break
        if not data:
            if close_delimited:
                resp.complete = True
                if mode == "chunked":
                    out.append(protocol.LAST_CHUNK)
                continue
            conn.worker.log.error(_context("upstream prematurely closed connection while "
                                           "reading upstream", conn, ex, None))
            conn.must_close = True
            break
        try:
            resp.feed(data)
        except httptools.HttpParserError:
            conn.must_close = True
            break
    ex.body_bytes_sent = sent
    ex.bytes_sent = head_len + sent
    return resp.complete and resp.keep_alive and not close_delimited


def _strip_listed(head: bytes, listed: frozenset[bytes]) -> bytes:
    """Remove the header lines named in a Connection header (hop-by-hop too);
    the request or status line always stays."""
    first, *lines = head.split(b"\r\n")
    kept = [line for line in lines if line.split(b":", 1)[0].strip().lower() not in listed]
    return b"\r\n".join([first, *kept])


def _context(message: str, conn: ClientConnection, ex: Exchange, upstream: str | None) -> str:
    """nginx's error context: client, server, request, upstream, host."""
    text = (f'{message}, client: {conn.remote_addr}, server: {ex.server_name}, '
            f'request: "{ex.request_line}"')
    if upstream:
        text += f', upstream: "http://{upstream}{ex.target}"'
    if ex.host:
        text += f', host: "{ex.host}"'
    return text
