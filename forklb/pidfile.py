"""The pid file: written by the master, read by ``forklb -s``."""

from __future__ import annotations

import os

import psutil


class PidFileError(Exception):
    pass


def read_pid(path: str) -> int | None:
    """The pid in ``path``, or None when the file does not exist."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise PidFileError(f'cannot read pid file "{path}": {e}') from None
    if not text.isdigit():
        raise PidFileError(f'invalid PID number "{text}" in "{path}"')
    return int(text)


def live_master(path: str) -> int | None:
    """The pid of a running forklb master recorded in ``path``, else None."""
    pid = read_pid(path)
    if pid is None or pid == os.getpid():
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    return pid if "forklb" in cmdline else None


def write_pid(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    try:
        if read_pid(path) == os.getpid():
            os.unlink(path)
    except (OSError, PidFileError):
        pass
