"""``listen ... reuseport``: one SO_REUSEPORT socket per worker slot, owned by the master.

What is checked, with real processes and sockets on 127.0.0.1:

* each worker holds exactly its slot's socket (compared by socket inode, from /proc);
* the spread of many short connections across two workers, shared socket versus
  reuseport (a distribution assertion on the access log's ``$pid``, not a timing one);
* a worker killed with SIGKILL: connections queued on its socket wait for the
  respawned worker, which gets the very same socket;
* reload (same size, more workers, fewer workers) and the USR2 binary upgrade keep
  the sockets: no socket is bound again.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil
import pytest
from harness import free_port, http_request, pid_alive, wait_for
from load import LoadClient

CONF = """
worker_processes {workers};
error_log logs/error.log notice;
events {{ }}
http {{
    log_format pids '$pid $request_uri';
    access_log logs/access.log pids;
    server {{
        listen 127.0.0.1:{port}{options};
        location / {{ return 200 "{body}\\n"; }}
    }}
}}
"""


def _conf(port: int, *, reuseport: bool = True, workers: int = 2, body: str = "ok") -> str:
    return CONF.format(port=port, workers=workers, body=body,
                       options=" reuseport" if reuseport else "")


def _start(forklb_factory, *, reuseport: bool = True, workers: int = 2):
    port = free_port()
    lb = forklb_factory(_conf(port, reuseport=reuseport, workers=workers))
    lb.start(wait_ports=[port], workers=workers)
    return lb, port


# -- sockets as the kernel sees them ----------------------------------------------------


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port`` (state 0A in /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of every socket descriptor ``pid`` holds."""
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def held_listeners(pid: int, port: int) -> set[int]:
    return socket_inodes(pid) & listening_inodes(port)


def worker_sockets(lb, port: int, count: int) -> dict[int, int]:
    """{worker pid: inode of the one listening socket it holds}, once ``count`` workers
    each hold exactly one."""
    result: dict[int, int] = {}

    def settled() -> bool:
        result.clear()
        for pid in lb.worker_pids():
            held = held_listeners(pid, port)
            if len(held) != 1:
                return False
            result[pid] = held.pop()
        return len(result) == count

    wait_for(settled, timeout=15, message=lambda: f"workers and sockets: {result}\n"
                                                  f"{lb.error_log()}")
    return dict(result)


def access_pids(lb, total: int) -> list[int]:
    """The ``$pid`` of the last ``total`` access log lines (waits for the 1 s flush)."""
    path = lb.path("logs/access.log")

    def lines():
        text = path.read_text() if path.exists() else ""
        return text.splitlines() if len(text.splitlines()) >= total else None

    return [int(line.split()[0]) for line in wait_for(lines, timeout=15)[-total:]]


def access_by_uri(lb) -> dict[str, int]:
    path = lb.path("logs/access.log")
    return {uri: int(pid) for pid, uri in (line.split() for line in path.read_text().splitlines())}


# -- load ---------------------------------------------------------------------------


def run_requests(port: int, total: int, threads: int = 4) -> int:
    """``total`` ``Connection: close`` requests from ``threads`` threads; returns the OKs."""
    ok = 0
    lock = threading.Lock()

    def work(n: int) -> None:
        nonlocal ok
        for _ in range(n):
            if http_request(port, timeout=30).status == 200:
                with lock:
                    ok += 1

    workers = [threading.Thread(target=work, args=(total // threads,)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    return ok


@dataclass
class Recorder:
    """Threads making ``Connection: close`` requests with unique paths until stopped;
    each request is recorded with its start time, so the access log says who served it."""

    port: int
    threads: int = 4
    done: list[tuple[float, str, str]] = field(default_factory=list)  # (start, path, error)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Recorder:
        for i in range(self.threads):
            self._workers.append(threading.Thread(target=self._run, args=(i,), daemon=True))
            self._workers[-1].start()
        return self

    def _run(self, index: int) -> None:
        n = 0
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            n += 1
            path = f"/t{index}-{n}"
            started = time.monotonic()
            try:
                r = http_request(self.port, path, timeout=30)
                error = "" if r.status == 200 else f"status {r.status}"
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                error = repr(e)
            with self._lock:
                self.done.append((started, path, error))

    def stop(self) -> Recorder:
        self._stop.set()
        for t in self._workers:
            t.join(60)
        return self

    def ok(self) -> int:
        return sum(1 for _, _, error in self.done if not error)


# -- tests --------------------------------------------------------------------------


def test_each_worker_holds_only_its_slots_socket(forklb_factory):
    lb, port = _start(forklb_factory, workers=3)
    sockets = worker_sockets(lb, port, 3)
    assert len(listening_inodes(port)) == 3
    assert len(set(sockets.values())) == 3, sockets  # one socket per slot, none shared
    assert held_listeners(lb.master_pid, port) == listening_inodes(port)
    assert "127.0.0.1:" + str(port) + " (reuseport)" in lb.error_log()


def test_shared_address_is_one_socket_for_all(forklb_factory):
    lb, port = _start(forklb_factory, reuseport=False)
    sockets = worker_sockets(lb, port, 2)
    assert len(set(sockets.values())) == 1
    assert listening_inodes(port) == set(sockets.values())


@pytest.mark.parametrize("reuseport", [False, True], ids=["shared", "reuseport"])
def test_spread_of_short_connections(forklb_factory, reuseport):
    """2000 ``Connection: close`` requests against two workers.  Under reuseport the
    kernel hashes each connection to one slot's socket, so each worker gets about half
    whatever its speed; on a shared socket whichever worker wakes first wins (printed,
    not asserted)."""
    lb, port = _start(forklb_factory, reuseport=reuseport)
    workers = lb.worker_pids()
    total = 2000
    assert run_requests(port, total) == total
    counts = Counter(access_pids(lb, total))
    assert set(counts) <= set(workers)
    shares = sorted(counts[w] / total for w in workers)
    print(f"\n{'reuseport' if reuseport else 'shared'} socket: per-worker share "
          f"{[f'{s:.1%}' for s in shares]}")
    if reuseport:
        assert shares[0] >= 0.25, counts


def test_killed_worker_slot_keeps_its_socket_and_queued_connections(forklb_factory):
    """SIGKILL a worker while clients keep connecting.  The master is held (SIGSTOP) so
    that it cannot respawn at once: connections hashed to the dead worker's socket queue
    there, and the worker respawned on SIGCONT gets that socket and answers them."""
    lb, port = _start(forklb_factory)
    sockets = worker_sockets(lb, port, 2)
    victim, victim_socket = next(iter(sockets.items()))
    load = Recorder(port).start()
    master = lb.master_pid
    stopped = False
    try:
        wait_for(lambda: load.ok() > 50, timeout=15)
        os.kill(master, signal.SIGSTOP)
        stopped = True
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: psutil.Process(victim).status() == psutil.STATUS_ZOMBIE, timeout=10)
        dead = time.monotonic()
        time.sleep(1.0)  # clients keep connecting; about half of it queues on the socket
        resumed = time.monotonic()
        os.kill(master, signal.SIGCONT)
        stopped = False
        sockets_after = worker_sockets(lb, port, 2)
        wait_for(lambda: load.ok() > 200, timeout=20)
    finally:
        if stopped:
            os.kill(master, signal.SIGCONT)
        load.stop()
    (respawned,) = set(sockets_after) - set(sockets)
    assert sockets_after[respawned] == victim_socket  # the same socket, not a new one
    assert listening_inodes(port) == set(sockets.values())
    # Only requests already under way when the worker died may fail: one per thread.
    failed = [(t, p, e) for t, p, e in load.done if e]
    assert len(failed) <= load.threads, failed
    assert all(t < dead for t, _, _ in failed), failed
    assert not any("Refused" in e for _, _, e in failed), failed
    # Connections made before the new worker existed (the master was stopped) were
    # answered by it: they waited on the socket.  The killed worker's last second of
    # access log died in its buffer, so only later requests are looked up; the new
    # worker's log is written in order, so its earlier lines are there too.
    later = {p for t, p, e in load.done if not e and t > dead}
    wait_for(lambda: later <= access_by_uri(lb).keys(), timeout=15)
    served = access_by_uri(lb)
    waited = [p for t, p, e in load.done if t < resumed and not e
              and served.get(p) == respawned]
    assert waited, "no connection waited for the respawned worker"


def test_reload_keeps_the_sockets_and_serves(forklb_factory):
    lb, port = _start(forklb_factory)
    before = worker_sockets(lb, port, 2)
    load = LoadClient(port, threads=3, close=True).start()
    try:
        time.sleep(0.5)
        lb.write_conf(_conf(port, body="v2"))
        os.kill(lb.master_pid, signal.SIGHUP)
        after = lb.wait_workers_replaced(before, 2, timeout=20)
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.failures == [] and load.ok > 20
    assert sorted(worker_sockets(lb, port, 2).values()) == sorted(before.values())
    assert set(after).isdisjoint(before)
    assert listening_inodes(port) == set(before.values())
    assert http_request(port).text == "v2\n"


def test_reload_grows_then_shrinks_the_slot_sockets(forklb_factory):
    lb, port = _start(forklb_factory)
    original = set(worker_sockets(lb, port, 2).values())
    old = lb.worker_pids()
    lb.write_conf(_conf(port, workers=3))
    os.kill(lb.master_pid, signal.SIGHUP)
    lb.wait_workers_replaced(old, 3, timeout=20)
    grown = set(worker_sockets(lb, port, 3).values())
    assert original < grown and len(grown) == 3  # the old two kept, one more bound
    assert listening_inodes(port) == grown

    old = lb.worker_pids()
    lb.write_conf(_conf(port, workers=2))
    os.kill(lb.master_pid, signal.SIGHUP)
    lb.wait_workers_replaced(old, 2, timeout=20)
    assert set(worker_sockets(lb, port, 2).values()) == original
    # The third slot's socket is closed once its worker is retired: nobody accepts there.
    wait_for(lambda: listening_inodes(port) == original, timeout=10,
             message=lambda: f"{listening_inodes(port)} != {original}")
    assert "of worker slot 2" in lb.error_log()
    assert run_requests(port, 40) == 40


def test_reload_turns_reuseport_on_and_off(forklb_factory):
    lb, port = _start(forklb_factory, reuseport=False)
    (shared,) = set(worker_sockets(lb, port, 2).values())
    old = lb.worker_pids()
    lb.write_conf(_conf(port, reuseport=True))
    os.kill(lb.master_pid, signal.SIGHUP)
    lb.wait_workers_replaced(old, 2, timeout=20)
    on = set(worker_sockets(lb, port, 2).values())
    assert shared in on and len(on) == 2  # the address's socket became slot 0's
    assert run_requests(port, 40) == 40

    old = lb.worker_pids()
    lb.write_conf(_conf(port, reuseport=False))
    os.kill(lb.master_pid, signal.SIGHUP)
    lb.wait_workers_replaced(old, 2, timeout=20)
    assert set(worker_sockets(lb, port, 2).values()) == {shared}
    wait_for(lambda: listening_inodes(port) == {shared}, timeout=10)
    assert run_requests(port, 40) == 40


def test_failed_reload_takes_reuseport_back(forklb_factory):
    """A reload that would add reuseport but fails on another address leaves the shared
    socket as it was: no other socket may bind beside it."""
    lb, port = _start(forklb_factory, reuseport=False)
    (shared,) = set(worker_sockets(lb, port, 2).values())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        lb.write_conf(_conf(port, reuseport=True).replace(
            " reuseport;", f" reuseport;\n        listen 127.0.0.1:{taken};"))
        os.kill(lb.master_pid, signal.SIGHUP)
        wait_for(lambda: "the running configuration is kept" in lb.error_log(), timeout=15,
                 message=lb.error_log)
    assert listening_inodes(port) == {shared}
    with socket.socket() as intruder:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))
    assert run_requests(port, 20) == 20


def test_usr2_upgrade_hands_over_every_slot_socket(forklb_factory):
    lb, port = _start(forklb_factory)
    sockets = set(worker_sockets(lb, port, 2).values())
    old = lb.master_pid
    load = LoadClient(port, threads=3, close=True).start()
    new = None
    try:
        time.sleep(0.5)
        os.kill(old, signal.SIGUSR2)
        new = wait_for(lambda: (p := lb.read_pid_file()) not in (None, old) and p, timeout=15,
                       message=lb.error_log)

        def new_workers():
            children = [c.pid for c in psutil.Process(new).children()]
            held = {pid: held_listeners(pid, port) for pid in children}
            return held if len(held) == 2 and all(len(h) == 1 for h in held.values()) else None

        held = wait_for(new_workers, timeout=15, message=lb.error_log)
        # The new master holds the same sockets and bound none: no third socket appeared.
        assert held_listeners(new, port) == sockets
        assert {h.pop() for h in held.values()} == sockets
        assert listening_inodes(port) == sockets
        time.sleep(0.5)
        os.kill(old, signal.SIGQUIT)
        wait_for(lambda: not pid_alive(old), timeout=20, message="old master did not exit")
        time.sleep(0.5)
    finally:
        load.stop()
        if new is not None and pid_alive(new):
            os.kill(new, signal.SIGTERM)
            wait_for(lambda: not pid_alive(new), timeout=15)
    assert load.failures == [] and load.ok > 20
    assert "bind()" not in lb.error_log()
