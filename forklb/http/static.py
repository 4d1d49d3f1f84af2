"""Serving files, as nginx's static, index and range modules (and try_files' lookup).

For locations without proxy_pass or return:

* the path is ``root`` + URI, or ``alias`` + the URI without the location prefix
  (a regex location's alias is the whole path);
* a URI ending in ``/`` tries the ``index`` names in order: the first that exists
  is served through an internal redirect to URI + name (so it may match another
  location, as in nginx); none: 403, or 404 when the directory is missing;
* a directory asked for without the slash: 301 to the slash form (query kept);
* ``Last-Modified``, ``ETag`` (``"%x-%x"`` of mtime and size), ``If-Modified-Since``
  (nginx's default ``exact`` match), ``If-None-Match`` -> 304, ``If-Match`` /
  ``If-Unmodified-Since`` -> 412;
* one ``Range: bytes=`` range -> 206 + ``Content-Range``; none satisfiable -> 416
  with ``Content-Range: bytes */SIZE``; several ranges -> the whole file (200),
  where nginx would send multipart/byteranges; ``If-Range`` as nginx;
* the body goes out with ``os.sendfile`` on the client socket, waiting for it to
  become writable through gevent (``sendfile off``: read and send).

Symlinks are followed (nginx's default ``disable_symlinks off``).  The URI is
already normalised (no ``..`` segments); an alias location whose prefix lacks
the trailing slash of its alias (``location /i { alias /data/; }`` with
``/i../x``) could still climb out, which nginx allows: forklb answers 404.

The header parsing and condition logic are pure functions, tested directly.
"""

from __future__ import annotations

import calendar
import email.utils
import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from forklb.http import internal, sockio
from forklb.http.connection import ClientConnection, ClientGone, Exchange
from forklb.http.protocol import reason
from forklb.http.returns import absolute

if TYPE_CHECKING:
    from forklb.worker import LocationRuntime

SMALL_FILE = 64 * 1024  # read and sent with the head in one write: fewer system calls
SENDFILE_CHUNK = 4 * 1024 * 1024  # per sendfile call, so one big file does not hog a greenlet
READ_CHUNK = 256 * 1024
REGEX_ALIAS = -1  # alias_len of a regex location: the alias is the whole path

_METHODS = (b"GET", b"HEAD", b"POST")
_CONDITIONAL = frozenset((b"if-modified-since", b"if-none-match", b"if-match",
                          b"if-unmodified-since", b"range", b"if-range"))


# -- pure functions -------------------------------------------------------------

def map_uri(uri: str, base: str, alias_len: int | None) -> str | None:
    """The file system path for ``uri``: ``root`` + uri, or alias + the rest.

    ``alias_len`` is None with ``root``, the location prefix's length with an
    alias, or REGEX_ALIAS.  None when an alias mapping would leave the alias
    directory through a ``..`` (see the module docstring).
    """
    if alias_len is None:
        return base + uri
    if alias_len == REGEX_ALIAS:
        return base
    rest = uri[alias_len:]
    if ".." in rest and ".." in (base + rest).split("/"):
        return None
    return base + rest


def etag(mtime: int, size: int) -> bytes:
    """nginx's strong ETag: ``"%xT-%xO"`` of the modification time and the size."""
    return b'"%x-%x"' % (mtime, size)


def http_date(ts: int) -> bytes:
    """RFC 1123 date as nginx writes it in Last-Modified."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(ts)).encode()


def parse_http_date(value: bytes) -> int | None:
    """Seconds since the epoch of an RFC 1123, RFC 850 or asctime date; None if invalid."""
    try:
        parsed = email.utils.parsedate(value.decode("latin-1"))
    except (TypeError, ValueError):
        return None
    if parsed is None:
        return None
    try:
        return calendar.timegm(parsed)
    except (OverflowError, ValueError):
        return None


def etag_matches(header: bytes, tag: bytes, weak: bool) -> bool:
    """``ngx_http_test_if_match``: ``*`` or any listed tag equal to ``tag``.

    With ``weak`` (If-None-Match) a ``W/`` prefix on either side is ignored.
    """
    header = header.strip()
    if header == b"*":
        return True
    if weak and tag.startswith(b"W/"):
        tag = tag[2:]
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if weak and candidate.startswith(b"W/"):
            candidate = candidate[2:]
        if candidate == tag:
            return True
    return False


def precondition(headers: dict[bytes, bytes], tag: bytes, mtime: int) -> int | None:
    """nginx's not-modified filter for a 200 response: 412, 304, or None (send it)."""
    unmodified = headers.get(b"if-unmodified-since")
    if unmodified is not None:
        when = parse_http_date(unmodified)
        if when is None or when < mtime:
            return 412
    match = headers.get(b"if-match")
    if match is not None and not etag_matches(match, tag, weak=False):
        return 412
    since = headers.get(b"if-modified-since")
    none_match = headers.get(b"if-none-match")
    if since is None and none_match is None:
        return None
    if since is not None and parse_http_date(since) != mtime:  # if_modified_since exact
        return None
    if none_match is not None and not etag_matches(none_match, tag, weak=True):
        return None
    return 304


FULL = "full"  # serve the whole file (no range, ignored range or several ranges)
PARTIAL = "partial"
UNSATISFIABLE = "unsatisfiable"


def parse_range(value: bytes, size: int) -> tuple[str, int, int]:
    """``ngx_http_range_parse`` for ``Range: bytes=...`` and a file of ``size`` bytes.

    Returns (FULL, 0, size), (PARTIAL, start, end) with ``end`` exclusive, or
    (UNSATISFIABLE, 0, 0).  Several satisfiable ranges give FULL (nginx would
    answer multipart/byteranges).
    """
    if value[:6].lower() != b"bytes=":
        return (FULL, 0, size)
    ranges: list[tuple[int, int]] = []
    for spec in value[6:].split(b","):
        spec = spec.strip(b" ")
        first, dash, last = spec.partition(b"-")
        first, last = first.strip(b" "), last.strip(b" ")
        if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
            return (UNSATISFIABLE, 0, 0)
        if not first:  # suffix: the last N bytes
            if not last:
                return (UNSATISFIABLE, 0, 0)
            n = int(last)
            start, end = (size - n if n < size else 0), size
        else:
            start = int(first)
            end = size if not last or int(last) >= size else int(last) + 1
        if start < end:
            ranges.append((start, end))
        elif start == 0:
            return (FULL, 0, size)
    if not ranges:
        return (UNSATISFIABLE, 0, 0)
    if len(ranges) > 1:
        return (FULL, 0, size)
    return (PARTIAL, *ranges[0])


def if_range_allows(if_range: bytes | None, tag: bytes, last_modified: int) -> bool:
    """``If-Range``: the range applies only if the validator still matches."""
    if if_range is None:
        return True
    if len(if_range) >= 2 and if_range.endswith(b'"'):
        return if_range == tag
    return parse_http_date(if_range) == last_modified


def resolve_try_files(tries: Iterable[tuple[str, bool]], to_path: Callable[[str], str | None],
                      kind: Callable[[str], bool | None]) -> str | None:
    """The first try_files name whose file exists: a directory for ``name/`` entries,
    a non-directory otherwise.  ``kind(path)`` is True for a directory, False for
    anything else, None when it does not exist.  None: fall back."""
    for name, want_dir in tries:
        path = to_path(name)
        if path is not None and kind(path) is want_dir:
            return name
    return None


def path_kind(path: str) -> bool | None:
    """True for a directory, False for another existing file, None if missing."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


# -- the handler ----------------------------------------------------------------

def serve_static(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
    """Answer ``ex`` from the file system (the location's content handler)."""
    if ex.method_b not in _METHODS:
        conn.respond_simple(ex, 405)
        return
    if ex.uri.endswith("/"):
        _serve_index(conn, ex, rt)
        return
    path = map_uri(ex.uri, rt.doc_root, rt.alias_len)
    if path is None:
        conn.respond_simple(ex, 404)
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        _open_failed(conn, ex, path, e)
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            location = ex.uri + "/" + ("?" + ex.args if ex.args else "")
            conn.respond_simple(ex, 301, extra=(
                (b"Location", absolute(location, ex).encode("utf-8", "surrogateescape")),))
        elif not stat.S_ISREG(st.st_mode):
            _log(conn, ex, f'"{path}" is not a regular file')
            conn.respond_simple(ex, 404)
        elif ex.method_b == b"POST":
            conn.respond_simple(ex, 405)
        else:
            _send_file(conn, ex, rt, fd, st)
    finally:
        os.close(fd)


def _open_failed(conn: ClientConnection, ex: Exchange, path: str, e: Exception) -> None:
    code = getattr(e, "errno", None)
    if code in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG) or code is None:
        status = 404
    elif code == errno.EACCES:
        status = 403
    else:
        status = 500
    if code is not None:  # log_not_found on, nginx's default
        _log(conn, ex, f'open() "{path}" failed ({code}: {os.strerror(code)})',
             "alert" if status == 500 else "error")
    conn.respond_simple(ex, status)


def _serve_index(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
    """The index module: redirect to the first index file that exists."""
    base = map_uri(ex.uri, rt.doc_root, rt.alias_len)
    if base is None:
        conn.respond_simple(ex, 404)
        return
    for name in ex.location.index:
        target = name if name.startswith("/") else ex.uri + name
        candidate = base + name if not name.startswith("/") else None
        if candidate is not None and path_kind(candidate) is None:
            continue
        internal.redirect(conn, ex, target, None)
        return
    if path_kind(base) is None:
        _log(conn, ex, f'"{base}" is not found (2: No such file or directory)')
        conn.respond_simple(ex, 404)
        return
    _log(conn, ex, f'directory index of "{base}" is forbidden')
    conn.respond_simple(ex, 403)


def _request_conditions(ex: Exchange) -> dict[bytes, bytes] | None:
    """The conditional and range request headers, or None when there are none."""
    found = None
    for name, value in ex.headers:
        lname = name.lower()
        if lname in _CONDITIONAL:
            if found is None:
                found = {}
            found.setdefault(lname, value)
    return found


def _send_file(conn: ClientConnection, ex: Exchange, rt: LocationRuntime, fd: int,
               st: os.stat_result) -> None:
    size = st.st_size
    mtime = int(st.st_mtime)
    tag = etag(mtime, size)
    status = ex.err_status or 200
    start, end = 0, size
    extra = b""
    if status == 200:
        conditions = _request_conditions(ex)
        if conditions is not None:
            verdict = precondition(conditions, tag, mtime)
            if verdict == 412:
                conn.respond_simple(ex, 412)
                return
            if verdict == 304:
                _send_not_modified(conn, ex, tag, mtime)
                return
            rng = conditions.get(b"range")
            if rng is not None and if_range_allows(conditions.get(b"if-range"), tag, mtime):
                kind, start, end = parse_range(rng, size)
                if kind == UNSATISFIABLE:
                    conn.respond_simple(ex, 416, extra=((b"Content-Range", b"bytes */%d" % size),))
                    return
                if kind == PARTIAL:
                    status = 206
                    extra = b"Content-Range: bytes %d-%d/%d\r\n" % (start, end - 1, size)
    keep = conn.keep_alive_after(ex)
    if not keep:
        conn.must_close = True
    ctype = rt.mime_types.get(_extension(ex.uri), ex.location.default_type)
    # nginx drops Last-Modified from error pages and Accept-Ranges from all but 200.
    head = b"".join((
        b"HTTP/1.1 %d %s\r\nServer: forklb\r\nDate: " % (status, _reason(status)),
        conn.worker.date.now(),
        b"\r\nContent-Type: ", ctype.encode("latin-1"),
        b"\r\nContent-Length: %d\r\n" % (end - start),
        b"Last-Modified: " + http_date(mtime) + b"\r\n" if status < 300 else b"",
        b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n",
        b"ETag: ", tag, b"\r\n",
        b"Accept-Ranges: bytes\r\n" if status == 200 else extra,
        b"\r\n",
    ))
    ex.status = status
    if ex.method_b == b"HEAD":
        conn.send(head)
        ex.bytes_sent = len(head)
        return
    sent = _send_body(conn, head, fd, start, end - start, ex.location.sendfile)
    ex.body_bytes_sent = sent
    ex.bytes_sent = len(head) + sent
    if sent != end - start:  # the file shrank under us: the length we announced is wrong
        conn.must_close = True


def _send_not_modified(conn: ClientConnection, ex: Exchange, tag: bytes, mtime: int) -> None:
    keep = conn.keep_alive_after(ex)
    if not keep:
        conn.must_close = True
    head = b"".join((
        b"HTTP/1.1 304 Not Modified\r\nServer: forklb\r\nDate: ", conn.worker.date.now(),
        b"\r\nLast-Modified: ", http_date(mtime),
        b"\r\nConnection: keep-alive\r\n" if keep else b"\r\nConnection: close\r\n",
        b"ETag: ", tag, b"\r\n\r\n",
    ))
    ex.status = 304
    ex.bytes_sent = len(head)
    conn.send(head)


def _send_body(conn: ClientConnection, head: bytes, fd: int, offset: int, count: int,
               use_sendfile: bool) -> int:
    """Send ``head`` then ``count`` bytes of ``fd`` from ``offset``; returns body bytes sent."""
    # sendfile writes the raw descriptor: never on a TLS socket (it has "cipher")
    if count <= SMALL_FILE or not use_sendfile or hasattr(conn.sock, "cipher"):
        data = os.pread(fd, min(count, READ_CHUNK), offset)
        conn.send(head + data)
        sent = len(data)
        while sent < count and data:
            data = os.pread(fd, min(count - sent, READ_CHUNK), offset + sent)
            conn.send(data)
            sent += len(data)
        return sent
    try:
        done = conn.sock.send(head, socket.MSG_MORE)  # leaves with the first file bytes
    except OSError as e:
        raise ClientGone(str(e)) from None
    if done < len(head):
        conn.send(head[done:])
    return _sendfile(conn, fd, offset, count)


def _sendfile(conn: ClientConnection, fd: int, offset: int, count: int) -> int:
    """``os.sendfile`` on the non-blocking client socket, yielding to gevent while it is full."""
    sock = conn.sock
    out = sock.fileno()
    conn.limit_unsent()
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(out, fd, offset + sent, min(count - sent, SENDFILE_CHUNK))
        except BlockingIOError:
            try:
                sockio.wait(sock, sock._write_event, conn.send_timeout)
            except TimeoutError:
                raise conn.send_timed_out() from None
            continue
        except OSError as e:
            raise ClientGone(str(e)) from None
        if n == 0:  # end of file: it shrank
            break
        sent += n
    return sent


def _extension(uri: str) -> str:
    """nginx's exten: what follows the last dot of the last path segment."""
    dot = uri.rfind(".")
    if dot < 0 or "/" in uri[dot:]:
        return ""
    return uri[dot + 1:].lower()


_REASONS = {200: b"OK", 206: b"Partial Content"}


def _reason(status: int) -> bytes:
    return _REASONS.get(status) or reason(status)


def _log(conn: ClientConnection, ex: Exchange, message: str, level: str = "error") -> None:
    getattr(conn.worker.log, level)(
        f'{message}, client: {conn.remote_addr}, server: {ex.server_name}, '
        f'request: "{ex.request_line}", host: "{ex.host}"')


# -- try_files ------------------------------------------------------------------

def with_try_files(handler: Callable) -> Callable:
    """``handler`` behind the location's ``try_files`` (built once per location)."""

    def try_files(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
        tf = ex.location.try_files
        loc = ex.location
        names = ((template.render(ex), want_dir) for template, want_dir in tf.tries)

        def to_path(name: str) -> str | None:
            # with an alias, a name under the location prefix loses the prefix (nginx)
            if rt.alias_len is not None and rt.alias_len != REGEX_ALIAS \
                    and name.startswith(loc.pattern):
                return map_uri(name, rt.doc_root, rt.alias_len)
            return rt.doc_root + name

        found = resolve_try_files(names, to_path, path_kind)
        if found is not None:
            ex.uri = found
            handler(conn, ex, rt)
        elif tf.code is not None:
            conn.respond_simple(ex, tf.code)
        else:
            target = tf.fallback.render(ex)
            if target.startswith("@"):
                internal.named(conn, ex, target)
            else:
                internal.redirect(conn, ex, *internal.split_args(target))

    return try_files
