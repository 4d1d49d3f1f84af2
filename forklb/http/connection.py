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
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httptools

from forklb.http import protocol
from forklb.http.routing import BadHost, BadPath, normalize_path, split_host
from forklb.model import access_allows

if TYPE_CHECKING:
    from forklb.worker import Listener, LocationRuntime, Worker

MAX_HEADER_BYTES = 32 * 1024
RECV_SIZE = 65536
LINGERING_TIME = 5.0  # at most this long reading what a rejected client still sends
LINGERING_TIMEOUT = 1.0  # ... and only while it keeps sending


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading."""


class Exchange:
    """One request and what is known of its response; the ``$variable`` context."""

    __slots__ = (
        "conn", "target_raw", "headers", "headers_done", "complete", "body", "method_b",
        "version", "keep_alive", "start_time", "status", "body_bytes_sent", "bytes_sent",
        "host", "uri", "args", "path", "server", "location", "proxy_host", "upstream_addr",
        "upstream_status", "upstream_response_time", "content_length", "chunked",
        "header_bytes", "header_bytes_read", "header_deadline",
    )

    def __init__(self, conn: ClientConnection):
        self.conn = conn
        self.target_raw = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.body: list[bytes] = []
        self.method_b = b""
        self.version = "1.1"
        self.keep_alive = False
        self.start_time = time.time()
        self.status = 0
        self.body_bytes_sent = 0
        self.bytes_sent = 0
        self.host = ""
        self.uri = ""
        self.args = ""
        self.path = ""
        self.server = None
        self.location = None
        self.proxy_host = ""
        self.upstream_addr = ""
        self.upstream_status = ""
        self.upstream_response_time = ""
        self.content_length: int | None = None
        self.chunked = False
        self.header_bytes = 0
        self.header_bytes_read = 0
        self.header_deadline = 0.0

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
        return f"{self.method} {self.target} HTTP/{self.version}"

    @property
    def remote_addr(self) -> str:
        return self.conn.remote_addr

    @property
    def remote_port(self) -> int:
        return self.conn.remote_port

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
        wanted = name.encode("latin-1")
        values = [v for n, v in self.headers if n.lower() == wanted]
        return b", ".join(values).decode("latin-1")

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ClientConnection:
    """Serves the requests of one accepted client socket."""

    serial_counter = 0

    def __init__(self, worker: Worker, listener: Listener, sock: socket.socket,
                 address: tuple):
        self.worker = worker
        self.listener = listener
        self.sock = sock
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
        ClientConnection.serial_counter += 1
        self.serial = ClientConnection.serial_counter

    # -- httptools callbacks: fill the Exchange being parsed --
    def on_message_begin(self) -> None:
        ex = Exchange(self)
        ex.header_deadline = self.worker.now() + self.listener.client_header_timeout
        self.parsing = ex
        self.pending.append(ex)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.target_raw += url
        ex.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        ex.headers.append((name, value))
        ex.header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        ex = self.parsing
        p = self.parser
        ex.headers_done = True
        ex.method_b = p.get_method()
        ex.version = p.get_http_version()
        ex.keep_alive = p.should_keep_alive()
        for name, value in ex.headers:
            lname = name.lower()
            if lname == b"content-length":
                ex.content_length = int(value)
            elif lname == b"transfer-encoding":
                ex.chunked = True

    def on_body(self, body: bytes) -> None:
        self.parsing.body.append(body)

    def on_message_complete(self) -> None:
        self.parsing.complete = True

    # -- reading --
    def _feed(self, data: bytes) -> None:
        """Parse ``data``; malformed input becomes an error response and close."""
        before = self.parsing
        continuing = before is not None and not before.headers_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Tunnelling arrives with the proxy issue; answer this request
            # normally (Upgrade is hop-by-hop and not forwarded), then close.
            if self.parsing is not None:
                self.parsing.complete = True
            self.must_close = True
        except httptools.HttpParserError as e:
            raise BadRequest(400, f"client sent invalid request: {e}") from None
        ex = self.parsing
        if ex is None:
            return
        if continuing and ex is before and not ex.headers_done:
            # A header section still arriving over several reads: this bounds a
            # header that never ends (complete ones are measured exactly by the
            # callbacks; the first read's share is not counted, so the bound is loose).
            ex.header_bytes_read += len(data)
        if ex.header_bytes > MAX_HEADER_BYTES or ex.header_bytes_read > MAX_HEADER_BYTES:
            raise BadRequest(400, "client sent too large request header")

    def _recv(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(RECV_SIZE)
        except (TimeoutError, OSError):
            return b""

    def next_exchange(self, keepalive_timeout: float) -> Exchange | None:
        """The next request with complete headers, or None when the client is done."""
        while True:
            if self.pending and self.pending[0].headers_done:
                return self.pending.popleft()
            if self.must_close:
                return None
            waiting_for_new = not self.pending
            if waiting_for_new:
                # Even when the worker is stopping: the client may already be sending
                # its next request (it will get "Connection: close"); the drain loop
                # closes the connection once it has been idle for a while.
                self.idle = True
                self.idle_since = self.worker.now()
                timeout = keepalive_timeout
            else:
                # client_header_timeout is a deadline for the whole header: a client
                # that trickles bytes does not extend it (nginx only limits the gaps).
                # When it passes the connection is closed, as nginx does.
                timeout = self.pending[0].header_deadline - self.worker.now()
                if timeout <= 0:
                    return None
            data = self._recv(timeout)
            self.idle = False
            if not data:
                return None
            self._feed(data)

    def body_chunks(self, ex: Exchange) -> Iterator[bytes]:
        """Stream the request body as it arrives (decoded from chunked framing).

        A chunked body that grows past ``client_max_body_size`` ends in 413.
        """
        limit = ex.location.client_max_body_size if ex.location is not None else 0
        received = 0
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
            data = self._recv(ex.location.client_body_timeout if ex.location else 60.0)
            if not data:
                raise ClientGone("client closed the connection while sending the body")
            self._feed(data)

    # -- writing --
    def send(self, data: bytes) -> None:
        try:
            protocol.send_all(self.sock, data)
        except OSError as e:
            raise ClientGone(str(e)) from None

    def respond_simple(self, ex: Exchange, status: int, body: bytes | None = None,
                       content_type: bytes = b"text/html",
                       extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
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

    # -- the loop --
    def serve(self) -> None:
        try:
            self._serve()
        except ClientGone:
            pass
        except BadRequest as e:
            self.worker.log.info(f"{e.message}, client: {self.remote_addr}")
            try:
                self.sock.sendall(protocol.simple_response(e.status, self.worker.date.now()))
            except OSError:
                pass
            self.linger = True
        finally:
            if self.linger:
                self._lingering_close()
            try:
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
        keepalive_timeout = self.listener.keepalive_timeout
        while True:
            ex = self.next_exchange(keepalive_timeout)
            if ex is None:
                return
            self.requests += 1
            self.handle(ex)
            if ex.location is not None:
                keepalive_timeout = ex.location.keepalive_timeout
                if keepalive_timeout <= 0:
                    self.must_close = True
            # What the response announced decides, not the state now: a worker told
            # to stop after answering "keep-alive" must still serve the next request.
            if self.must_close:
                return

    def handle(self, ex: Exchange) -> None:
        try:
            self._route(ex)
        except BadRequest as e:
            self.worker.log.info(f"{e.message}, client: {self.remote_addr}")
            ex.keep_alive = False
            self.respond_simple(ex, e.status)
            self.worker.access_log(ex)
            return
        runtime: LocationRuntime = self.worker.locations[id(ex.location)]
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
        host_header = None
        for name, value in ex.headers:
            if name.lower() == b"host":
                if host_header is not None:
                    raise BadRequest(400, "client sent duplicate host header")
                host_header = value
        if target[:1] != b"/":
            scheme, sep, rest = target.partition(b"://")
            if not sep or scheme.lower() not in (b"http", b"https"):
                raise BadRequest(400, "client sent invalid request target")
            authority, slash, path = rest.partition(b"/")
            host_header = authority
            target = slash + path
            ex.target_raw = target or b"/"
        elif host_header is None and ex.version == "1.1":
            raise BadRequest(400, "client sent HTTP/1.1 request without \"Host\" header")
        # A fragment is no part of the URI or args (nginx drops it; RFC 9112 3.2 has none).
        path, _, args = ex.target_raw.partition(b"#")[0].partition(b"?")
        ex.args = args.decode("latin-1")
        try:
            ex.uri = normalize_path(path.decode("latin-1"))
        except BadPath:
            raise BadRequest(400, "client sent invalid request path") from None
        try:
            host = split_host(host_header.decode("latin-1")) if host_header is not None else ""
        except BadHost:
            raise BadRequest(400, "client sent invalid host header") from None
        server = self.listener.vhosts.select(host)
        ex.server = server
        ex.host = host or (server.names[0] if server.names else "")
        ex.location = self.worker.matchers[id(server)].match(ex.uri)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
