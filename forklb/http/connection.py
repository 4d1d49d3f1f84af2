"""One client connection in a worker: parse requests, route them, respond.

A connection is served by one greenlet (:meth:`ClientConnection.serve`).  The
request parser is httptools (llhttp) in its default strict mode, one parser per
connection, fed with whatever ``recv`` returns.  httptools cannot pause, so
each parsed message becomes an :class:`Exchange` queued in ``pending``; the
greenlet handles them in order, pulling body bytes as the handler asks for
them (so bodies are streamed: at most one ``recv`` worth is ever held).

Handlers (:mod:`forklb.http.proxy`, :mod:`forklb.http.static`) write the
response and set ``exchange.status`` and byte counts for the access log.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httptools
from greenlet import greenlet

from forklb.http import internal, protocol, sockio, splice
from forklb.http.routing import BadHost, BadPath, normalize_path, split_host
from forklb.http.validate import LOWERED_NAMES as _LOWERED
from forklb.http.validate import ChunkScanner, Invalid, lowered_name, transfer_coding
from forklb.http.variables import NOTED_HEADERS, NOTED_NAMES
from forklb.model import access_allows

if TYPE_CHECKING:
    from forklb.worker import Listener, LocationRuntime, Worker

RECV_SIZE = sockio.RECV_SIZE
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGERING_TIME = 5.0  # at most this long reading what a rejected client still sends
LINGERING_TIMEOUT = 1.0  # ... and only while it keeps sending
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
# A connection idle this long between requests is parked (see ClientConnection.park).
# Not at once: parking and waking cost more than a greenlet's wait, and a busy
# keep-alive client sends its next request well within this.
PARK_AFTER = 0.5
ROUTES_KEPT = 1024  # distinct Host values whose routing a listener remembers
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux 3.12
UNSENT_MAX = 512 * 1024  # see ClientConnection.limit_unsent


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading."""


# nginx's info-level message when send_timeout expires
SEND_TIMED_OUT = "client timed out (110: Connection timed out) while sending response to client"
HEADER_TIMED_OUT = ("client timed out (110: Connection timed out) while reading client "
                    "request headers")
BODY_TIMED_OUT = "client timed out (110: Connection timed out) while reading client request body"
BODY_TOO_SLOW = ("client sent the request body slower than client_body_min_rate "
                 "while reading client request body")


class Exchange:
    """One request and what is known of its response; the ``$variable`` context.

    The class attributes are the defaults: a request sets only what it has (an
    exchange is made per request, and most of these never change).
    """

    target_raw = b""
    # an absolute-form target (http://host/path) as received: $request shows it,
    # as nginx does, while target_raw becomes its path
    target_received: bytes | None = None
    headers_done = False
    complete = False
    method_b = b""
    version = "1.1"
    keep_alive = False
    status = 0
    body_bytes_sent = 0
    bytes_sent = 0
    host = ""
    uri = ""
    args = ""
    path = ""
    server = None
    location = None
    proxy_host = ""
    upstream_addr = ""
    upstream_status = ""
    upstream_time: float | None = None  # seconds to the response head, all tries
    upstream_connect_time = ""
    expect_continue = False  # "Expect: 100-continue": answered when the body is read
    content_length: int | None = None
    chunked = False
    header_bytes = 0
    header_bytes_read = 0
    header_deadline = 0.0
    redirects = 0  # internal redirects so far (index, try_files, error_page)
    err_status = 0  # error_page: the status a page is served with (0: its own)
    error_paged = False  # an error page was looked up: no second one
    request_method_b = b""  # the method as received, once error_page turned it into GET
    # An upgrade request (Connection: upgrade + Upgrade): the bytes that followed
    # its head, which belong to the tunnel if there is one; None otherwise.
    upgrade_tail: bytes | None = None
    # large_client_header_buffers: the header line still arriving (over several
    # reads) and how many lines ended; a limit broken by a complete header
    line_len = 0
    lines_seen = 0
    reject: tuple[int, str] | None = None  # (status, error log message)
    # Noted by ClientConnection.on_header as the headers arrive
    host_header: bytes | None = None
    host_repeated = False
    codings: list[bytes] | None = None  # Transfer-Encoding values
    expect: bytes | None = None
    header_map: dict[str, str] | None = None  # the NOTED_HEADERS values, by name

    def __init__(self, conn: ClientConnection, header_deadline: float):
        self.conn = conn
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.start_time = time.time()
        self.header_deadline = header_deadline

    # -- the $variable interface (see forklb.http.variables) --
    @property
    def method(self) -> str:
        return self.method_b.decode("latin-1")

    @property
    def target(self) -> str:
        return self.target_raw.decode("latin-1")

    @property
    def protocol(self) -> str:
        return f"HTTP/{self.version}"

    @property
    def request_line(self) -> str:
        method = self.request_method_b or self.method_b
        target = self.target_received or self.target_raw
        return f"{method.decode('latin-1')} {target.decode('latin-1')} HTTP/{self.version}"

    @property
    def remote_addr(self) -> str:
        return self.conn.remote_addr

    @property
    def remote_port(self) -> int:
        return self.conn.remote_port

    @property
    def scheme(self) -> str:
        return self.conn.scheme

    @property
    def https(self) -> str:
        """``$https``: "on" on a TLS connection."""
        return "on" if self.conn.scheme == "https" else ""

    @property
    def ssl_protocol(self) -> str:
        """``$ssl_protocol``: e.g. TLSv1.3 ("" without TLS)."""
        return self.conn.tls_detail("protocol")

    @property
    def ssl_cipher(self) -> str:
        return self.conn.tls_detail("cipher")

    @property
    def ssl_server_name(self) -> str:
        """``$ssl_server_name``: the name the client sent in SNI."""
        return self.conn.tls_detail("server_name")

    @property
    def server_port(self) -> int:
        return self.conn.listener.port

    @property
    def server_addr(self) -> str:
        return self.conn.listener.host

    @property
    def server_name(self) -> str:
        return self.server.names[0] if self.server and self.server.names else ""

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def connection_id(self) -> int:
        return self.conn.serial

    @property
    def connection_requests(self) -> int:
        return self.conn.requests

    def header(self, name: str) -> str:
        """Request header ``name`` (lower-case), repeated values joined by ", "."""
        if name in NOTED_NAMES:  # noted while parsing
            found = self.header_map
            return found.get(name, "") if found is not None else ""
        wanted = name.encode("latin-1")
        values = [v for n, v in self.headers if n.lower() == wanted]
        return b", ".join(values).decode("latin-1")

    @property
    def upstream_response_time(self) -> str:
        t = self.upstream_time
        return "" if t is None else f"{t:.3f}"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ClientConnection:
    """Serves the requests of one accepted client socket."""

    serial_counter = 0
    scheme = "http"  # "https" for forklb.http.tls.TlsConnection

    def tls_detail(self, what: str) -> str:
        """``$ssl_*`` values; a plain connection has none (see forklb.http.tls)."""
        return ""

    def __init__(self, worker: Worker, listener: Listener, sock: socket.socket,
                 address: tuple):
        self.worker = worker
        self.listener = listener
        self.sock = sock
        # A plain socket is read through a Stream (forklb.http.sockio); TLS through OpenSSL.
        self.stream = sockio.Stream(sock) if sock is not None and self.scheme == "http" else None
        self.remote_addr = address[0] if address else ""
        self.remote_port = address[1] if address and len(address) > 1 else 0
        self.pending: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.requests = 0
        self.idle = False
        self.idle_since = 0.0
        self.must_close = False
        self.linger = False  # close via _lingering_close (a response went out early)
        # Framing followed alongside llhttp (see _feed_framed): where a header section
        # ends, what is left of a Content-Length body, the chunked body being read.
        self.head_tail = b""
        self.body_left = 0
        self.chunks: ChunkScanner | None = None
        self.send_timeout = listener.send_timeout  # the location's, once one is chosen
        self.current: Exchange | None = None  # the request being answered, for the log
        self.keepalive_timeout = listener.keepalive_timeout  # the last location's, later
        self.parked = False  # idle without a greenlet: see park()
        self.watchers: tuple | None = None  # (read watcher, keepalive timer) while parked
        self.unsent_limited = False  # see limit_unsent
        ClientConnection.serial_counter += 1
        self.serial = ClientConnection.serial_counter

    # -- httptools callbacks: fill the Exchange being parsed --
    def on_message_begin(self) -> None:
        ex = Exchange(self, self.worker.now() + self.listener.client_header_timeout)
        self.parsing = ex
        self.pending.append(ex)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.target_raw += url
        ex.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        line = len(name) + len(value) + 4  # "name: value\r\n"
        ex.header_bytes += line
        if line > self.listener.header_line_max and ex.reject is None:
            ex.reject = (431, f'client sent too long header line: "{_shown_line(name, value)}"')
        # nginx's ignore_invalid_headers: "X_Forwarded_For" is dropped, never
        # mistaken for (or forwarded next to) X-Forwarded-For.
        lname = _LOWERED.get(name)
        if lname is None:
            lname = lowered_name(name)
        if lname:
            ex.headers.append((name, value))
            if lname in _NOTED:
                _note_header(ex, lname, value)
            if lname in NOTED_HEADERS:
                _note_for_variables(ex, lname, value)

    def on_headers_complete(self) -> None:
        ex = self.parsing
        p = self.parser
        ex.headers_done = True
        ex.method_b = p.get_method()
        ex.version = p.get_http_version()
        ex.keep_alive = p.should_keep_alive()
        listener = self.listener
        # CRLFs count, as in nginx's buffers: "GET /x HTTP/1.1\r\n", and the empty line
        request_line = len(ex.method_b) + len(ex.target_raw) + 12
        if request_line > listener.header_line_max:
            ex.reject = (414, "client sent too long URI")
        elif (ex.reject is None and ex.header_bytes + len(ex.method_b) + 14
              > listener.header_section_max):
            ex.reject = (431, "client sent too large request header")
        if ex.expect is not None:
            ex.expect_continue = ex.expect.lower() == b"100-continue" and ex.version != "1.0"
        if ex.codings:
            # Raised inside a callback: _feed takes it from the parser's error.
            try:
                ex.chunked = transfer_coding(ex.codings, ex.version)
            except Invalid as e:
                raise BadRequest(e.status, e.message) from None

    def on_body(self, body: bytes) -> None:
        self.parsing.body.append(body)

    def on_message_complete(self) -> None:
        self.parsing.complete = True

    # -- reading --
    def _feed(self, data: bytes) -> None:
        """Parse ``data``; malformed input becomes an error response and close."""
        try:
            self._feed_framed(data)
        except httptools.HttpParserUpgrade as e:
            # llhttp stops after the head of an upgrade request. The proxy may
            # tunnel it (forklb.http.proxy); either way this connection serves
            # no further request.
            self.must_close = True
            if self.parsing is not None:
                self._upgrade_stopped(self.parsing, data[e.args[0]:])
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, BadRequest):  # raised by one of our callbacks
                raise e.__context__ from None
            raise BadRequest(400, f"client sent invalid request: {e}") from None
        except Invalid as e:
            raise BadRequest(e.status, e.message) from None
        ex = self.parsing
        if ex is None:
            return
        if not ex.headers_done:
            self._meter_partial_header(ex, data)

    def _meter_partial_header(self, ex: Exchange, data: bytes) -> None:
        """large_client_header_buffers for a header still arriving, however it is split
        into reads: the line in progress and the section so far.

        Complete lines are measured by the callbacks.  Every byte read while the
        header is unfinished belongs to it, except, in the read where it began, the
        end of a pipelined request before it (counted too: the bound errs on the
        strict side only then).
        """
        listener = self.listener
        ex.header_bytes_read += len(data)
        newline = data.rfind(b"\n")
        if newline < 0:
            ex.line_len += len(data)
        else:
            ex.lines_seen += data.count(b"\n")
            ex.line_len = len(data) - newline - 1
        if len(ex.target_raw) > listener.header_line_max or (
                ex.lines_seen == 0 and ex.line_len > listener.header_line_max):
            raise BadRequest(414, "client sent too long URI")
        if ex.line_len > listener.header_line_max:
            raise BadRequest(431, "client sent too long header line")
        if ex.header_bytes_read > listener.header_section_max:
            raise BadRequest(431, "client sent too large request header")

    def _feed_framed(self, data: bytes) -> None:
        """Feed ``data`` to llhttp in pieces cut where framing changes.

        llhttp does not say where in ``data`` a header section ended, and
        ChunkScanner needs the exact start of a chunked body.  llhttp's strict
        mode ends every header section at its first CRLFCRLF, so the input is
        cut there; a Content-Length body is then counted off and a chunked body
        scanned to its end, after which the next header section begins.
        """
        feed = self.parser.feed_data
        pos, end = 0, len(data)
        if (self.chunks is None and not self.body_left and not self.head_tail
                and data.find(b"\r\n\r\n") == end - 4):
            # The usual read: one whole header section, nothing after it
            feed(data)
            ex = self.parsing
            if ex is not None and ex.headers_done and not ex.complete:
                self._body_follows(ex)
            return
        while pos < end:
            scanner = self.chunks
            if scanner is not None:
                n = scanner.advance(data, pos)
                if scanner.done:
                    self.chunks = None
            elif self.body_left:
                n = min(self.body_left, end - pos)
                self.body_left -= n
            else:
                cut = self._head_end(data, pos)
                if cut < 0:
                    rest = data[pos:] if pos else data
                    self.head_tail = (self.head_tail + rest[-3:])[-3:]
                    feed(rest)
                    return
                self.head_tail = b""
                try:
                    feed(data[pos:cut] if pos or cut < end else data)
                except httptools.HttpParserUpgrade as e:  # its offset made absolute
                    raise httptools.HttpParserUpgrade(pos + e.args[0]) from None
                pos = cut
                ex = self.parsing
                if ex is not None and ex.headers_done and not ex.complete:
                    self._body_follows(ex)
                continue
            feed(data[pos:pos + n] if pos or n < end else data)
            pos += n

    def _body_follows(self, ex: Exchange) -> None:
        """``ex``'s header section ended and its body is still to come: follow its
        framing from here."""
        if ex.chunked:
            self.chunks = ChunkScanner()
        elif ex.content_length:
            self.body_left = ex.content_length

    def _head_end(self, data: bytes, pos: int) -> int:
        """Offset just after the first CRLFCRLF in ``data[pos:]`` (one that began in
        the previous read counts), or -1."""
        tail = self.head_tail
        if tail:
            i = (tail + data[pos:pos + 3]).find(b"\r\n\r\n")
            if i >= 0:
                return pos + i + 4 - len(tail)
        i = data.find(b"\r\n\r\n", pos)
        return i + 4 if i >= 0 else -1
    def _upgrade_stopped(self, ex: Exchange, tail: bytes) -> None:
        """Keep what followed an upgrade request's head.  llhttp skips the body of
        such a request: when there is one (never tunnelled), a body-only parser
        takes over, so the request can still be answered normally."""
        ex.complete = True
        ex.upgrade_tail = tail
        if not ex.has_body:
            return
        ex.complete = False
        self.parser = httptools.HttpRequestParser(_BodyOnly(ex))
        # _feed_framed follows the body's framing from here, as after any head.
        if ex.chunked:
            self.chunks = ChunkScanner()
        else:
            self.body_left = ex.content_length
        framing = (b"Transfer-Encoding: chunked" if ex.chunked
                   else b"Content-Length: %d" % ex.content_length)
        self.parser.feed_data(b"POST / HTTP/1.1\r\nHost: body\r\n" + framing + b"\r\n\r\n")
        if tail:
            self._feed(tail)

    # -- the socket: plain here, TLS in forklb.http.tls --
    def _read(self, timeout: float) -> bytes:
        """What the client sends within ``timeout`` (0: what is there already);
        raises TimeoutError (BlockingIOError for 0) or OSError."""
        return self.stream.recv(timeout, eager=not self.requests)

    def _write(self, data: bytes) -> None:
        """Write all of ``data``, each wait bounded by ``send_timeout``."""
        sockio.send_all(self.sock, data, self.send_timeout)

    def _recv(self, timeout: float) -> bytes:
        try:
            return self._read(timeout)
        except OSError:
            return b""

    def _recv_within(self, timeout: float) -> bytes | None:
        """What the client sends within ``timeout`` (0: what is there already):
        None if nothing, b"" if it is gone."""
        try:
            return self._read(timeout)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return None
        except OSError:
            return b""

    def next_exchange(self, keepalive_timeout: float) -> Exchange | None:
        """The next request with complete headers, or None when the client is done
        or the connection was parked (``self.parked``)."""
        while True:
            if self.pending and self.pending[0].headers_done:
                return self.pending.popleft()
            if self.must_close:
                return None
            if not self.pending:
                # Between requests: wait PARK_AFTER in this greenlet, then park
                # instead of holding it in recv.  A connection woken from parking
                # is still idle since it first waited, and has something to read.
                # Even when the worker is stopping: the client may already be sending
                # its next request (it will get "Connection: close"); the drain loop
                # closes idle connections, parked ones included.
                if self.idle:
                    wait = 0.0
                else:
                    self.idle = True
                    self.idle_since = self.worker.now()
                    wait = min(PARK_AFTER, keepalive_timeout)
                data = self._recv_within(wait)
                if data is None:
                    left = self.idle_since + keepalive_timeout - self.worker.now()
                    if left > 0:
                        self.park(left)
                    return None
                self.idle = False
                if not data:
                    return None
                self._feed(data)
                continue
            # client_header_timeout is a deadline for the whole header: a client
            # that trickles bytes does not extend it (nginx only limits the gaps).
            # When it passes the connection is closed, as nginx does.
            deadline = self.pending[0].header_deadline
            timeout = deadline - self.worker.now()
            if timeout <= 0:
                return None
            data = self._recv(timeout)
            if not data:
                if self.worker.now() >= deadline:
                    self.worker.log.info(f"{HEADER_TIMED_OUT}, client: {self.remote_addr}")
                return None
            self._feed(data)

    def body_chunks(self, ex: Exchange) -> Iterator[bytes]:
        """Stream the request body as it arrives (decoded from chunked framing).

        A chunked body that grows past ``client_max_body_size`` ends in 413.
        """
        loc = ex.location
        limit = loc.client_max_body_size if loc is not None else 0
        idle = loc.client_body_timeout if loc is not None else 60.0
        rate = loc.client_body_min_rate if loc is not None else 0
        received = 0
        # client_body_min_rate counts from when forklb starts reading the body, so a
        # slow upstream connect is not held against the client.
        start = self.worker.now()
        while True:
            if ex.body:
                chunks, ex.body = ex.body, []
                for data in chunks:
                    received += len(data)
                    if limit and received > limit:
                        raise BadRequest(413, "client intended to send too large chunked body")
                    yield data
            if ex.complete:
                return
            if ex.expect_continue:
                # The client waits for this before it sends the body (nginx's
                # ngx_http_test_expect); sent once, and only when forklb reads it.
                ex.expect_continue = False
                self.send(CONTINUE)
            timeout = idle
            if rate:
                # forklb's client_body_min_rate: after client_body_timeout of grace,
                # each byte received buys 1/rate s more (a trickle is cut off).
                left = start + idle + received / rate - self.worker.now()
                if left <= 0:
                    self._body_timed_out(ex, BODY_TOO_SLOW)
                timeout = min(idle, left)
            try:
                data = self._read(timeout)
            except TimeoutError:
                if timeout < idle:
                    self._body_timed_out(ex, BODY_TOO_SLOW)
                self._body_timed_out(ex, BODY_TIMED_OUT)
            except OSError:
                data = b""
            if not data:
                raise ClientGone("client closed the connection while sending the body")
            self._feed(data)

    def relay_body(self, ex: Exchange, dst: socket.socket, dst_timeout: float,
                   splice_min: int) -> None:
        """Send the rest of a Content-Length request body to ``dst`` without the
        parser: what was read with the head by ``send``, the remainder spliced
        (from ``splice_min`` bytes on, 0: never, and from a plain client) or
        copied with recv_into.

        Afterwards the exchange is complete and a fresh parser waits for the next
        request, as if llhttp had seen the body.  ``dst`` failing raises
        TimeoutError or OSError (the caller's upstream errors); the client
        failing raises what :meth:`body_chunks` would.
        """
        loc = ex.location
        idle = loc.client_body_timeout if loc is not None else 60.0
        rate = loc.client_body_min_rate if loc is not None else 0
        start = self.worker.now()
        received = 0
        for data in ex.body:
            received += len(data)
            sockio.send_all(dst, data, dst_timeout)
        ex.body = []
        if ex.complete:
            return
        if ex.expect_continue:
            ex.expect_continue = False
            self.send(CONTINUE)
        timeout = splice.rate_timeout(idle, rate, start, received, self.worker.now)
        left = self.body_left

        def send(view: memoryview) -> None:
            sockio.send_all(dst, view, dst_timeout)

        try:
            if splice_min and left >= splice_min and splice.usable(self.sock):
                try:
                    splice.relay(self.sock.fileno(), dst.fileno(), left, timeout, dst_timeout)
                except splice.Unsupported:
                    splice.copy(self.sock, send, left, timeout)
            else:
                splice.copy(self.sock, send, left, timeout)
        except splice.SpliceFailed as e:
            if e.side == "dst":
                if e.kind == "timeout":
                    raise TimeoutError() from None
                raise e.err from None
            if e.kind == "timeout":
                self._body_timed_out(ex, BODY_TOO_SLOW if e.waited < idle else BODY_TIMED_OUT)
            raise ClientGone("client closed the connection while sending the body") from None
        self._body_spliced(ex)

    def _body_spliced(self, ex: Exchange) -> None:
        """llhttp never saw the relayed bytes: start the next request afresh."""
        self.body_left = 0
        self.head_tail = b""
        ex.complete = True
        self.parser = httptools.HttpRequestParser(self)

    def _body_timed_out(self, ex: Exchange, message: str) -> None:
        """408 and close (HAProxy's answer; nginx closes without one)."""
        ex.status = 408
        ex.keep_alive = False
        raise BadRequest(408, message)

    # -- writing --
    def send(self, data: bytes) -> None:
        """Write ``data``; each write must progress within ``send_timeout`` (nginx's
        "between two successive write operations"), else the connection is closed."""
        try:
            self._write(data)
        except TimeoutError:
            raise self.send_timed_out() from None
        except OSError as e:
            raise ClientGone(str(e)) from None

    def limit_unsent(self) -> None:
        """Before a large body: let the kernel queue at most UNSENT_MAX bytes the
        client has not taken yet (TCP_NOTSENT_LOWAT), once per connection.

        Without it a write fills the socket's whole autotuned buffer (up to
        tcp_wmem's 4 MiB): copying megabytes a slow reader will never take, per
        connection, holding kernel memory, and keeping the worker's loop (and its
        timers: send_timeout) busy while it copies.
        """
        if self.unsent_limited:
            return
        self.unsent_limited = True
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, UNSENT_MAX)
        except OSError:
            pass

    def send_timed_out(self) -> ClientGone:
        """Log an expired ``send_timeout`` and arm a reset for the close; the caller
        raises what this returns."""
        self.worker.log.info(self._context(SEND_TIMED_OUT))
        # Reset rather than close (nginx's "reset_timedout_connection on"): a
        # plain close leaves the unsent data and the connection to the kernel,
        # which a slow reader keeps alive for as long as it likes.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        return ClientGone(SEND_TIMED_OUT)

    def _context(self, message: str) -> str:
        """nginx's error context for the request being answered."""
        text = f"{message}, client: {self.remote_addr}"
        ex = self.current
        if ex is not None:
            text += f', server: {ex.server_name}, request: "{ex.request_line}"'
            if ex.host:
                text += f', host: "{ex.host}"'
        return text

    def respond_simple(self, ex: Exchange, status: int, body: bytes | None = None,
                       content_type: bytes = b"text/html",
                       extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if (body is None and ex.location is not None and ex.location.error_pages
                and not ex.error_paged and internal.intercept(self, ex, status)):
            return
        keep = self.keep_alive_after(ex)
        data = protocol.simple_response(status, self.worker.date.now(), body, content_type,
                                        keep_alive=keep, extra=extra,
                                        head_only=ex.method_b == b"HEAD")
        ex.status = status
        ex.bytes_sent = len(data)
        ex.body_bytes_sent = len(body) if body is not None else len(data)
        if not keep:
            self.must_close = True
            self.linger = not ex.complete
        self.send(data)

    def keep_alive_after(self, ex: Exchange) -> bool:
        return (ex.keep_alive and ex.complete and not self.must_close and not self.worker.stopping
                and (ex.location is None or self.requests < ex.location.keepalive_requests))

    # -- parking: an idle keep-alive connection without a greenlet (nginx's model) --
    def park(self, timeout: float) -> None:
        """Wait for the next request with a read watcher and a keepalive timer on
        the hub instead of a greenlet blocked in recv (which costs ~9 KiB).

        The caller's greenlet then returns without closing the socket; the
        watcher serves the connection again in a new greenlet (:meth:`_wake`),
        the timer closes it (:meth:`_expire`).
        """
        if self.stream is not None:
            self.stream.pause()
        loop = self.worker.loop
        readable = loop.io(self.sock.fileno(), 1)
        timer = loop.timer(timeout)
        self.watchers = (readable, timer)
        self.parked = True
        self.current = None  # the last exchange need not be kept
        readable.start(self._wake)
        timer.start(self._expire)

    def _unpark(self) -> bool:
        """Stop the watchers; False if the connection was not parked."""
        if not self.parked:
            return False
        self.parked = False
        readable, timer = self.watchers
        self.watchers = None
        readable.stop()
        timer.stop()
        readable.close()
        timer.close()
        if self.stream is not None:
            self.stream.resume()
        return True

    def _wake(self) -> None:
        """The client sent something (or closed): serve on, in a greenlet whose
        parent is the hub (a raw greenlet: cheaper than gevent.spawn)."""
        if self._unpark():
            greenlet(self._resume, self.worker.hub).switch()

    def _resume(self) -> None:
        """Body of a greenlet serving a parked connection again.  Nothing may
        escape it: it would be raised in the hub."""
        try:
            if self.serve():
                return  # parked again
        except BaseException:  # noqa: BLE001 - report as gevent does, keep the hub alive
            self.worker.hub.print_exception(self, *sys.exc_info())
        self.worker.connection_closed(self)

    def _expire(self) -> None:
        """keepalive_timeout passed while parked: close, as nginx does."""
        if not self._unpark():
            return
        self._close()
        self.worker.connection_closed(self)

    # -- the loop --
    def serve(self) -> bool:
        """Serve requests until the client is done (the socket is then closed) or
        the connection is parked (True: the socket stays open)."""
        try:
            self._serve()
        except ClientGone:
            pass
        except BadRequest as e:
            self.worker.log.info(f"{e.message}, client: {self.remote_addr}")
            data = protocol.simple_response(e.status, self.worker.date.now())
            try:
                self._write(data)
            except (OSError, ValueError, AttributeError):  # (a TLS socket shut down)
                pass
            self.linger = True
            if e.exchange is not None:  # refused while parsing: logged and counted as nginx
                e.exchange.status = e.status
                e.exchange.bytes_sent = e.exchange.body_bytes_sent = len(data)
                self.worker.access_log(e.exchange)
        finally:
            if not self.parked:
                if self.linger:
                    self._lingering_close()
                self._close()
        return self.parked

    def _refused_exchange(self) -> Exchange:
        """The request a parse error or a header limit refused: the one being
        parsed, or an empty one when nothing of it was."""
        ex = self.parsing
        if ex is None or ex is self.current:  # (current: answered and logged already)
            ex = Exchange(self, 0.0)
        if not ex.method_b and self.parser is not None:
            try:
                ex.method_b = self.parser.get_method()  # known once the method was read
            except httptools.HttpParserError:
                pass
        ex.keep_alive = False
        return ex

    def _close(self) -> None:
        # Break the cycles through this connection (the parser holds it for its
        # callbacks, each exchange refers back to it): freed at once, rather than
        # left to the cyclic collector, whose pauses show in the tail latency.
        self.parser = None
        self.current = self.parsing = None
        self.pending.clear()
        try:
            if self.stream is not None:
                self.stream.close()  # its watcher before the descriptor
            else:
                self.sock.close()
        except OSError:
            pass

    def _lingering_close(self) -> None:
        """Half-close, then read and drop what the client still sends (nginx's
        lingering_close): closing with unread input would reset the connection
        and could destroy the response before the client reads it."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + LINGERING_TIME
        while time.monotonic() < deadline:
            if not self._recv(LINGERING_TIMEOUT):
                return

    def _serve(self) -> None:
        while True:
            # A new connection waits for its first request client_header_timeout
            # (the default server's, as in nginx), later ones keepalive_timeout.
            wait = self.keepalive_timeout if self.requests else self.listener.client_header_timeout
            try:
                ex = self.next_exchange(wait)
            except BadRequest as e:
                e.exchange = self._refused_exchange()
                raise
            if ex is None:
                return
            self.requests += 1
            self.handle(ex)
            if ex.location is not None:
                self.keepalive_timeout = ex.location.keepalive_timeout
                if self.keepalive_timeout <= 0:
                    self.must_close = True
            # What the response announced decides, not the state now: a worker told
            # to stop after answering "keep-alive" must still serve the next request.
            if self.must_close:
                return

    def handle(self, ex: Exchange) -> None:
        self.current = ex
        if ex.reject is not None:
            status, message = ex.reject
            self.worker.log.info(f"{message} while reading client request headers, "
                                 f"client: {self.remote_addr}")
            ex.keep_alive = False
            self.must_close = True
            self.respond_simple(ex, status)
            self.worker.access_log(ex)
            return
        try:
            self._route(ex)
        except BadRequest as e:
            self.worker.log.info(f"{e.message}, client: {self.remote_addr}")
            ex.keep_alive = False
            self.respond_simple(ex, e.status)
            self.worker.access_log(ex)
            return
        runtime: LocationRuntime = self.worker.locations[id(ex.location)]
        self.send_timeout = ex.location.send_timeout
        try:
            if ex.location.access and not access_allows(ex.location.access, self.remote_addr):
                self.worker.log.error(f"access forbidden by rule, client: {self.remote_addr}, "
                                      f'server: {ex.server_name}, request: "{ex.request_line}"')
                self.respond_simple(ex, 403)
                return
            limit = ex.location.client_max_body_size
            if limit and ex.content_length is not None and ex.content_length > limit:
                self.worker.log.error(f"client intended to send too large body: "
                                      f"{ex.content_length} bytes, client: {self.remote_addr}, "
                                      f'server: {ex.server_name}, request: "{ex.request_line}"')
                ex.keep_alive = False
                self.respond_simple(ex, 413)
                return
            runtime.handler(self, ex, runtime)
        finally:
            self.worker.access_log(ex)

    def _route(self, ex: Exchange) -> None:
        target = ex.target_raw
        if ex.host_repeated:
            raise BadRequest(400, "client sent duplicate host header")
        host_header = ex.host_header
        if target[:1] != b"/":
            scheme, sep, rest = target.partition(b"://")
            if not sep or scheme.lower() not in (b"http", b"https"):
                raise BadRequest(400, "client sent invalid request target")
            authority, slash, path = rest.partition(b"/")
            host_header = authority
            ex.target_received = target
            ex.target_raw = slash + path or b"/"
        elif host_header is None and ex.version == "1.1":
            raise BadRequest(400, "client sent HTTP/1.1 request without \"Host\" header")
        # A fragment is no part of the URI or args (nginx drops it; RFC 9112 3.2 has none).
        path, _, args = ex.target_raw.partition(b"#")[0].partition(b"?")
        ex.args = args.decode("latin-1")
        try:
            ex.uri = normalize_path(path.decode("latin-1"))
        except BadPath:
            raise BadRequest(400, "client sent invalid request path") from None
        route = self.listener.routes.get(host_header)
        if route is None:
            route = self._route_host(host_header)
        host, server, matcher = route
        ex.server = server
        ex.host = host
        ex.location = matcher.match(ex.uri)

    def _route_host(self, host_header: bytes | None) -> tuple:
        """($host, server, location matcher) for a Host value, kept for the next
        requests with the same value (up to a bound)."""
        try:
            host = split_host(host_header.decode("latin-1")) if host_header is not None else ""
        except BadHost:
            raise BadRequest(400, "client sent invalid host header") from None
        server = self.listener.vhosts.select(host)
        route = (host or (server.names[0] if server.names else ""), server,
                 self.worker.matchers[id(server)])
        routes = self.listener.routes
        if len(routes) < ROUTES_KEPT:
            routes[host_header] = route
        return route


class _BodyOnly:
    """httptools callbacks that only add body bytes to one exchange."""

    __slots__ = ("ex",)

    def __init__(self, ex: Exchange):
        self.ex = ex

    def on_body(self, body: bytes) -> None:
        self.ex.body.append(body)

    def on_message_complete(self) -> None:
        self.ex.complete = True


_NOTED = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})


def _note_header(ex: Exchange, lname: bytes, value: bytes) -> None:
    """Keep what routing and framing need from one of the ``_NOTED`` headers."""
    if lname == b"host":
        if ex.host_header is not None:
            ex.host_repeated = True
        else:
            ex.host_header = value
    elif lname == b"content-length":
        ex.content_length = int(value)  # llhttp has checked it
    elif lname == b"transfer-encoding":
        if ex.codings is None:
            ex.codings = []
        ex.codings.append(value)
    else:
        ex.expect = value


def _note_for_variables(ex: Exchange, lname: bytes, value: bytes) -> None:
    """Keep a header that a ``$http_*`` variable reads (:meth:`Exchange.header`)."""
    found = ex.header_map
    if found is None:
        found = ex.header_map = {}
    key = lname.decode("latin-1")
    text = value.decode("latin-1")
    found[key] = f"{found[key]}, {text}" if key in found else text


def _shown_line(name: bytes, value: bytes) -> str:
    """The start of an over-long header line, as nginx logs it."""
    return (name + b": " + value)[:128].decode("latin-1") + "..."


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.exchange: Exchange | None = None  # a request refused before it was handled
