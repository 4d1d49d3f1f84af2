"""What every child process of the master does after fork, whatever its role.

Workers and the sidecar share this start-up: drop the master's signal set-up,
die with the master (parent-death signal, plus EOF on the life pipe), switch
to gevent with a fresh hub, name the process, and give up root when ``user``
says so.  Functions here run in the child only.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

RESET_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                 signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD)


def reset_signals(master_pid: int) -> None:
    """Undo the master's handlers and wake-up fd; HUP and WINCH are the master's only."""
    signal.set_wakeup_fd(-1)
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGWINCH, signal.SIG_IGN)
    die_with_parent(master_pid)


def die_with_parent(master_pid: int) -> None:
    """Ask the kernel to TERM us when the master dies (Linux); check for a lost race."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
    if os.getppid() != master_pid:
        os._exit(0)


def start_gevent(title: str) -> None:
    """Patch the standard library for gevent (the hub is new: the master never had
    one) and set the process title."""
    from gevent import monkey

    monkey.patch_all()
    import setproctitle

    setproctitle.setproctitle(title)


def drop_privileges(user: tuple[int, int, str, str] | None, master_pid: int) -> None:
    """``user``: switch to the configured user and group (only root can)."""
    if user is None or os.geteuid() != 0:
        return
    uid, gid, _name, _group = user
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    # The kernel clears the parent-death signal when credentials change.
    die_with_parent(master_pid)


def watch_master(life_fd: int, on_exit: Callable[[], None]) -> None:
    """Greenlet body: call ``on_exit`` when the master's end of the life pipe closes."""
    from gevent.socket import wait_read

    while True:
        wait_read(life_fd)
        if not os.read(life_fd, 64):
            on_exit()
            return
