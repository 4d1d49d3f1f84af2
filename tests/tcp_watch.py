"""Watches the server side of the TCP connections on one local port: for each
connection, when it was first seen held and when it was last seen held.

Run as ``tcp_watch.py PORT PERIOD``.  It samples ``/proc/net/tcp`` every PERIOD
seconds, prints ``ready`` after the first sample, and on SIGTERM prints one JSON
object: ``{"longest_gap": seconds, "majflt": pages read back from disk,
"connections": [[client port, first, last], ...]}`` with ``time.monotonic()``
times (the system's monotonic clock, so a parent process can compare them with
its own).

It runs as a process of its own so that the test's threads cannot delay it, the
test starts it under SCHED_FIFO, and it locks its memory: on a loaded machine a
sampler at normal priority was seen to pause for more than 2 s and miss whole
connections.  Even so, CI runs have shown pauses of 1.6-2.1 s with no page read
back from disk (``majflt`` 0), which looks like the whole virtual machine
stopping: ``longest_gap`` reports them, so the test can allow for them.  It reads
``/proc/net/tcp`` itself because psutil's ``net_connections`` also maps every
socket to its process, which costs a pass over every process's descriptors.
"""

from __future__ import annotations

import ctypes
import json
import resource
import signal
import sys
import time

# The server's side of a connection it still holds, as /proc/net/tcp's "st"
# column (include/net/tcp_states.h): ESTABLISHED, FIN_WAIT1 (unsent data
# queued), CLOSE_WAIT, LAST_ACK, CLOSING.  SYN_RECV is left out: a half-open
# connection is a request socket, another kernel object than the connection.
HELD = {"01", "04", "08", "09", "0B"}


def sample(suffix: str, now: float, connections: dict[tuple[int, str], list[float]]) -> None:
    """Record the held connections whose local address ends in ``suffix``.

    A connection is its client port and its socket's (hashed) kernel address: on
    loopback the kernel passes a closed connection's client port on to a new one
    (``tcp_tw_reuse``), so the port alone would merge two connections.
    """
    with open("/proc/net/tcp") as f:
        rows = f.read().splitlines()[1:]
    for row in rows:
        # sl local remote st tx:rx tr:when retransmits uid timeout inode refs address
        fields = row.split(None, 12)
        if fields[1].endswith(suffix) and fields[3] in HELD:
            key = (int(fields[2].rsplit(":", 1)[1], 16), fields[11])
            connections.setdefault(key, [now, now])[1] = now


def lock_memory() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE): no page of this process is evicted."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(1 | 2) != 0:
        raise OSError(ctypes.get_errno(), "mlockall")


def main() -> None:
    port, period = int(sys.argv[1]), float(sys.argv[2])
    lock_memory()
    suffix = f":{port:04X}"
    connections: dict[tuple[int, str], list[float]] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    longest_gap = 0.0
    last = time.monotonic()
    sample(suffix, last, connections)
    print("ready", flush=True)
    while not stopping:
        time.sleep(period)
        now = time.monotonic()
        longest_gap = max(longest_gap, now - last)
        last = now
        sample(suffix, now, connections)
    found = [[peer, first, seen] for (peer, _), (first, seen) in connections.items()]
    majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    json.dump({"longest_gap": longest_gap, "majflt": majflt, "connections": found}, sys.stdout)


if __name__ == "__main__":
    main()
