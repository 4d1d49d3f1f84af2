"""A socket-less ClientConnection for parser tests (no worker, no I/O)."""

from __future__ import annotations

from types import SimpleNamespace

from forklb.http.connection import ClientConnection
from forklb.worker import Listener


def socketless_connection() -> ClientConnection:
    """A connection whose ``_feed`` parses bytes exactly as a worker's would.

    The listener is the real dataclass with its defaults, so limits added to it
    later (header buffers, timeouts) apply here too.
    """
    worker = SimpleNamespace(now=lambda: 0.0)
    listener = Listener("127.0.0.1", 0, vhosts=None, keepalive_timeout=75.0, fallback=None)
    return ClientConnection(worker, listener, None, ("127.0.0.1", 1))
