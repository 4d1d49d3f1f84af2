"""Proxying one request to an upstream group, nginx-style.

Per attempt: choose a peer (smooth WRR), take an idle keep-alive connection to
it or connect, send the request head and stream the body, read the response
head with httptools, then relay the body to the client as it arrives.

Retries follow ``proxy_next_upstream`` (:mod:`forklb.http.next_upstream`
decides): an attempt ends with a response head or an :class:`UpstreamError`
(error, timeout, invalid_header); a failure or a listed status goes to the next
peer while the policy allows it.  A listed status's response is dropped with
its connection before anything reaches the client.  Request bodies are not
buffered: one that arrived whole with the head is kept and can be replayed, one
streamed from the client is never sent again.  A pooled connection
that turns out to be closed by the server is retried at once on a fresh
connection for idempotent requests, and does not count as a failure.

An upgrade request (WebSocket) in a location that sets ``Upgrade`` is sent
with the configured headers; a ``101`` answer turns the exchange into a
byte tunnel (:func:`pipe`) that ends when either side closes.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import httptools

from forklb.http import next_upstream as nu
from forklb.http import protocol, sockio, splice
from forklb.http.connection import RECV_SIZE, ClientConnection, ClientGone, Exchange
from forklb.http.validate import Invalid, response_start_ok, transfer_coding
from forklb.metrics import recorder as metrics_recorder
from forklb.upstream.pool import UpstreamGroup, connect

if TYPE_CHECKING:
    from forklb.worker import LocationRuntime


class UpstreamError(Exception):
    """An attempt failed before the response head was complete."""

    def __init__(self, message: str, status: int = 502, stale: bool = False,
                 sent: bool = False, body_consumed: bool = False, kind: int = nu.ERROR):
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind  # proxy_next_upstream's name for it (forklb.http.next_upstream)
        self.stale = stale  # a reused idle connection turned out to be closed
        self.sent = sent  # request bytes reached the upstream socket
        self.body_consumed = body_consumed  # body bytes read from the client: no replay

    def replayable(self, idempotent: bool) -> bool:
        """nginx's rule: a sent non-idempotent request is not retried; a streamed
        body cannot be (it is not buffered)."""
        return not self.body_consumed and (idempotent or not self.sent)


# The most an upstream's response head may take (1xx interim heads before it
# included): beyond it the reply is refused, as nginx refuses one that overflows
# proxy_buffer_size, rather than collected without bound.
HEAD_MAX = 64 * 1024


class ResponseHead:
    """httptools callbacks for the responses on one upstream connection.

    One reader serves a pooled connection's successive responses (:meth:`next`),
    as long as llhttp saw each one to its end (``reusable``); after a reply it did
    not see whole (to a HEAD request, a body relayed without it, an error) the
    next one gets a fresh reader.  The header lines are sorted as they arrive:
    a hidden one (framing, hop-by-hop, ``proxy_hide_header``) is noted for what
    it says, any other goes straight into ``lines``, the part of the client's
    head that is relayed as it came.
    """

    __slots__ = ("parser", "reason", "hidden", "passed", "lines", "content_length", "listed",
                 "relayed_own", "codings", "headers_done", "complete", "body", "status",
                 "keep_alive", "head_request", "prefix", "upgrade_rest", "head_bytes", "extra",
                 "reusable")

    def __init__(self, head_request: bool, hidden: frozenset[bytes], passed: frozenset[bytes]):
        self.parser = httptools.HttpResponseParser(self)
        self.next(head_request, hidden, passed)
        self.on_message_begin()  # (llhttp calls it too, before the first header)

    def next(self, head_request: bool, hidden: frozenset[bytes],
             passed: frozenset[bytes]) -> None:
        """Get ready for the connection's next response (to a HEAD request: no body)."""
        self.head_request = head_request
        self.hidden = hidden  # the location's hidden names (LocationRuntime.hidden)
        self.passed = passed  # Server/Date when proxy_pass_header lets them through
        self.headers_done = False
        self.complete = False
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = False
        self.prefix = b""  # the reply's first bytes, until they show "HTTP/"
        self.upgrade_rest: bytes | None = None  # after a 101 head: the tunnel's first bytes
        self.head_bytes = 0  # read before the head was complete
        self.extra = False  # bytes came after the response: its connection is not reused
        self.reusable = False  # llhttp saw the response end: ready for the next one

    def on_message_begin(self) -> None:
        if self.complete:
            # More than the response's framing said: not read as another response
            # (it would be served to this request), the parse stops here (feed).
            raise _PastTheEnd
        # (a final response after an interim 1xx one starts afresh)
        self.reason = b""
        # [status line (set by _response_head), then name, ": ", value, CRLF of each
        # relayed header]
        self.lines: list[bytes] = [b""]
        self.content_length: int | None = None
        self.listed: frozenset[bytes] = frozenset()  # names the Connection header lists
        self.relayed_own: set[bytes] | None = None  # Server/Date relayed from the upstream
        self.codings: list[bytes] = []  # Transfer-Encoding values
        self.headers_done = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in self.hidden:
            if lname == b"content-length":  # (llhttp has checked its digits)
                self.content_length = int(value)
            elif lname == b"connection":  # every Connection line counts
                tokens = protocol.connection_tokens([value])
                if tokens:  # (the usual keep-alive or close names no header)
                    self.listed = self.listed | tokens
            elif lname == b"transfer-encoding":
                self.codings.append(value)
        else:
            if lname in self.passed:
                if self.relayed_own is None:
                    self.relayed_own = set()
                self.relayed_own.add(lname)
            self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if 100 <= self.status < 200 and self.status != 101:
            return  # interim response: skipped, the final one follows
        codings = self.codings
        if codings:
            # Any coding but chunked (nginx >= 1.23: "upstream sent unknown
            # Transfer-Encoding"): the body's end could not be found. Re-raised by feed.
            transfer_coding(codings, "1.1")
        self.headers_done = True
        if self.head_request:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True
            self.reusable = True

    def release(self) -> None:
        """Break the reference cycle with the parser (which holds this object for
        its callbacks), so the pair is freed at once, not by the cyclic collector
        (by :meth:`forklb.http.sockio.Stream.close`)."""
        self.parser = None

    def feed(self, data: bytes) -> None:
        """Parse ``data``; a reply that is not HTTP/1.x, or framing forklb refuses,
        raises Invalid (llhttp takes RTSP/ and ICE/ too, nginx 1.22 even HTTP/0.9), and
        so does a head growing past HEAD_MAX."""
        if self.headers_done:
            if self.head_request:
                return  # llhttp does not know HEAD responses have no body
        else:
            self.head_bytes += len(data)
        if len(self.prefix) < 5:
            self.prefix += data[:5 - len(self.prefix)]
            if not response_start_ok(self.prefix):
                raise Invalid(502, "upstream sent no valid HTTP/1.0 header")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # 101 Switching Protocols: llhttp stops after the head.
            self.upgrade_rest = data[e.args[0]:]
            self.complete = True
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, _PastTheEnd):
                self.extra = True
                return
            if isinstance(e.__context__, Invalid):
                raise e.__context__ from None
            raise
        if not self.headers_done and self.head_bytes > HEAD_MAX:
            raise Invalid(502, "upstream sent too big header")


class TunnelResponseHead(ResponseHead):
    """The reply to an upgrade request: it also keeps every header line as it came
    (``raw``), for :func:`tunnel_head`, which relays Upgrade when the reply is 101."""

    __slots__ = ("raw",)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.raw: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self.raw.append((name, value))


class _PastTheEnd(Exception):
    """Raised in ResponseHead's callbacks when a reply goes on after its end."""


def wants_tunnel(ex: Exchange, rt: LocationRuntime) -> bool:
    """Whether ``ex`` is forwarded as an upgrade that a 101 turns into a tunnel:
    the location sets Upgrade, the client asked for an upgrade (Connection:
    upgrade + Upgrade, no body), and not to h2c, which is never tunnelled."""
    if not rt.tunnel or ex.upgrade_tail is None or ex.has_body:
        return False
    return not any(name.lower() == b"upgrade" and b"h2c" in value.lower()
                   for name, value in ex.headers)


def request_head(ex: Exchange, rt: LocationRuntime, uri: bytes, tunnel: bool = False) -> bytes:
    """The request line and headers sent upstream for ``ex``."""
    lines = [ex.method_b, b" ", uri, rt.version_line]
    # nginx's order: proxy_set_header lines as configured, then its defaults
    # (Host, Connection, framing), then the client's own headers.
    # Upgrade/Connection set for WebSocket go only with an upgrade being tunnelled.
    drop = rt.upgrade_headers if rt.tunnel and not tunnel else None
    configured_connection = b"connection" in rt.upgrade_headers
    connection_set = False  # a configured Connection replaces forklb's "close"
    for name, template, literal in rt.set_headers:
        if drop and name.lower() in drop:
            continue
        value = literal if literal is not None else template.render(ex).encode("latin-1")
        if value:
            lines += (name, b": ", value, b"\r\n")
            if configured_connection and name.lower() == b"connection":
                connection_set = True
    if not rt.sets_host:
        lines.append(rt.host_line)
    if (rt.http10 or not rt.group.keepalive) and not connection_set:
        lines.append(b"Connection: close\r\n")
    if ex.chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif ex.content_length is not None:
        lines.append(b"Content-Length: %d\r\n" % ex.content_length)
    skip = rt.overridden
    hop_by_hop = protocol.HOP_BY_HOP_REQUEST
    connection_listed = None
    start = len(lines)
    for name, value in ex.headers:
        # (names nginx calls invalid, "X_Forwarded_For", were dropped by the parser)
        lname = name.lower()
        if lname in hop_by_hop or lname in skip:
            if lname == b"connection":  # every Connection line counts, not the last
                listed = protocol.connection_tokens([value])
                connection_listed = connection_listed | listed if connection_listed else listed
            continue
        lines += (name, b": ", value, b"\r\n")
    if connection_listed:
        # Only the client's own headers go by the names its Connection lists; the
        # leading CRLF stands in for the first line _strip_listed keeps.
        own = _strip_listed(b"\r\n" + b"".join(lines[start:]), connection_listed)
        lines[start:] = [own[2:]]
    lines.append(b"\r\n")
    return b"".join(lines)


def upstream_uri(ex: Exchange, rt: LocationRuntime) -> bytes:
    """nginx's URI rewrite: with a URI part in proxy_pass the location prefix is replaced."""
    part = rt.proxy_uri
    if part is None:
        if ex.redirects:  # after an internal redirect: the new URI, as nginx
            uri = _quote_path(ex.uri.encode("utf-8", "surrogateescape"))
            return uri + b"?" + ex.args.encode("latin-1") if ex.args else uri
        return ex.target_raw
    loc = ex.location
    if loc.modifier == "=":
        rest = ""
    else:
        rest = ex.uri[len(loc.pattern):]
    uri = (part + rest).encode("utf-8", "surrogateescape")
    if b"%" in ex.target_raw:
        # As nginx: the decoded URI is escaped again only when the client's was
        # escaped; otherwise it goes as the client wrote it (normalised).
        uri = _quote_path(uri)
    if ex.args:
        uri += b"?" + ex.args.encode("latin-1")
    return uri


# What nginx's ngx_escape_uri (NGX_ESCAPE_URI) leaves as is: printable ASCII except
# space " # % < > ? \ ^ ` { | }; "[" and "]" stay literal, as in nginx.
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                  b"-._~/!$&'()*+,;=:@[]")


def _quote_path(path: bytes) -> bytes:
    if all(b in _SAFE for b in path):
        return path
    return b"".join(bytes([b]) if b in _SAFE else b"%%%02X" % b for b in path)


def proxy(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
    """Handle ``ex`` by proxying it to the location's upstream group.

    Each attempt ends with a response head or an :class:`UpstreamError`; what
    happens next (another peer, an error page, the response relayed) is
    decided by :func:`forklb.http.next_upstream.decide`.
    """
    group: UpstreamGroup = rt.group
    ex.proxy_host = rt.proxy_host
    if rt.http10 and ex.chunked:
        # HTTP/1.0 cannot carry a chunked body and forklb does not buffer bodies
        # to count them (nginx does): the client has to send a Content-Length.
        conn.worker.log.error(_context("client sent chunked body, which proxy_http_version "
                                       "1.0 cannot forward", conn, ex, None))
        ex.keep_alive = False
        conn.respond_simple(ex, 411)
        return
    tunnel = wants_tunnel(ex, rt)
    head = request_head(ex, rt, upstream_uri(ex, rt), tunnel)
    body = None
    if ex.has_body and ex.complete:
        # The whole body came with the head (a small request): it is in memory
        # anyway, so keep it for another attempt, as nginx's buffered bodies are.
        data = b"".join(conn.body_chunks(ex))
        body = [data] if data else []
    started = time.monotonic()
    first = group.steady_pick()  # the first try's peer, or -1: a Choice decides
    choice = None
    index = -1  # the peer of the attempt under way (released by its finally)
    addrs: list[str] = []
    statuses: list[str] = []
    while True:
        if first >= 0:
            index, first = first, -1
            group.acquire(index)
        else:
            if choice is None:
                choice = group.start(ex, index)  # (index: a steady pick that failed)
            index = group.pick(choice)  # (acquired)
            if index is None:
                conn.worker.log.error(_context("no live upstreams while connecting to upstream",
                                               conn, ex, None))
                _finish_log(ex, addrs, statuses, started)
                conn.respond_simple(ex, 502)
                return
        addrs.append(group.label(index))
        released = False
        try:
            try:
                sock, resp = _try_peer(conn, ex, rt, group, index, head, tunnel, body)
            except UpstreamError as e:
                conn.worker.log.error(_context(e.message, conn, ex, group.label(index)))
                group.failed(index)  # error, timeout, invalid_header: always a failure
                conn.worker.stats.upstream_failed(group, index, e, len(addrs) > 1)
                statuses.append(str(e.status))
                if nu.decide(rt.next_upstream, e.kind, tries_done=len(addrs), peers=rt.peers,
                             elapsed=time.monotonic() - started, sent=e.sent,
                             method=ex.method_b, body_gone=e.body_consumed):
                    continue
                _finish_log(ex, addrs, statuses, started)
                conn.respond_simple(ex, e.status)
                return
            try:
                if resp.status in rt.retry_statuses and _next_on_status(
                        rt.next_upstream, resp.status, len(addrs), rt.peers, started, ex,
                        body is not None):
                    # Nothing went to the client: drop the response with its connection.
                    sock.close()
                    statuses.append(str(resp.status))
                    conn.worker.stats.upstream_done(group, index, resp.status, started,
                                                    len(addrs) > 1)
                    if nu.counts_as_failure(nu.STATUS_FLAGS[resp.status]):
                        group.failed(index)
                    continue
                _finish_log(ex, addrs, statuses, started)
                if tunnel and resp.status == 101:
                    # A tunnel counts as a connection to the peer (least_conn,
                    # max_conns) for as long as it lasts.
                    ex.upstream_status = ", ".join([*statuses, "101"])
                    _relay_tunnel(conn, ex, rt, sock, resp)
                    relayed = False  # a tunnelled connection is never reused
                else:
                    group.release(index)
                    released = True
                    relayed = _relay_response(conn, ex, rt, sock, resp)
                    if statuses:
                        ex.upstream_status = ", ".join([*statuses, ex.upstream_status])
            except BaseException:
                sock.close()
                raise
        finally:
            if not released:
                group.release(index)
        group.succeeded(index)
        conn.worker.stats.upstream_done(group, index, ex.status, started, len(addrs) > 1)
        if relayed and not rt.http10 and not tunnel:
            group.give_back(index, sock)
        else:
            sock.close()
        return


def _next_on_status(policy: nu.NextUpstream, status: int, tries: int, peers: int,
                    started: float, ex: Exchange, body_kept: bool) -> bool:
    """nginx's ngx_http_upstream_test_next: a listed status goes to the next peer
    unless this was the last try (then the response itself is passed on)."""
    return nu.decide(policy, nu.STATUS_FLAGS[status], tries_done=tries, peers=peers,
                     elapsed=time.monotonic() - started, sent=True, method=ex.method_b,
                     body_gone=ex.has_body and not body_kept)


def _finish_log(ex: Exchange, addrs: list[str], statuses: list[str], started: float) -> None:
    """$upstream_addr (every peer tried) and the time spent, for the access log."""
    ex.upstream_addr = addrs[0] if len(addrs) == 1 else ", ".join(addrs)
    ex.upstream_time = time.monotonic() - started
    if statuses:
        ex.upstream_status = ", ".join(statuses)


def _try_peer(conn: ClientConnection, ex: Exchange, rt: LocationRuntime, group: UpstreamGroup,
              index: int, head: bytes, tunnel: bool,
              body: list[bytes] | None) -> tuple[sockio.Stream, ResponseHead]:
    """Send ``ex`` to peer ``index`` and read the response head: on an idle pooled
    connection if there is one, again on a fresh connection if that one turns
    out to be closed."""
    sock = None if tunnel else group.take_idle(index)
    while sock is not None and sock.ready:
        # Readable while idle: closed by the server, or holding bytes nobody asked
        # for. Either way not reused (nginx closes such a cached connection at once).
        sock.close()
        sock = group.take_idle(index)
    while True:
        reused = sock is not None
        try:
            if sock is None:
                sock = _connect(group, index, rt, ex)
            else:
                _note_connect_time(ex, "0.000")  # a pooled connection, as nginx logs it
            return sock, _attempt(conn, ex, rt, sock, head, reused, tunnel, body)
        except UpstreamError as e:
            if sock is not None:
                sock.close()
            if not (e.stale and e.replayable(ex.method_b in protocol.IDEMPOTENT_METHODS)):
                raise
            # The server closed its idle connections (restart, its keepalive_timeout):
            # the others in the pool are as dead as this one.
            group.drop_idle(index)
            sock = None
        except BaseException:  # the client went away, sent too much, ...
            if sock is not None:
                sock.close()
            raise


def _note_connect_time(ex: Exchange, value: str) -> None:
    """$upstream_connect_time: one value per attempt, as nginx ("-" for a failed connect)."""
    ex.upstream_connect_time = (f"{ex.upstream_connect_time}, {value}"
                                if ex.upstream_connect_time else value)


def _connect(group: UpstreamGroup, index: int, rt: LocationRuntime,
             ex: Exchange) -> sockio.Stream:
    started = time.monotonic()
    try:
        sock = connect(group.address(index), rt.connect_timeout)
        metrics_recorder.connected(group, index, started)
        _note_connect_time(ex, f"{time.monotonic() - started:.3f}")
        return sockio.Stream(sock)
    except TimeoutError:
        _note_connect_time(ex, "-")
        raise UpstreamError("upstream timed out (110: Connection timed out) while connecting "
                            "to upstream", status=504, kind=nu.TIMEOUT) from None
    except OSError as e:
        _note_connect_time(ex, "-")
        raise UpstreamError(f"connect() failed ({e.errno}: {e.strerror}) while connecting to "
                            "upstream") from None


def _attempt(conn: ClientConnection, ex: Exchange, rt: LocationRuntime, sock: sockio.Stream,
             head: bytes, reused: bool, tunnel: bool = False,
             body: list[bytes] | None = None) -> ResponseHead:
    """One try on ``sock``: send the request, its body (``body`` when kept for
    replay, else streamed from the client), read the response head."""
    sent = body_consumed = False
    phase = "sending request to upstream"
    try:
        send_all = sock.send_all
        timeout = rt.send_timeout
        send_all(head, timeout)
        sent = True
        if ex.has_body:
            body_consumed = body is None
            if body is None and not ex.chunked and ex.content_length >= splice.MIN_BODY:
                conn.relay_body(ex, sock.sock, timeout, rt.splice)
            else:
                for data in conn.body_chunks(ex) if body is None else body:
                    send_all(protocol.chunk(data) if ex.chunked else data, timeout)
            if ex.chunked:
                send_all(protocol.LAST_CHUNK, timeout)
        phase = "reading response header from upstream"
        timeout = rt.read_timeout
        resp = sock.reader  # (a tunnel's connection is always a fresh one)
        if resp is not None and resp.reusable:
            resp.next(ex.method_b == b"HEAD", rt.hidden, rt.passed)
        else:
            if resp is not None:
                resp.release()
            reader = TunnelResponseHead if tunnel else ResponseHead
            resp = sock.reader = reader(ex.method_b == b"HEAD", rt.hidden, rt.passed)
        while not resp.headers_done:
            data = sock.recv(timeout)
            if not data:
                raise UpstreamError(f"upstream prematurely closed connection while {phase}",
                                    stale=reused, sent=sent, body_consumed=body_consumed)
            reused = False
            resp.feed(data)
    except TimeoutError:
        raise UpstreamError(f"upstream timed out (110: Connection timed out) while {phase}",
                            status=504, sent=sent, body_consumed=body_consumed,
                            kind=nu.TIMEOUT) from None
    except httptools.HttpParserError as e:
        raise UpstreamError(f"upstream sent invalid header ({e}) while {phase}", sent=sent,
                            body_consumed=body_consumed, kind=nu.INVALID_HEADER) from None
    except Invalid as e:
        raise UpstreamError(f"{e.message.replace('client', 'upstream')} while {phase}",
                            sent=sent, body_consumed=body_consumed,
                            kind=nu.INVALID_HEADER) from None
    except OSError as e:
        raise UpstreamError(f"{'send' if phase.startswith('send') else 'recv'}() failed "
                            f"({e.errno}: {e.strerror}) while {phase}", stale=reused,
                            sent=sent, body_consumed=body_consumed) from None
    if resp.status == 101 and not tunnel:
        raise UpstreamError(f"upstream sent unexpected 101 response while {phase}", sent=sent,
                            body_consumed=body_consumed, kind=nu.INVALID_HEADER)
    return resp


def _relay_response(conn: ClientConnection, ex: Exchange, rt: LocationRuntime,
                    sock: sockio.Stream, resp: ResponseHead) -> bool:
    """Send the response whose head is in ``resp`` to the client and relay its
    body; True if the upstream connection can be reused."""
    status = resp.status
    if status >= 300 and ex.location.proxy_intercept_errors and not ex.error_paged \
            and status in ex.location.error_pages:
        # proxy_intercept_errors: the page replaces the upstream's answer, whose
        # connection is dropped rather than drained
        ex.upstream_status = str(status)
        conn.respond_simple(ex, status)
        return False
    if ex.err_status:
        status = ex.err_status  # an error page keeps the error's status
    ex.status = status
    ex.upstream_status = str(status)
    head, mode, content_length = _response_head(conn, ex, resp, status)
    close_delimited = mode != "none" and content_length is None and not resp.codings
    if resp.complete and mode == "length":
        # The usual small response: head and body in one write
        body = resp.body
        resp.body = []
        sent = sum(map(len, body)) if body else 0
        conn.send(b"".join((head, *body)) if body else head)
        ex.body_bytes_sent = sent
        ex.bytes_sent = len(head) + sent
        return resp.keep_alive if not resp.extra else _past_the_end(conn, ex, resp)
    head_len = len(head)
    out = [head]
    # A large Content-Length body skips the parser once what came with the head is
    # sent: copied with recv_into, or spliced (forklb.http.splice).
    direct = mode == "length" and content_length >= splice.MIN_BODY
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
        if direct:
            sent += _relay_body(conn, ex, rt, sock, resp, content_length - sent)
            break
        try:
            data = sock.recv(rt.read_timeout)
        except OSError as e:
            # A stall mid-body ends at proxy_read_timeout, logged in nginx's words.
            what = ("upstream timed out (110: Connection timed out)"
                    if isinstance(e, TimeoutError) else f"upstream read failed ({e})")
            conn.worker.log.error(_context(f"{what} while reading upstream", conn, ex, None))
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
        except (httptools.HttpParserError, Invalid):
            conn.must_close = True
            break
    ex.body_bytes_sent = sent
    ex.bytes_sent = head_len + sent
    if resp.extra:
        return _past_the_end(conn, ex, resp)
    return resp.complete and resp.keep_alive and not close_delimited


def _past_the_end(conn: ClientConnection, ex: Exchange, resp: ResponseHead) -> bool:
    """The upstream sent bytes after the response: nginx's warning; the connection
    is not reused (False), since what it holds next is not a reply to anything."""
    what = ("data after final chunk" if resp.codings
            else 'more data than specified in "Content-Length" header')
    conn.worker.log.warn(_context(f"upstream sent {what} while reading upstream", conn, ex, None))
    return False


def _response_head(conn: ClientConnection, ex: Exchange, resp: ResponseHead,
                   status: int) -> tuple[bytes, str, int | None]:
    """The head sent to the client (the upstream's relayed lines, sorted by the
    location's rules as they arrived), how its body is framed ("length", "chunked"
    re-encoded, "close"-delimited or "none") and the upstream's Content-Length.
    Decides keep-alive: ``conn.must_close`` is set when the connection ends."""
    reason = resp.reason if status == resp.status else b""
    out = resp.lines
    out[0] = b"HTTP/1.1 %d %s\r\n" % (status, reason or protocol.reason(status))
    content_length = resp.content_length
    _add_own_headers(out, resp.relayed_own, conn.worker.date)
    if resp.listed:
        out = [_strip_listed(b"".join(out), resp.listed)]
    if ex.method_b == b"HEAD" or status == 204 or status == 304:
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
    if conn.keep_alive_after(ex):
        out.append(b"Connection: keep-alive\r\n\r\n")
    else:
        conn.must_close = True
        out.append(b"Connection: close\r\n\r\n")
    return b"".join(out), mode, content_length


def _relay_body(conn: ClientConnection, ex: Exchange, rt: LocationRuntime,
                stream: sockio.Stream, resp: ResponseHead, left: int) -> int:
    """Relay the ``left`` bytes that end a Content-Length body from ``sock`` to
    the client without the parser: spliced from ``proxy_splice``'s size on
    where the worker can (plain client), else copied with
    recv_into.  Returns how many reached the client.  An upstream failure is
    logged as on the parser's path and closes the client connection; a client
    failure raises ClientGone."""
    sock = stream.sock
    sock.settimeout(rt.read_timeout)  # for splice.copy's reads
    try:
        if rt.splice and left >= rt.splice and splice.usable(conn.sock):
            try:
                moved = splice.relay(sock.fileno(), conn.sock.fileno(), left,
                                     lambda moved: rt.read_timeout, conn.send_timeout)
            except splice.Unsupported:
                moved = splice.copy(sock, conn.send, left)
        else:
            moved = splice.copy(sock, conn.send, left)
    except splice.SpliceFailed as e:
        if e.side == "dst":
            if e.kind == "timeout":
                raise conn.send_timed_out() from None
            raise ClientGone(str(e.err)) from None
        if e.kind == "eof":
            what = "upstream prematurely closed connection"
        elif e.kind == "timeout":
            what = "upstream timed out (110: Connection timed out)"
        else:
            what = f"upstream read failed ({e.err})"
        conn.worker.log.error(_context(f"{what} while reading upstream", conn, ex, None))
        conn.must_close = True
        return e.moved
    # The parser never sees these bytes: what waits after them is checked here.
    resp.complete = True
    resp.extra = sockio.bytes_waiting(sock) > 0
    stream.rearm()
    return moved


def _add_own_headers(out: list[bytes], relayed_own: set[bytes] | None,
                     date: protocol.CachedTime) -> None:
    """forklb's Server and Date, unless the upstream's own were passed (proxy_pass_header)."""
    if not relayed_own:
        out.append(date.own_lines)  # both lines, made once a second (Worker._keep_time)
        return
    if b"server" not in relayed_own:
        out.append(b"Server: forklb\r\n")
    if b"date" not in relayed_own:
        out += (b"Date: ", date.http_date, b"\r\n")


def tunnel_head(resp: TunnelResponseHead, rt: LocationRuntime, date: protocol.CachedTime) -> bytes:
    """The 101 head relayed to the client, as nginx sends it: the upstream's
    headers (its Upgrade included) minus hop-by-hop and hidden ones, forklb's
    Server and Date unless passed, and ``Connection: upgrade``."""
    out = [b"HTTP/1.1 101 ", resp.reason or protocol.reason(101), b"\r\n"]
    relayed_own = set()
    for name, value in resp.raw:
        lname = name.lower()
        if lname in rt.hidden and lname != b"upgrade":
            continue
        if lname in rt.passed:
            relayed_own.add(lname)
        out += (name, b": ", value, b"\r\n")
    _add_own_headers(out, relayed_own, date)
    out.append(b"Connection: upgrade\r\n\r\n")
    return b"".join(out)


def _relay_tunnel(conn: ClientConnection, ex: Exchange, rt: LocationRuntime,
                  stream: sockio.Stream, resp: TunnelResponseHead) -> None:
    """Relay the 101 head, then bytes both ways until one side closes or both are
    idle for proxy_read_timeout (nginx's upgraded mode); the connection then ends."""
    ex.status = 101
    conn.must_close = True
    head = tunnel_head(resp, rt, conn.worker.date)
    conn.send(head)
    to_client = pipe(conn.sock, stream.sock, first_down=resp.upgrade_rest or b"",
                     first_up=ex.upgrade_tail or b"", idle_timeout=rt.read_timeout,
                     send_timeout=rt.send_timeout)
    ex.body_bytes_sent = to_client
    ex.bytes_sent = len(head) + to_client


def pipe(client: socket.socket, upstream: socket.socket, first_down: bytes, first_up: bytes,
         idle_timeout: float, send_timeout: float) -> int:
    """Copy bytes between ``client`` and ``upstream`` until either closes, fails
    or nothing moves for ``idle_timeout``; returns the bytes sent to the client.

    One greenlet waits on both sockets; a write blocks reading the other way,
    which is the back-pressure a slow reader should get (bounded by
    ``send_timeout``).  ``first_*`` are bytes read along with the heads.
    """
    from gevent.select import select  # the worker's hub (this module is worker-only)

    down = 0
    client.settimeout(send_timeout)
    upstream.settimeout(send_timeout)
    try:
        if first_down:
            client.sendall(first_down)
            down += len(first_down)
        if first_up:
            upstream.sendall(first_up)
        both = [client, upstream]
        while True:
            readable, _, _ = select(both, [], [], idle_timeout)
            if not readable:
                return down  # idle for proxy_read_timeout
            for src in readable:
                data = src.recv(RECV_SIZE)
                if not data:
                    return down
                if src is upstream:
                    client.sendall(data)
                    down += len(data)
                else:
                    upstream.sendall(data)
    except OSError:  # a reset, a timeout: the tunnel is over either way
        return down


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
