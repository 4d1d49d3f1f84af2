"""Upstream state shared by all workers of one generation.

The master maps an anonymous shared memory region before forking a
generation; every worker of that generation sees the same bytes.  Today it
holds one 64-bit round-robin ticket per upstream group: a worker reads the
ticket, writes it back incremented and picks ``schedule[ticket % period]``.
There is no lock: two workers that race may read the same ticket and send one
request each to the same peer, which only repeats one step of the schedule;
the sequence stays correct whenever requests do not collide.

No gevent here: the master creates this.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable

SLOT = ctypes.sizeof(ctypes.c_uint64)


class SharedUpstreamState:
    def __init__(self, names: Iterable[str]):
        self.index = {name: i for i, name in enumerate(sorted(names))}
        self.memory = mmap.mmap(-1, max(1, len(self.index)) * SLOT)  # MAP_SHARED | MAP_ANONYMOUS

    def ticket(self, name: str) -> ctypes.c_uint64:
        """The shared ticket counter of upstream ``name`` (read and write ``.value``)."""
        return ctypes.c_uint64.from_buffer(self.memory, self.index[name] * SLOT)
