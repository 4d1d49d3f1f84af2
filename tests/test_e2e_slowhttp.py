"""Slow-client attacks with the real ``slowhttptest`` (Debian package) against forklb.

forklb runs with 2 s timeouts (client_header_timeout, client_body_timeout,
send_timeout).  For each attack (500 connections opened at 250/s) the test
checks that

* every attack connection forklb holds is gone within timeout + 1 s of its
  first sighting: the kernel's view of forklb's side of each connection is
  sampled every 0.1 s by ``tcp_watch.py`` (slowhttptest's own CSV counts a
  connection as open until *it* reads the end, which a slow reader never does),
  and the samples saw nearly every connection slowhttptest opened;
* slowhttptest's CSV ends with every connection closed (slowloris, slow POST);
* a probe client gets 200 for every request it sends through forklb meanwhile.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import HttpClient, free_port

TIMEOUT = 2.0
SLACK = 1.0  # the brief: closed within timeout + 1 s
CONNECTIONS = 500  # the issue: slowhttptest -H -c 500 -i 1
PERIOD = 0.1  # the watch's sampling period

CONF = """
worker_processes 2;
error_log logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_header_timeout 2s;
    client_body_timeout 2s;
    send_timeout 2s;
    keepalive_timeout 2s;
    upstream app {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ return 200 "ok\\n"; }}
        location /big.bin {{ }}
        location /post {{ proxy_pass http://app; }}
    }}
}}
"""

SLOWHTTPTEST = shutil.which("slowhttptest") or "/usr/bin/slowhttptest"


class Watch:
    """forklb's side of the connections on ``port``, sampled by ``tcp_watch.py``
    every ``PERIOD`` in a process of its own under SCHED_FIFO (root, as every test
    machine here), so that a loaded machine cannot pause it for as long as a
    connection lives."""

    def __init__(self, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("tcp_watch.py")), str(port), str(PERIOD)],
            stdout=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10)),
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != "ready\n":
            self.proc.kill()
            raise AssertionError(f"tcp_watch.py did not start: {self.proc.wait()}")
        # client port, first seen held, last seen held
        self.connections: list[tuple[int, float, float]] = []
        self.longest_gap = 0.0
        self.majflt = 0  # the watch's pages read back from disk

    def stop(self) -> None:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        found = json.loads(out)
        self.connections = [tuple(c) for c in found["connections"]]
        self.longest_gap = found["longest_gap"]
        self.majflt = found["majflt"]

    def attack(self, probe: Probe) -> list[float]:
        """How long each connection but the probe's was seen held."""
        return [last - first for peer, first, last in self.connections
                if not probe.made(peer, first)]


class Probe:
    """A client that keeps asking forklb for ``/`` on fresh connections."""

    def __init__(self, port: int):
        self.port = port
        self.results: list[tuple[int | str, float]] = []
        # client port -> when each connection from it was made, and closed
        self.spans: dict[int, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with HttpClient(self.port, host="x", timeout=5) as client:
                    try:
                        status: int | str = client.request(headers={"Connection": "close"}).status
                    finally:
                        span = (started, time.monotonic())
                        self.spans.setdefault(client.local_port, []).append(span)
            except Exception as e:  # noqa: BLE001 - every failure is a result
                status = repr(e)
            self.results.append((status, time.monotonic() - started))
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def made(self, port: int, seen: float) -> bool:
        """Whether a connection from ``port`` first seen at ``seen`` was the probe's
        (its socket can linger in the kernel for a sample after the close)."""
        return any(start <= seen <= end + PERIOD for start, end in self.spans.get(port, ()))


@pytest.fixture
def target(forklb_factory, nginx_backend_factory, tmp_path):
    backend = nginx_backend_factory("up")
    root = tmp_path / "html"
    root.mkdir()
    (root / "big.bin").write_bytes(b"x" * 2_000_000)
    port = free_port()
    lb = forklb_factory(CONF.format(port=port, backend=backend.port, root=root))
    lb.start(wait_ports=[port], workers=2)
    return lb, port


def _attack(args: list[str], port: int, path: str, out: Path) -> tuple[list[dict[str, int]], str]:
    """Run slowhttptest; return its CSV rows (one a second) and its output."""
    prefix = out / "report"
    cmd = [SLOWHTTPTEST, *args, "-c", str(CONNECTIONS), "-r", "250", "-l", "12", "-p", "3",
           "-g", "-o", str(prefix), "-u", f"http://127.0.0.1:{port}{path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=out)
    rows = list(csv.DictReader(open(f"{prefix}.csv")))  # noqa: SIM115
    assert rows, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [{k.strip(): int(v) for k, v in row.items()} for row in rows], proc.stdout


ATTACKS = {
    # slowloris: a header line every second, never the end of the header
    "slowloris": (["-H", "-i", "1"], "/"),
    # slow POST: Content-Length 8192, a few body bytes every second
    "slow POST": (["-B", "-i", "1", "-s", "8192"], "/post"),
    # slow read: tiny receive window, 16 bytes read per second, 3 pipelined requests
    # (it never reads to the end, so its CSV shows every connection open until -l)
    "slow read": (["-X", "-w", "1", "-y", "32", "-n", "1", "-z", "16", "-k", "3"], "/big.bin"),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_slow_attack_is_cut_off_and_service_stays_up(target, tmp_path, attack):
    lb, port = target
    args, path = ATTACKS[attack]
    out = tmp_path / "slowhttptest"
    out.mkdir()
    watch = Watch(port)
    probe = Probe(port)
    try:
        rows, output = _attack(args, port, path, out)
    finally:
        probe.stop()
        watch.stop()
    # slowhttptest opened the attack's connections, and the watch saw them
    opened = max(r["Closed"] + r["Connected"] for r in rows)
    assert opened >= CONNECTIONS * 0.9, rows
    held = watch.attack(probe)
    pauses = (f"the watch's longest pause {watch.longest_gap:.2f} s, "
              f"{watch.majflt} of its pages read from disk")
    assert len(held) >= 0.95 * opened, (len(held), opened, pauses, rows)
    # forklb held no attack connection longer than the timeout + 1 s after its
    # first sighting (+ two sampling periods).  A pause of the whole machine (seen
    # in CI: up to 2.1 s, the watch at SCHED_FIFO stopped too) delays forklb's
    # timers as long: the watch's own longest pause beyond its period is allowed.
    allowed = TIMEOUT + SLACK + 2 * PERIOD + max(0.0, watch.longest_gap - PERIOD)
    assert max(held) <= allowed, (max(held), allowed, pauses, rows)
    if attack != "slow read":
        # slowhttptest stopped early because forklb had closed everything (its last
        # CSV row is up to a second old), and saw all connections opened.
        assert "No open connections left" in output, (rows, output[-1500:])
    # the probe was served throughout
    assert len(probe.results) >= 10, probe.results
    failures = [r for r in probe.results if r[0] != 200]
    assert not failures, failures
    # no probe waited on the attack (loose: the test machine is shared and loaded)
    assert max(t for _, t in probe.results) < 4.0, probe.results
