"""Zero-copy relaying of large bodies between two sockets with ``os.splice``.

Bytes go socket → pipe → socket inside the kernel; Python only counts them.
Both pipe ends and both sockets are non-blocking (gevent sockets always are),
so an ``EAGAIN`` waits on the fd with gevent's hub and other greenlets run.

Pipes are kept in a small per-worker pool (this module's state lives in each
worker process; pipes are created lazily, so never before a fork), taken for
one body and given back empty.  A pipe left holding bytes (the destination
failed) is closed instead.

The first ``splice`` that fails with EINVAL/ENOSYS/EOPNOTSUPP (a kernel or
sandbox without it) turns splicing off for the worker for good: callers then
use :func:`copy` (recv_into a pooled buffer), as they do for bodies below
proxy_splice's size and on TLS sockets.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable

# Content-Length bodies from this size on are relayed without the HTTP parser
# (copied with recv_into a pooled buffer, or spliced); smaller ones go with the
# head in one write.
MIN_BODY = 64 * 1024
# ... and spliced from proxy_splice's size on (on: 16 MiB, SPLICE_DEFAULT_MIN in
# forklb.config.directives). Measured on loopback (bench/splice.py, Linux 6.18
# VM): below a few MiB recv_into a 256 KiB buffer is both faster and cheaper
# than splice; around 16 MiB they are even; for 1 GiB splice takes less CPU.
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ asked for; the kernel's answer is used
POOL_MAX = 8  # idle pipes kept per worker

_FLAGS_IN = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2) \
    | getattr(os, "SPLICE_F_MORE", 4)
_FLAGS_OUT = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# None: not tried yet; False: this worker copies (no os.splice or it failed once)
_working: bool | None = None if hasattr(os, "splice") else False
_free: list[Pipe] = []


class Pipe:
    """A non-blocking pipe pair and its capacity."""

    __slots__ = ("r", "w", "size")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above /proc/sys/fs/pipe-max-size for an unprivileged user
            self.size = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class SpliceFailed(Exception):
    """A relay stopped early. ``side`` is "src" or "dst"; ``kind`` is "eof",
    "timeout" or "error" (with ``err``, the OSError); ``moved`` is how many bytes
    reached the destination."""

    def __init__(self, side: str, kind: str, moved: int, err: OSError | None = None,
                 waited: float = 0.0):
        super().__init__(f"{side} {kind}")
        self.side = side
        self.kind = kind
        self.moved = moved
        self.err = err
        self.waited = waited  # a source timeout: the wait that expired


class Unsupported(Exception):
    """splice() is not available here; nothing was moved, copy instead."""


def usable(*socks: object) -> bool:
    """Whether bodies between ``socks`` may be spliced: splice not known to fail,
    and no TLS socket (an SSLSocket has ``cipher``; its bytes are encrypted)."""
    if _working is False:
        return False
    return not any(hasattr(s, "cipher") for s in socks)


def relay(src: int, dst: int, n: int, src_timeout: Callable[[int], float],
          dst_timeout: float) -> int:
    """Move exactly ``n`` bytes from fd ``src`` to fd ``dst``; returns ``n``.

    ``src_timeout(moved)`` gives the longest wait for the source to become
    readable (0 or less: already timed out); ``dst_timeout`` bounds each wait
    for the destination to take more.  Bytes read before a source failure are
    delivered first.  Raises :class:`SpliceFailed` or, on the first call in a
    worker that cannot splice, :class:`Unsupported`.
    """
    global _working
    pipe = _free.pop() if _free else Pipe()
    try:
        moved = _relay(pipe, src, dst, n, src_timeout, dst_timeout)
    except Unsupported:
        pipe.close()
        _disable()
        raise
    except SpliceFailed as e:
        if e.side == "dst":  # bytes may be left in the pipe
            pipe.close()
        else:
            _give_back(pipe)
        raise
    except BaseException:
        pipe.close()
        raise
    _working = True
    _give_back(pipe)
    return moved


def _disable() -> None:
    """Copy from now on in this worker; the pooled pipes are closed."""
    global _working
    _working = False
    while _free:
        _free.pop().close()


def _give_back(pipe: Pipe) -> None:
    if len(_free) < POOL_MAX:
        _free.append(pipe)
    else:
        pipe.close()


def _relay(pipe: Pipe, src: int, dst: int, n: int, src_timeout: Callable[[int], float],
           dst_timeout: float) -> int:
    """Fill the pipe from ``src`` with what is there, drain it to ``dst``, repeat."""
    from gevent.socket import wait_read  # worker-only: the master never has a hub

    splice = os.splice
    moved = 0
    while moved < n:
        try:
            got = splice(src, pipe.w, min(n - moved, pipe.size), flags=_FLAGS_IN)
        except BlockingIOError:
            timeout = src_timeout(moved)
            if timeout <= 0:
                raise SpliceFailed("src", "timeout", moved, waited=timeout) from None
            try:
                wait_read(src, timeout=timeout, timeout_exc=TimeoutError)
            except TimeoutError:
                raise SpliceFailed("src", "timeout", moved, waited=timeout) from None
            continue
        except OSError as e:
            if e.errno in _UNSUPPORTED and _working is None and not moved:
                raise Unsupported() from e
            raise SpliceFailed("src", "error", moved, e) from None
        if not got:
            raise SpliceFailed("src", "eof", moved)
        _drain(pipe, dst, got, dst_timeout, moved)
        moved += got
    return moved


def _drain(pipe: Pipe, dst: int, count: int, timeout: float, moved: int) -> None:
    """Write the ``count`` bytes in the pipe to ``dst``; each wait for ``dst`` to
    take more is bounded by ``timeout`` (send_timeout's "between two writes")."""
    from gevent.socket import wait_write

    splice = os.splice
    done = 0
    while done < count:
        try:
            done += splice(pipe.r, dst, count - done, flags=_FLAGS_OUT)
        except BlockingIOError:
            try:
                wait_write(dst, timeout=timeout, timeout_exc=TimeoutError)
            except TimeoutError:
                raise SpliceFailed("dst", "timeout", moved + done) from None
        except OSError as e:
            if e.errno in _UNSUPPORTED and _working is None:
                # The source spliced but this end cannot: the bytes in the pipe are
                # lost for this response (closed as on any write error); copy from now.
                _disable()
            raise SpliceFailed("dst", "error", moved + done, e) from None


def rate_timeout(idle: float, rate: int, start: float, received: int,
                 now: Callable[[], float]) -> Callable[[int], float]:
    """``src_timeout`` for a request body: client_body_timeout between reads and,
    with client_body_min_rate, the deadline that each byte extends by 1/rate s
    (the rule of ``ClientConnection.body_chunks``); ``received`` counts bytes
    read before the splice."""
    if not rate:
        return lambda moved: idle

    def timeout(moved: int) -> float:
        return min(idle, start + idle + (received + moved) / rate - now())

    return timeout


# -- the copying fallback -------------------------------------------------------

BUFFER_SIZE = 256 * 1024
_buffers: list[memoryview] = []


def copy(src: socket.socket, send: Callable[[memoryview], None], n: int,
         src_timeout: Callable[[int], float] | None = None) -> int:
    """Move exactly ``n`` bytes from ``src`` with ``recv_into`` a pooled buffer and
    ``send`` (bodies below proxy_splice's size, TLS, workers that cannot splice);
    returns ``n``.

    ``src_timeout(moved)`` bounds each read as for :func:`relay` (None: the
    socket's own timeout does).  A source failure raises
    :class:`SpliceFailed` (side "src", after sending what came); ``send``'s
    exceptions pass through.  No parser sees the bytes and no ``bytes`` object
    is made per read, unlike the framing-aware path.
    """
    view = _buffers.pop() if _buffers else memoryview(bytearray(BUFFER_SIZE))
    moved = 0
    try:
        while moved < n:
            timeout = 0.0
            try:
                if src_timeout is not None:
                    timeout = src_timeout(moved)
                    if timeout <= 0:
                        raise TimeoutError
                    src.settimeout(timeout)
                got = src.recv_into(view, min(n - moved, BUFFER_SIZE))
            except TimeoutError:
                raise SpliceFailed("src", "timeout", moved, waited=timeout) from None
            except OSError as e:
                raise SpliceFailed("src", "error", moved, e) from None
            if not got:
                raise SpliceFailed("src", "eof", moved)
            send(view[:got])
            moved += got
    finally:
        if len(_buffers) < POOL_MAX:
            _buffers.append(view)
    return moved
