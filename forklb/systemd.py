"""The two systemd protocols forklb speaks, without libsystemd.

* Readiness (``Type=notify``): datagrams such as ``READY=1`` sent to the unix
  socket named by ``NOTIFY_SOCKET`` (``@name`` is an abstract socket).
* Socket activation: ``LISTEN_PID`` / ``LISTEN_FDS`` hand over listening sockets
  as file descriptors 3, 4, ...

forklb's own binary upgrade (USR2) passes sockets the same way, with
``FORKLB_LISTEN_FDS`` listing the descriptor numbers.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3
INHERIT_ENV = "FORKLB_LISTEN_FDS"


def notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        return False
    return True


def inherited_fds() -> list[int]:
    """Listening descriptors handed to this process (binary upgrade or systemd).

    The variables are removed from the environment so that children do not
    mistake them for their own.
    """
    fds: list[int] = []
    ours = os.environ.pop(INHERIT_ENV, "")
    if ours:
        fds += [int(fd) for fd in ours.split(";") if fd.isdigit()]
    listen_pid = os.environ.pop("LISTEN_PID", "")
    listen_fds = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if listen_pid == str(os.getpid()) and listen_fds.isdigit():
        fds += range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(listen_fds))
    return fds
