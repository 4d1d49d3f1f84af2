"""The error log and the access log, in nginx's formats.

Error log lines read ``2026/11/30 07:16:07 [notice] 1234#0: message``.  Both
logs are plain append-mode files that ``reopen()`` swaps (USR1, logrotate).
Access log lines are buffered in memory and written in batches (at most once a
second, or when 64 KiB are waiting) so the request path never waits on disk.
No gevent here: the master uses this module too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
_RANK = {name: i for i, name in enumerate(LEVELS)}


class ErrorLog:
    """nginx-style error log; ``path`` may be ``"stderr"``."""

    def __init__(self, path: str = "stderr", level: str = "error", echo_stderr: bool = False):
        self.path = path
        self.min_rank = _RANK[level]
        self.echo_stderr = echo_stderr and path != "stderr"
        self.ident = 0  # worker slot shown after the pid, as nginx's "#tid"
        self._file: TextIO = sys.stderr
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file; used at start and on USR1 for log rotation."""
        if self.path == "stderr":
            self._file = sys.stderr
            return
        old = self._file
        self._file = open(_prepared(self.path), "a", buffering=1,  # noqa: SIM115
                          encoding="utf-8")
        if old is not sys.stderr:
            old.close()

    def log(self, level: str, message: str) -> None:
        rank = _RANK[level]
        if rank < self.min_rank and not (self.echo_stderr and rank >= _RANK["notice"]):
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        line = f"{stamp} [{level}] {os.getpid()}#{self.ident}: {message}\n"
        if rank >= self.min_rank:
            try:
                self._file.write(line)
            except (OSError, ValueError):
                pass
        if self.echo_stderr:
            sys.stderr.write(line)

    def emerg(self, message: str) -> None:
        self.log("emerg", message)

    def alert(self, message: str) -> None:
        self.log("alert", message)

    def error(self, message: str) -> None:
        self.log("error", message)

    def warn(self, message: str) -> None:
        self.log("warn", message)

    def notice(self, message: str) -> None:
        self.log("notice", message)

    def info(self, message: str) -> None:
        self.log("info", message)


class AccessLogFile:
    """One access log file with a write buffer; ``write`` never blocks on disk."""

    FLUSH_BYTES = 64 * 1024

    def __init__(self, path: str):
        self.path = path
        self.buffer: list[str] = []
        self.size = 0
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        self.flush()
        fd = os.open(_prepared(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def write(self, line: str) -> None:
        self.buffer.append(line)
        self.size += len(line)
        if self.size >= self.FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer or self.fd < 0:
            return
        data = "".join(self.buffer).encode("utf-8", "backslashreplace")
        self.buffer.clear()
        self.size = 0
        try:
            os.write(self.fd, data)
        except OSError:
            pass


def _prepared(path: str) -> str:
    """``path`` with its directory created; errors name the log file itself."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    return path
