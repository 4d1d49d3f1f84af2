"""Reads and writes on plain gevent sockets for the request path, each wait bounded
by a timeout, at the cost of a bare loop timer.

gevent's own socket methods cover every wait with a ``gevent.Timeout`` (a
Python object, about 2.3 µs to start and cancel) and go through several
Python-level layers; a proxied request waits about twice.  Here a write is tried
at once on the underlying socket, and only when it would block does the greenlet
wait on the socket's own io watcher, with a libev timer (0.2 µs) that throws
``TimeoutError`` into it.  Closing the socket from another greenlet still wakes
the waiter, with gevent's "closed in another greenlet" error, because the watcher
is the socket's.  Reads go through a :class:`Stream`, which waits first.

Only for plain TCP sockets: a TLS socket's bytes pass through OpenSSL, so it
keeps gevent's methods (:class:`forklb.http.tls.TlsConnection`).
"""

from __future__ import annotations

import array
import fcntl
import termios

from greenlet import getcurrent

RECV_SIZE = 65536


def wait(sock, watcher, timeout: float | None) -> None:
    """Block the current greenlet until ``watcher`` (``sock``'s read or write
    watcher) fires; raise TimeoutError when ``timeout`` seconds pass first."""
    hub = sock.hub
    current = getcurrent()
    watcher.start(current.switch)
    if timeout is None:
        try:
            hub.switch()
        finally:
            watcher.stop()
        return
    timer = hub.loop.timer(timeout)
    timer.start(current.throw, TimeoutError)
    try:
        hub.switch()
    finally:
        watcher.stop()
        timer.stop()
        timer.close()


def send_all(sock, data: bytes, timeout: float | None) -> None:
    """Write all of ``data``; each wait for room is bounded by ``timeout`` (nginx's
    send_timeout: between two successive writes, not for the whole)."""
    raw = sock._sock
    try:
        sent = raw.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)
    while sent < len(view):
        wait(sock, sock._write_event, timeout)
        try:
            sent += raw.send(view[sent:])
        except BlockingIOError:
            pass


def bytes_waiting(sock) -> int:
    """Bytes in ``sock``'s receive buffer, without reading (or blocking)."""
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return buf[0]
    except OSError:
        return 0


class _ClosedWatcher:
    """Stands in for a closed Stream's watcher: stopping and starting do nothing."""

    active = False

    def start(self, *args) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


_CLOSED = _ClosedWatcher()


class Stream:
    """A plain socket whose read watcher stays started between reads.

    gevent starts and stops a socket's watcher around every wait, and libev
    re-adds the descriptor to epoll when it is started again: one ``epoll_ctl``
    per wait.  Reading first and waiting on EAGAIN costs a failed ``recv``
    instead.  On the request path the answer is almost never there yet (the
    upstream's response right after the request went out, the client's next
    request right after a response), so a Stream waits first, on a watcher that
    stays armed: one ``recv`` per read and no ``epoll_ctl`` (nginx's
    edge-triggered descriptors get the same).

    epoll is level-triggered under libev, so readiness that nobody waits for
    (a pooled connection closed by its server, a client sending ahead) would
    call the watcher on every loop iteration; the watcher then stops and
    remembers it, and the next wait returns at once.
    """

    __slots__ = ("sock", "raw", "hub", "watcher", "waiter", "ready", "timer", "timer_after",
                 "reader")

    def __init__(self, sock):
        self.sock = sock
        self.raw = sock._sock
        self.hub = sock.hub
        self.watcher = self.hub.loop.io(sock.fileno(), 1)
        self.waiter = None  # the greenlet in wait_readable
        self.ready = False  # became readable while nobody waited
        # One timer re-armed for each wait (a connection's reads mostly share
        # one timeout; another timeout makes another timer)
        self.timer = None
        self.timer_after = -1.0
        # The parser of this connection's replies, kept from one to the next
        # (forklb.http.proxy.ResponseHead); closing releases it.
        self.reader = None
        self.watcher.start(self._readable)

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            waiter.switch()
        else:
            self.ready = True
            self.watcher.stop()

    def wait_readable(self, timeout: float | None) -> None:
        """Return when the socket is readable (data, end of stream or an error);
        TimeoutError after ``timeout`` seconds."""
        if self.ready:
            self.ready = False
            self.watcher.start(self._readable)
            return
        self.waiter = current = getcurrent()
        timer = None
        if timeout is not None:
            timer = self.timer
            if timeout != self.timer_after:
                if timer is not None:
                    timer.close()
                timer = self.timer = self.hub.loop.timer(timeout, timeout)
                self.timer_after = timeout
            timer.again(current.throw, TimeoutError, update=False)
        try:
            self.hub.switch()
        finally:
            self.waiter = None
            if timer is not None:
                timer.stop()

    def recv(self, timeout: float | None, size: int = RECV_SIZE, eager: bool = False) -> bytes:
        """Wait for the socket, then read up to ``size`` bytes (b"" at end of
        stream; TimeoutError, or OSError for a reset).  ``eager`` reads first
        (a new connection's request is usually there by the time it is served).
        A timeout of 0 takes only what is there already (BlockingIOError if
        nothing is)."""
        raw = self.raw
        if timeout == 0:
            return raw.recv(size)
        if eager:
            try:
                return raw.recv(size)
            except BlockingIOError:
                pass
        while True:
            self.wait_readable(timeout)
            try:
                return raw.recv(size)
            except BlockingIOError:  # read meanwhile by gevent's own methods
                continue

    def send_all(self, data: bytes, timeout: float | None) -> None:
        send_all(self.sock, data, timeout)

    def rearm(self) -> None:
        """Forget readiness noticed while the socket was read without the Stream
        (splice, copy): the watcher starts again and reports what is still there."""
        if self.ready:
            self.ready = False
            self.watcher.start(self._readable)

    def pause(self) -> None:
        """Stop watching (the socket is watched elsewhere for a while: parked)."""
        self.watcher.stop()
        self.ready = False

    def resume(self) -> None:
        self.watcher.start(self._readable)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket; the watcher goes first, before its descriptor."""
        self.watcher.stop()
        self.watcher.close()
        self.watcher = _CLOSED  # it held this Stream (its callback): no cycle left
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        if self.reader is not None:
            self.reader.release()
            self.reader = None
        self.sock.close()
