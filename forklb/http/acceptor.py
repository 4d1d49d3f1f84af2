"""The worker's accept loop: gevent's ``StreamServer`` with nginx's reaction to
running out of descriptors.

What gevent already does, and forklb relies on:

* ``worker_connections``: the server's pool is that big; when it is full the
  server stops watching the listening socket and starts again as soon as a
  connection ends.  The other workers, watching the same socket, take the new
  connections meanwhile; nothing is refused.

What this module changes: on ``EMFILE``/``ENFILE`` gevent prints a traceback and
retries after 10 ms, doubling.  nginx logs ``accept4() failed (24: Too many open
files)`` at ``crit`` and stops accepting for 500 ms (``accept_mutex_delay``); so
does :class:`Acceptor`.  The listening socket stays readable all that time (the
backlog is full of connections), so retrying at once would spin a CPU.
"""

from __future__ import annotations

import errno

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
