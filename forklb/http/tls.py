"""TLS termination: ``listen ... ssl`` and the ``ssl_*`` directives.

Three moments, each doing its share once:

* config load (master, ``forklb -t``, reload): :func:`load_problem` loads every
  certificate and key and checks ``ssl_ciphers``, so a bad file is a config
  error and a reload keeps the running configuration;
* worker start: :func:`build_context` makes one ``ssl.SSLContext`` per distinct
  server setting and :class:`TlsFront` one front context per ssl address, whose
  SNI callback switches to the named server's context;
* per connection (:meth:`TlsFront.accept`, in the connection's greenlet): peek
  at the first byte, then a handshake bounded by ``client_header_timeout``.
  Plain HTTP on an ssl port gets nginx's 400 "The plain HTTP request was sent
  to HTTPS port" once its header has been read.

``ssl`` is imported at module level on purpose: the master only touches
``ssl.SSLContext`` through the module, so gevent's later patching in the
worker (which replaces the module's attributes) covers every use here.
"""

from __future__ import annotations

import errno
import socket
import ssl
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forklb.http import protocol
from forklb.http.connection import RECV_SIZE, BadRequest, ClientConnection, ClientGone, Exchange
from forklb.model import Tls

if TYPE_CHECKING:
    from forklb.model import Server

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_ORDER = tuple(_VERSIONS)
_NO_FLAGS = {
    "TLSv1": ssl.OP_NO_TLSv1, "TLSv1.1": ssl.OP_NO_TLSv1_1,
    "TLSv1.2": ssl.OP_NO_TLSv1_2, "TLSv1.3": ssl.OP_NO_TLSv1_3,
}

# What nginx without http2 agrees to when the client offers ALPN.
ALPN = ["http/1.1", "http/1.0"]

PLAIN_HTTP_TITLE = b"400 The plain HTTP request was sent to HTTPS port"
PLAIN_HTTP_PAGE = (b"<html>\r\n<head><title>" + PLAIN_HTTP_TITLE + b"</title></head>\r\n"
                   b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
                   b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
                   b"<hr><center>" + protocol.SERVER_NAME + b"</center>\r\n</body>\r\n"
                   b"</html>\r\n")


# -- config load --------------------------------------------------------------

def _no_password() -> bytes:
    # An encrypted key must fail, not prompt on the terminal (no ssl_password_file).
    return b""


def _reason(e: OSError) -> str:
    """An OpenSSL or system error the way nginx prints it after ``failed``."""
    if isinstance(e, ssl.SSLError):
        text = e.args[1] if len(e.args) > 1 else str(e)
        return f"(SSL: {text})"
    if e.errno is not None:
        return f"({e.errno}: {e.strerror})"
    return f"({e})"


def load_problem(tls: Tls) -> tuple[str, str, int] | None:
    """Load ``tls``'s files and check its ciphers as a worker will.

    Returns None when all is well, else (nginx's message, the directive to
    blame, which occurrence of it).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.set_ciphers(tls.ciphers)
    except ssl.SSLError as e:
        return (f'SSL_CTX_set_cipher_list("{tls.ciphers}") failed {_reason(e)}', "ssl_ciphers",
                0)
    for i, (cert, key) in enumerate(tls.certificates):
        try:
            ctx.load_verify_locations(cafile=cert)  # parses the certificate file alone
        except OSError as e:
            what = "BIO_new_file()" if not isinstance(e, ssl.SSLError) else \
                "PEM_read_bio_X509_AUX()"
            return (f'cannot load certificate "{cert}": {what} failed {_reason(e)}',
                    "ssl_certificate", i)
        try:
            ctx.load_cert_chain(cert, key, password=_no_password)
        except OSError as e:
            if isinstance(e, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(e):
                return (f'SSL_CTX_use_PrivateKey("{key}") failed {_reason(e)}',
                        "ssl_certificate_key", i)
            what = "BIO_new_file()" if not isinstance(e, ssl.SSLError) else \
                "PEM_read_bio_PrivateKey()"
            return (f'cannot load certificate key "{key}": {what} failed {_reason(e)}',
                    "ssl_certificate_key", i)
    return None


# -- worker start -------------------------------------------------------------

def build_context(tls: Tls) -> ssl.SSLContext:
    """A server-side context for ``tls`` (call after gevent patched ``ssl``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    enabled = [p for p in _ORDER if p in tls.protocols]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # OP_NO_* for gaps only
        if enabled:
            ctx.minimum_version = _VERSIONS[enabled[0]]
            ctx.maximum_version = _VERSIONS[enabled[-1]]
            gaps = _ORDER[_ORDER.index(enabled[0]):_ORDER.index(enabled[-1]) + 1]
            for name in gaps:
                if name not in enabled:  # "TLSv1 TLSv1.2": TLSv1.1 stays off
                    ctx.options |= _NO_FLAGS[name]
        else:  # only SSLv2/SSLv3 named: nothing OpenSSL can speak, as with nginx
            for flag in _NO_FLAGS.values():
                ctx.options |= flag
    ctx.set_ciphers(tls.ciphers)
    ctx.set_alpn_protocols(ALPN)
    if tls.prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    for cert, key in tls.certificates:
        ctx.load_cert_chain(cert, key, password=_no_password)
    return ctx


class TlsFront:
    """One ssl listening address: its handshake context and SNI server choice."""

    def __init__(self, vhosts: Any, contexts: dict[Tls, ssl.SSLContext], log: Any,
                 timeout: float, now: Callable[[], float]):
        """``vhosts``: the address's VirtualHosts; ``contexts``: one per distinct
        server setting, shared by all addresses of the worker."""
        default: Server = vhosts.default
        self.vhosts = vhosts
        self.contexts = contexts
        self.default_tls = default.tls
        # Its own context (same settings as the default server's) so the SNI
        # callback can know which address's server names to look up.
        self.context = build_context(default.tls)
        self.context.sni_callback = self._sni
        self.log = log
        self.timeout = timeout
        self.now = now

    def _sni(self, sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        """OpenSSL's servername callback: switch to the named server's certificate.

        A server without certificates of its own keeps the default server's, as in nginx.
        """
        if not name:
            return
        sock.sni_name = name  # for $ssl_server_name
        tls = self.vhosts.select(name.lower().rstrip(".")).tls
        if tls is not None and tls != self.default_tls:
            sock.context = self.contexts[tls]

    def accept(self, sock: Any, address: tuple) -> tuple[Any, type[ClientConnection] | None]:
        """Make an accepted socket ready for HTTP: (socket, connection class to serve it),
        or (None, None) when the client is gone or the handshake failed."""
        deadline = self.now() + self.timeout
        client = address[0] if address else ""
        sock.settimeout(self.timeout)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            first = b""
        if not first:  # gone, or silent for client_header_timeout
            _close(sock)
            return None, None
        if not (first[0] & 0x80 or first[0] == 0x16):  # not SSLv2 or TLS: nginx's test
            return sock, PlainHttpOnTlsConnection
        tls_sock = None
        try:
            # TLS writes small records (handshake flights, session tickets, then the
            # response): without TCP_NODELAY, Nagle holds the next one for the client's
            # delayed ACK.  nginx sets it on SSL connections too.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls_sock = self.context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
            tls_sock.settimeout(max(deadline - self.now(), 0.001))
            tls_sock.do_handshake()
        except (OSError, ValueError) as e:
            # Clients going away mid-handshake are routine: info level, as nginx.
            self.log.info(f"{_handshake_error(e)} while SSL handshaking, client: {client}")
            _close(tls_sock if tls_sock is not None else sock)  # wrapping detached sock
            return None, None
        return tls_sock, TlsConnection


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _handshake_error(e: BaseException) -> str:
    # gevent's handshake timeout is an SSLError saying "timed out", without errno
    if (isinstance(e, TimeoutError) or getattr(e, "errno", None) == errno.ETIMEDOUT
            or "timed out" in str(e)):
        return "client timed out (110: Connection timed out)"
    if isinstance(e, ssl.SSLError):
        return f"SSL_do_handshake() failed {_reason(e)}"
    return f"SSL_do_handshake() failed ({e})"


# -- per connection -----------------------------------------------------------

class TlsConnection(ClientConnection):
    """A client connection over TLS: ``$scheme`` is https, ``$https`` is on.

    A TLS socket shut down under a waiting read (graceful stop, lingering close)
    can fail with ValueError/AttributeError instead of OSError: both mean the
    client is gone.
    """

    scheme = "https"

    def tls_detail(self, what: str) -> str:
        """``$ssl_protocol``, ``$ssl_cipher``, ``$ssl_server_name``."""
        sock = self.sock
        try:
            if what == "protocol":
                return sock.version() or ""
            if what == "cipher":
                cipher = sock.cipher()
                return cipher[0] if cipher else ""
            return getattr(sock, "sni_name", "")
        except (ValueError, AttributeError):  # shut down meanwhile
            return ""

    # gevent's SSLSocket methods: the bytes pass through OpenSSL
    def _read(self, timeout: float) -> bytes:
        sock = self.sock
        sock.settimeout(timeout)
        return sock.recv(RECV_SIZE)

    def _write(self, data: bytes) -> None:
        sock = self.sock
        sock.settimeout(self.send_timeout)
        sent = sock.send(data)
        if sent < len(data):
            view = memoryview(data)
            while sent < len(data):
                sent += sock.send(view[sent:])

    def _recv(self, timeout: float) -> bytes:
        try:
            return super()._recv(timeout)
        except (ValueError, AttributeError):
            return b""

    def _recv_within(self, timeout: float) -> bytes | None:
        # OpenSSL's buffered plaintext comes first; WANT_READ only when none is left.
        try:
            return super()._recv_within(timeout)
        except (ValueError, AttributeError):
            return b""

    def send(self, data: bytes) -> None:
        try:
            super().send(data)
        except (ValueError, AttributeError) as e:
            raise ClientGone(str(e)) from None


class PlainHttpOnTlsConnection(ClientConnection):
    """Plain HTTP sent to an ssl port: read the request header, answer nginx's 400
    (its internal 497), log it, close."""

    def handle(self, ex: Exchange) -> None:
        ex.keep_alive = False
        self.worker.log.info(f"client sent plain HTTP request to HTTPS port while reading "
                             f"client request headers, client: {self.remote_addr}")
        try:
            self._route(ex)  # for the access log's server and location
        except BadRequest:  # a bad request gets the same answer
            ex.location = None
        try:
            self.respond_simple(ex, 400, PLAIN_HTTP_PAGE)
        finally:
            self.worker.access_log(ex)
