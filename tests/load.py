"""Load generators for lifecycle tests: wrk (parsed) and a small threaded client.

Both only ever target 127.0.0.1 and stop by themselves after a bounded time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from harness import HttpClient, http_request


@dataclass
class WrkResult:
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def start_wrk(port: int, seconds: int, connections: int = 20, close: bool = False,
              host: str = "www.example.com") -> subprocess.Popen:
    """Start wrk in the background; finish it with :func:`wrk_result`."""
    wrk = shutil.which("wrk")
    assert wrk, "wrk is not installed (apt-get install wrk): the README test command installs it"
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"Host: {host}"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_result(proc: subprocess.Popen, timeout: float = 120) -> WrkResult:
    out, _ = proc.communicate(timeout=timeout)
    m = re.search(r"(\d+) requests in", out)
    assert m, f"wrk printed no result:\n{out}"
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = {}
    sm = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sm:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sm.groups()),
                          strict=True))
    return WrkResult(int(m.group(1)), int(non2xx.group(1)) if non2xx else 0, errors, out)


@dataclass
class LoadClient:
    """Threads sending requests until stopped; well-behaved keep-alive clients.

    A new connection is opened after ``Connection: close``; with ``close=True``
    every request uses a new connection.  Failures are recorded, not raised.
    """

    port: int
    threads: int = 4
    close: bool = False
    host: str = "www.example.com"
    path: str = "/"
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LoadClient:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _record(self, ok: bool, what: str = "") -> None:
        with self._lock:
            if ok:
                self.ok += 1
            else:
                self.failures.append(what)

    def _run(self) -> None:
        client: HttpClient | None = None
        deadline = time.monotonic() + 300  # bounded even if nobody calls stop()
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if self.close:
                    r = http_request(self.port, self.path, host=self.host)
                else:
                    if client is None:
                        client = HttpClient(self.port, host=self.host)
                    r = client.get(self.path)
                    if (r.header("connection") or "").lower() == "close":
                        client.close()
                        client = None
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                self._record(False, repr(e))
                if client is not None:
                    client.close()
                    client = None
                continue
            self._record(r.status == 200, f"status {r.status}")
        if client is not None:
            client.close()

    def stop(self) -> LoadClient:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        return self
