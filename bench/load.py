"""Load generators: wrk (with a Lua reporter), a curl upload, and idle keep-alive sockets.

The load generators run in this process's CPU set, which :mod:`bench.cli` pins apart from
the proxies when it can.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness import HttpClient, HttpProtocolError, build_request

# wrk calls done() once at the end: exact counts and latency percentiles (µs) as JSON,
# instead of parsing its rounded human-readable output. No per-request Lua runs.
WRK_REPORTER = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class LoadResult:
    """What one load run measured on the client side."""

    requests: int
    seconds: float
    bytes: int
    non_2xx: int
    socket_errors: int
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def require(tool: str) -> str:
    """Path of ``tool``, or a clear error saying how to install it."""
    path = shutil.which(tool)
    if not path:
        raise SystemExit(f"bench: {tool} is not installed (apt-get install {tool})")
    return path


def wrk(port: int, path: str, connections: int, seconds: float, workdir: Path,
        headers: tuple[str, ...] = ()) -> LoadResult:
    """``wrk -t1 -cN -dS --latency`` against 127.0.0.1:port/path."""
    script = workdir / "wrk-report.lua"
    if not script.exists():
        script.write_text(WRK_REPORTER)
    argv = [require("wrk"), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "--timeout", "5s", "-s", str(script)]
    for header in headers:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}{out.stderr}")
    r = json.loads(line.split(" ", 1)[1])
    # wrk counts a response with status > 399 as a "status" error: our non-2xx.
    return LoadResult(
        requests=r["requests"], seconds=r["duration_us"] / 1e6, bytes=r["bytes"],
        non_2xx=r["status"],
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
        p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
    )


def make_upload_file(path: Path, size: int) -> Path:
    """A sparse file of ``size`` zero bytes (reading it costs no disk I/O)."""
    if not path.exists() or path.stat().st_size != size:
        with open(path, "wb") as f:
            f.truncate(size)
    return path


def curl_upload(port: int, path: str, upload: Path) -> LoadResult:
    """One streamed upload (``curl -T``, PUT, no ``Expect: 100-continue``)."""
    argv = [require("curl"), "-sS", "-o", "/dev/null", "-T", str(upload), "-H", "Expect:",
            "-w", "%{http_code} %{size_upload} %{time_total}",
            f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 3:
        return LoadResult(1, 0.0, 0, 0, 1)
    code, sent, seconds = int(fields[0]), int(float(fields[1])), float(fields[2])
    ok = 200 <= code < 300 and sent == upload.stat().st_size
    return LoadResult(1, seconds, sent, 0 if ok else 1, 0, seconds * 1000, seconds * 1000)


def open_idle(port: int, count: int, path: str = "/small",
              batch: int = 200, timeout: float = 30.0) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections, make one request on each, and leave them idle.

    Returns the open sockets and how many failed (refused, reset, no full 200 response).
    Connections are opened in batches (send all, then read all) so no listen backlog
    overflows and the round trips overlap.
    """
    request = build_request("GET", path, host="bench")
    socks: list[socket.socket] = []
    failed = 0
    deadline = time.monotonic() + timeout
    while len(socks) + failed < count and time.monotonic() < deadline:
        fresh = []
        for _ in range(min(batch, count - len(socks) - failed)):
            try:
                client = HttpClient(port, host="bench", timeout=10)
                client.send(request)
                fresh.append(client)
            except OSError:
                failed += 1
        for client in fresh:
            try:
                ok = client.read_response().status == 200
            except (OSError, HttpProtocolError):
                ok = False
            if ok:
                socks.append(client.sock)
            else:
                failed += 1
                close_hard([client.sock])
    return socks, count - len(socks)


def close_hard(socks: list[socket.socket]) -> None:
    """Close with RST (SO_LINGER 0): no TIME_WAIT left behind to exhaust local ports."""
    linger = struct.pack("ii", 1, 0)
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        s.close()
