"""worker_connections and running out of descriptors, with real workers.

* A worker whose ``worker_connections`` are all in use stops accepting; the other
  worker takes new connections, and once both are full new connections wait in
  the backlog (not refused) until one ends.
* A worker out of descriptors (``worker_rlimit_nofile``) logs nginx's
  ``accept4() failed (24: Too many open files)``, backs off instead of spinning
  on the readable listening socket, and serves again once descriptors are freed.
"""

from __future__ import annotations

import socket
import time

import psutil
from harness import free_port, http_request, wait_for

CONF = """
worker_processes {workers};
{main}
error_log logs/error.log info;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    keepalive_timeout 120s;
    client_header_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def _start(forklb_factory, workers: int, connections: int, main: str = ""):
    port = free_port()
    lb = forklb_factory(CONF.format(workers=workers, connections=connections, port=port,
                                    main=main))
    lb.start(wait_ports=[port], workers=workers)
    return lb, port


def _accepted(pid: int, port: int) -> int:
    """Client connections worker ``pid`` has accepted on ``port``."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.raddr)


def _idle(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def _ask(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return s.recv(65536)


def test_full_worker_leaves_new_connections_to_the_other(forklb_factory):
    lb, port = _start(forklb_factory, workers=2, connections=10)
    workers = lb.worker_pids()
    held = _idle(port, 15)
    try:
        wait_for(lambda: sum(_accepted(w, port) for w in workers) == 15, 10,
                 message=lambda: str([_accepted(w, port) for w in workers]))
        assert all(_accepted(w, port) <= 10 for w in workers)
        # A new client is served at once by whichever worker has room.
        started = time.monotonic()
        assert http_request(port, "/", host="x", timeout=5).status == 200
        assert time.monotonic() - started < 3
        # Both full (20 of 20): a new connection waits in the backlog, not refused...
        held += _idle(port, 20 - 15)
        wait_for(lambda: sum(_accepted(w, port) for w in workers) == 20, 10)
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        waiting.settimeout(1.0)
        try:
            early = waiting.recv(65536)
        except TimeoutError:
            early = b""
        assert early == b"", early
        # ... and is served as soon as one connection ends.
        held.pop().close()
        waiting.settimeout(5)
        assert waiting.recv(65536).startswith(b"HTTP/1.1 200")
        waiting.close()
        assert lb.worker_pids() == workers  # nothing crashed
    finally:
        for s in held:
            s.close()


def test_out_of_descriptors_backs_off_and_recovers(forklb_factory):
    lb, port = _start(forklb_factory, workers=1, connections=512,
                      main="worker_rlimit_nofile 40;")
    (worker,) = lb.worker_pids()
    proc = psutil.Process(worker)
    held = []
    try:
        # More connections than the worker has descriptors: the rest stay in the
        # backlog and keep the listening socket readable.
        for _ in range(60):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: "accept4() failed (24: Too many open files)" in lb.error_log(), 10,
                 message=lb.diagnostics)
        line = next(x for x in lb.error_log().splitlines() if "accept4() failed" in x)
        assert "[crit]" in line and f"on 127.0.0.1:{port}" in line
        # Not spinning: CPU time of the worker over 2 s.
        before = sum(proc.cpu_times()[:2])
        time.sleep(2.0)
        used = sum(proc.cpu_times()[:2]) - before
        print(f"worker CPU while out of descriptors: {used:.3f} s in 2 s")
        assert used < 0.4, f"worker used {used:.2f} s CPU in 2 s"
        # It does retry, every 0.5 s: a few more lines, not thousands.
        retries = lb.error_log().count("accept4() failed")
        assert 2 <= retries <= 20, retries
        assert proc.num_fds() <= 40
        # Freeing descriptors: the waiting connections are accepted and served.
        # Every other client closes, those in the backlog too (the worker accepts
        # each, reads its end and closes it), so the last one is reached however
        # many descriptors the worker keeps for itself.
        last = held.pop()
        for s in held:
            s.close()
        held.clear()
        assert _ask(last, 5).startswith(b"HTTP/1.1 200")
        last.close()
        assert http_request(port, "/", host="x", timeout=5).status == 200
    finally:
        for s in held:
            s.close()
