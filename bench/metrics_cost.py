"""What metrics (and the access log) cost: forklb with counting on and off.

    python bench/metrics_cost.py [--duration 10] [--connections 50] [--rounds 3]

Two nginx backends, one forklb (2 workers, upstream keep-alive, a sidecar) per
variant: metrics on/off (``FORKLB_METRICS=off`` swaps the workers' recorder for
one that counts nothing), access log off/on.  Rounds alternate the variants so
that load from elsewhere on the machine spreads over all of them.  Prints
req/s and forklb's CPU µs per request (all its processes, from /proc), which is
the steadier figure on a shared machine, and each variant's cost against the
base (metrics off, access log off).  ``--micro`` times the recorder's calls
in-process instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import ForkLB, NginxBackend, free_port  # noqa: E402
from lb01 import measure  # noqa: E402

CONF = """
worker_processes 2;
events {{ worker_connections 1024; }}
sidecar {{ listen 127.0.0.1:{side}; }}
http {{
    {access_log}
    upstream www_pools {{
        server 127.0.0.1:{b1};
        server 127.0.0.1:{b2};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name www.chaoge.com;
        location / {{ proxy_pass http://www_pools; }}
    }}
}}
"""

VARIANTS = (("base: metrics off, log off", "off", False), ("metrics on", "on", False),
            ("metrics on + access log", "on", True), ("access log only", "off", True))


def micro() -> None:
    """The recorder's per-request calls timed in-process (no wrk, no noise from the
    network path): what metrics add to a proxied request's CPU time."""
    import time
    import timeit
    from types import SimpleNamespace as NS

    from forklb.metrics import segment as seg
    from forklb.metrics.recorder import Recorder, attach

    stats = seg.StatsSegment(16)
    server = NS(names=("www",), listens=())
    stats.servers.add(("www",))
    stats.peers.add(("app", "a"))
    attach(stats, stats.acquire("worker", 1))
    group = NS(name="app", servers=[NS(name="a")], idle=[[]])
    rec = Recorder([server], {}, {"app": group})
    ex = NS(server=server, conn=NS(listener=None), method_b=b"GET", status=200,
            start_time=time.time(), header_bytes=100, content_length=None, bytes_sent=500)
    started = time.monotonic()
    counts = {1: 0}
    n = 200_000
    for name, call in (("request()", lambda: rec.request(ex)),
                       ("upstream_done()", lambda: rec.upstream_done(group, 0, 200, started,
                                                                     False)),
                       ("dict increment, for scale", lambda: counts.__setitem__(1, counts[1] + 1))):
        best = min(timeit.repeat(call, number=n, repeat=5)) / n
        print(f"{name:28} {best * 1e6:6.2f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro", action="store_true", help="time the recorder calls only")
    args = ap.parse_args()
    if args.micro:
        micro()
        return
    tmp = Path(tempfile.mkdtemp(prefix="forklb-metrics-bench-"))
    b1 = NginxBackend(tmp, "b1").start()
    b2 = NginxBackend(tmp, "b2").start()
    lbs: dict[str, tuple[ForkLB, int]] = {}
    try:
        for name, metrics, log in VARIANTS:
            port, side = free_port(), free_port()
            access_log = (f"access_log {tmp}/{port}.log;" if log else "access_log off;")
            lb = ForkLB(tmp, CONF.format(b1=b1.port, b2=b2.port, port=port, side=side,
                                         access_log=access_log),
                        env={"FORKLB_METRICS": metrics})
            lb.start(wait_ports=[port, side], workers=2)
            lbs[name] = (lb, port)
        results: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
        for _ in range(args.rounds):
            for name, (lb, port) in lbs.items():
                results[name].append(measure(name, lb.master_pid, port, args))
        base = VARIANTS[0][0]
        base_rps = statistics.median(r["rps"] for r in results[base])
        base_cpu = statistics.median(r["cpu_us_per_req"] for r in results[base])
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s x {args.rounds} rounds "
              "(medians), keep-alive, 2 workers")
        print(f"{'variant':28} {'req/s':>9} {'vs base':>8} {'cpu us/req':>11} {'vs base':>8}")
        for name, rows in results.items():
            rps = statistics.median(r["rps"] for r in rows)
            cpu = statistics.median(r["cpu_us_per_req"] for r in rows)
            print(f"{name:28} {rps:9.0f} {100 * (rps / base_rps - 1):+7.1f}% "
                  f"{cpu:11.1f} {100 * (cpu / base_cpu - 1):+7.1f}%")
    finally:
        for lb, _ in lbs.values():
            lb.stop()
        b1.stop()
        b2.stop()


if __name__ == "__main__":
    main()
