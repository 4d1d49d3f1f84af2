"""Worker heartbeats in shared memory, one slot per worker of a generation.

A worker's event loop writes ``time.monotonic()`` into its slot about once a
second from a greenlet, so a fresh value proves the loop still turns.  The
master reads the slots on its tick and kills a worker whose value is older
than ``worker_timeout``.  Shared memory instead of gunicorn's temp-file mtime:
no disk I/O, no file system that can block.  CLOCK_MONOTONIC is the same
clock in every process of the machine, so the values compare directly.
"""

from __future__ import annotations

import ctypes
import mmap
import time


class Scoreboard:
    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.memory = mmap.mmap(-1, self.slots * ctypes.sizeof(ctypes.c_double))
        self.beats = (ctypes.c_double * self.slots).from_buffer(self.memory)

    def beat(self, slot: int) -> None:
        """Called by worker ``slot``: its loop is alive now."""
        self.beats[slot] = time.monotonic()

    def silence(self, slot: int, now: float) -> float:
        """Seconds since worker ``slot`` last beat."""
        return now - self.beats[slot]
