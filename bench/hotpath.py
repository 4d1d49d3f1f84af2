"""``python -m bench.hotpath``: what one proxied keep-alive request costs a forklb worker,
counted rather than timed.

Wall-clock runs on a shared machine drift by tens of percent within minutes; these counts
do not, so a hot-path change can be checked against them one at a time:

- ``instructions``: the worker runs under callgrind with instrumentation off; after
  ``--warmup`` requests it is switched on for ``--requests`` more (``--clients``
  keep-alive connections, 15-byte responses, access log off unless ``--access-log``),
  and the worker's instructions are divided by the requests.  Repeat runs agree within
  about 1.5 %.  ``--cache-sim`` adds callgrind's cache model: instruction-cache and data
  read/write misses (first level) per request, for when fewer instructions must be shown
  not to cost more misses.
- ``syscalls``: perf tracepoints (``syscalls:sys_enter_*``) on the worker during a few
  seconds of ``wrk -c50``; the calls per request of each kind.

One worker, two backends (Debian nginx), the bench's forklb config.  Needs valgrind, perf
and wrk.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import free_port

from bench import configs
from bench.load import require
from bench.proxies import ForkLBProxy, start_backends, use_python

SYSCALLS = ("recvfrom", "sendto", "epoll_wait", "epoll_ctl", "read", "write", "writev",
            "accept4", "close", "fcntl", "ioctl", "getsockopt", "setsockopt", "mmap",
            "munmap", "getpid", "connect", "socket")


def _requests(port: int, count: int, clients: int) -> None:
    """``count`` keep-alive GETs of /small over ``clients`` connections (threads)."""
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"

    def client(n: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            for _ in range(n):
                s.sendall(request)
                data = b""
                while True:
                    data += s.recv(65536)
                    end = data.find(b"\r\n\r\n")
                    if end >= 0:
                        length = int(re.search(rb"(?i)content-length: *(\d+)", data).group(1))
                        if len(data) >= end + 4 + length:
                            break

    threads = [threading.Thread(target=client, args=(count // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def instructions(lb: ForkLBProxy, params: configs.ProxyParams, args: argparse.Namespace) -> str:
    argv = lb.prepare(params)
    out = lb.workdir / "callgrind"
    out.mkdir(exist_ok=True)
    cache = ["--cache-sim=yes"] if args.cache_sim else []
    lb.spawn(["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
              *cache, f"--callgrind-out-file={out}/cg.%p", *argv], env=lb.env(params))
    lb.wait_ports([params.port], timeout=120)
    _requests(params.port, args.warmup, args.clients)
    workers = lb.worker_pids()
    for pid in workers:
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True)
    _requests(params.port, args.requests, args.clients)
    for pid in workers:
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], capture_output=True)
    lb.stop()
    totals: dict[str, int] = {}
    for pid in workers:
        text = (out / f"cg.{pid}").read_text()
        events = re.search(r"^events:\s+(.+)$", text, re.M).group(1).split()
        counts = re.search(r"^totals:\s+(.+)$", text, re.M).group(1).split()
        for event, count in zip(events, counts, strict=False):
            totals[event] = totals.get(event, 0) + int(count)
    line = f"instructions per request: {totals['Ir'] / args.requests:.0f} (callgrind, " \
           f"{len(workers)} worker, {args.requests} requests over {args.clients} connections)"
    if args.cache_sim:
        line += "\nfirst-level misses per request: " + ", ".join(
            f"{what} {totals[event] / args.requests:.0f}"
            for event, what in (("I1mr", "instruction"), ("D1mr", "data read"),
                                ("D1mw", "data write")))
    return line


def syscalls(lb: ForkLBProxy, params: configs.ProxyParams, args: argparse.Namespace) -> str:
    lb.start(params, None)
    worker = lb.worker_pids()[0]
    wrk = subprocess.Popen([require("wrk"), "-t1", "-c50", f"-d{args.seconds + 2}s",
                            f"http://127.0.0.1:{params.port}/small"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
    perf = subprocess.run(["perf", "stat", "-x,", "-p", str(worker), "-e",
                           f"raw_syscalls:sys_enter,{events}", "--", "sleep", str(args.seconds)],
                          capture_output=True, text=True)
    rps = float(re.search(r"Requests/sec:\s+(\S+)", wrk.communicate()[0]).group(1))
    lb.stop()
    requests = rps * args.seconds
    lines = [f"system calls per request (perf, wrk -c50, {rps:.0f} req/s):"]
    for row in perf.stderr.splitlines():
        fields = row.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            per_request = int(fields[0]) / requests
            name = fields[2].split("sys_enter_")[-1] if "sys_enter_" in fields[2] else "all"
            if per_request >= 0.01:
                lines.append(f"  {name:14s} {per_request:6.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="*", help="instructions, syscalls (default: both)")
    ap.add_argument("--requests", type=int, default=2500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=4, help="perf's window (syscalls)")
    ap.add_argument("--access-log", action="store_true", help="combined access log on")
    ap.add_argument("--no-metrics", action="store_true", help="FORKLB_METRICS=off")
    ap.add_argument("--cache-sim", action="store_true",
                    help="instructions: also callgrind's cache model (misses per request)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs forklb")
    args = ap.parse_args()
    args.what = args.what or ["instructions", "syscalls"]
    use_python(args.python)
    for what in args.what:
        if what not in ("instructions", "syscalls"):
            ap.error(f"unknown count {what!r}: instructions or syscalls")
    workdir = Path(tempfile.mkdtemp(prefix="forklb-hotpath-"))
    ports = (free_port(), free_port())
    backends = start_backends(workdir / "backends", ports, 4096)
    try:
        for what in args.what:
            params = configs.ProxyParams(
                port=free_port(), backends=ports, sinks=ports, workers=1,
                access_log=str(workdir / "access.log") if args.access_log else None,
                metrics=not args.no_metrics)
            lb = ForkLBProxy("forklb", workdir / what)
            try:
                print(instructions(lb, params, args) if what == "instructions"
                      else syscalls(lb, params, args), flush=True)
            finally:
                lb.stop()
    finally:
        backends.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
