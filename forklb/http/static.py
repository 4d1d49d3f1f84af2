"""Serving files from ``root`` with ``index``, for locations without proxy_pass.

Enough of nginx's static module for web sites like the demo's web01/web02:
GET and HEAD, index files for directories, a 301 to add the trailing slash,
404/403, MIME type by extension with ``default_type`` as fallback.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from forklb.http.connection import ClientConnection, Exchange

if TYPE_CHECKING:
    from forklb.worker import LocationRuntime

CHUNK = 256 * 1024


def serve_static(conn: ClientConnection, ex: Exchange, rt: LocationRuntime) -> None:
    loc = ex.location
    if ex.method_b not in (b"GET", b"HEAD"):
        conn.respond_simple(ex, 405)
        return
    path = os.path.join(loc.root, ex.uri.lstrip("/"))
    if ex.uri.endswith("/"):
        for name in loc.index:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            status = 403 if os.path.isdir(path) else 404
            _log_missing(conn, ex, path, status)
            conn.respond_simple(ex, status)
            return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        _log_missing(conn, ex, path, 404)
        conn.respond_simple(ex, 404)
        return
    except (PermissionError, NotADirectoryError):
        conn.respond_simple(ex, 403)
        return
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            location = (ex.uri + "/").encode("utf-8", "surrogateescape")
            conn.respond_simple(ex, 301, extra=((b"Location", location),))
            return
        _send_file(conn, ex, rt, f, st.st_size)


def _send_file(conn: ClientConnection, ex: Exchange, rt: LocationRuntime, f, size: int) -> None:
    ext = os.path.splitext(ex.uri)[1][1:].lower()
    ctype = rt.mime_types.get(ext, ex.location.default_type)
    keep = conn.keep_alive_after(ex)
    if not keep:
        conn.must_close = True
    head = (b"HTTP/1.1 200 OK\r\nServer: forklb\r\nDate: %s\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\nConnection: %s\r\n\r\n"
            % (conn.worker.date.now(), ctype.encode(), size,
               b"keep-alive" if keep else b"close"))
    ex.status = 200
    if ex.method_b == b"HEAD":
        conn.send(head)
        ex.bytes_sent = len(head)
        return
    data = f.read(CHUNK)
    conn.send(head + data)
    sent = len(data)
    while sent < size:
        data = f.read(CHUNK)
        if not data:
            break
        conn.send(data)
        sent += len(data)
    ex.body_bytes_sent = sent
    ex.bytes_sent = len(head) + sent
    if sent != size:  # the file shrank under us: the length we announced is wrong
        conn.must_close = True


def _log_missing(conn: ClientConnection, ex: Exchange, path: str, status: int) -> None:
    what = "is not found" if status == 404 else "directory index is forbidden"
    conn.worker.log.error(f'"{path}" {what} (2: No such file or directory), client: '
                          f'{conn.remote_addr}, server: {ex.server_name}, request: '
                          f'"{ex.request_line}", host: "{ex.host}"')
