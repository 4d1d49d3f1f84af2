"""Per-process resource figures of a forklb process tree, read with psutil.

The sidecar is the only place they are read: a worker never spends time on
them.  ``psutil.Process`` objects are kept between reads (``cpu_percent``
needs the previous sample) and each process is read inside ``oneshot()``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

ROLE_TITLES = (("forklb: master process", "master"), ("forklb: worker process", "worker"),
               ("forklb: sidecar process", "sidecar"))


def role_of(cmdline: list[str]) -> str:
    """A process's role from its title (set with setproctitle)."""
    title = " ".join(cmdline)
    for prefix, role in ROLE_TITLES:
        if title.startswith(prefix):
            return role
    return "other"


class ProcessTable:
    """The master and its children, with cached ``psutil.Process`` objects."""

    def __init__(self, master_pid: int):
        self.master_pid = master_pid
        self.cache: dict[int, psutil.Process] = {}

    def _process(self, pid: int) -> psutil.Process:
        proc = self.cache.get(pid)
        if proc is None:
            proc = self.cache[pid] = psutil.Process(pid)
        return proc

    def snapshot(self) -> list[dict[str, Any]]:
        """One dict per live process of the tree: master first, then children by pid."""
        try:
            master = self._process(self.master_pid)
            pids = [self.master_pid] + sorted(c.pid for c in master.children())
        except psutil.Error:
            return []
        rows = []
        for pid in pids:
            try:
                rows.append(self._read(self._process(pid)))
            except psutil.Error:
                continue
        for gone in set(self.cache) - set(pids):  # drop objects of dead processes
            del self.cache[gone]
        return rows

    @staticmethod
    def _read(proc: psutil.Process) -> dict[str, Any]:
        with proc.oneshot():
            cpu = proc.cpu_times()
            return {
                "pid": proc.pid,
                "role": role_of(proc.cmdline()),
                "cpu_user_seconds": cpu.user,
                "cpu_system_seconds": cpu.system,
                "cpu_percent": proc.cpu_percent(),
                "rss_bytes": proc.memory_info().rss,
                "open_fds": proc.num_fds(),
                "sockets": _sockets(proc),
                "uptime_seconds": round(time.time() - proc.create_time(), 3),
            }


def _sockets(proc: psutil.Process) -> int:
    """Sockets ``proc`` holds open (listening and connected), counted from
    /proc/PID/fd.  psutil's net_connections reads the whole machine's socket
    tables (/proc/net/tcp*): over a second on a busy host, too slow per scrape."""
    fd_dir = f"/proc/{proc.pid}/fd"
    count = 0
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count
