"""The worker's accept loop: gevent's ``StreamServer`` with nginx's reaction to
running out of descriptors.

What gevent already does, and forklb relies on:

* ``worker_connections``: the server's pool is that big; when it is full the
  server stops watching the listening socket and starts again as soon as a
  connection ends.  Parked keep-alive connections keep their slot
  (:class:`ConnectionPool`).  The other workers, watching the same socket, take the new
  connections meanwhile; nothing is refused.

What this module changes: on ``EMFILE``/``ENFILE`` gevent prints a traceback and
retries after 10 ms, doubling.  nginx logs ``accept4() failed (24: Too many open
files)`` at ``crit`` and stops accepting for 500 ms (``accept_mutex_delay``); so
does :class:`Acceptor`.  The listening socket stays readable all that time (the
backlog is full of connections), so retrying at once would spin a CPU.
"""

from __future__ import annotations

import errno

from gevent.pool import Group, Pool
from gevent.server import StreamServer

EMFILE_DELAY = 0.5  # nginx's accept_mutex_delay
_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)


class Acceptor(StreamServer):
    """A ``StreamServer`` that backs off quietly when there is no descriptor left."""

    def __init__(self, listener, handle, spawn, log, shown: str):
        super().__init__(listener, handle, spawn=spawn)
        self.log = log
        self.shown = shown  # "127.0.0.1:8080" for the log

    def do_read(self):
        try:
            return super().do_read()
        except OSError as e:
            if e.errno not in _OUT_OF_FILES:
                raise
            self.log.log("crit", f"accept4() failed ({e.errno}: {e.strerror}) while "
                                 f"accepting new connection on {self.shown}")
            self._pause(EMFILE_DELAY)
            return None

    def _pause(self, seconds: float) -> None:
        """Stop watching the socket for ``seconds`` (a freed connection resumes sooner:
        the pool wakes the server when a slot frees)."""
        self.stop_accepting()
        self._timer = self.loop.timer(seconds)
        self._timer.start(self._start_accepting_if_started)

    def do_handle(self, sock, address):
        """As gevent's, except that a parked connection (the handler returned True)
        keeps its socket open after its greenlet ends."""
        try:
            self._spawn(_handle_unless_parked, self._handle, sock, address)
        except BaseException:
            sock.close()
            raise


def _handle_unless_parked(handle, sock, address) -> None:
    parked = False
    try:
        parked = handle(sock, address)
    finally:
        if not parked:
            sock.close()


class ConnectionPool(Pool):
    """The worker's ``worker_connections`` slots: a connection holds one from accept
    to close, also while parked (an idle keep-alive connection without a greenlet,
    see ``ClientConnection.park``) and while a greenlet outside the pool serves it
    again.  nginx counts idle keep-alive connections in worker_connections too.

    ``len()`` counts them all, so ``full()`` (which stops the acceptors) and the
    drain on graceful stop see every open connection.
    """

    def __init__(self, size: int):
        super().__init__(size)
        self.outside = 0  # slots held by connections whose greenlet is not in the pool

    def __len__(self) -> int:
        return len(self.greenlets) + self.outside

    def leave(self, greenlet) -> None:
        """``greenlet`` ends but its connection stays open: keep the slot taken."""
        Group._discard(self, greenlet)  # not Pool._discard: that frees the slot
        greenlet.unlink(self._discard)
        self.outside += 1

    def release_outside(self) -> None:
        """A connection that had left the pool is closed: free its slot."""
        self.outside -= 1
        self._semaphore.release()
