"""First measurement: forklb vs Debian nginx as lb01 (keep-alive, small responses).

    python bench/lb01.py [--duration 10] [--connections 50] [--rounds 1]

Starts two nginx backends answering 15 bytes, then for each proxy in turn (forklb with
2 workers, nginx with 2 workers and upstream keepalive) runs ``wrk -t1 -cN -dS --latency``
and reads utime+stime of all the proxy's processes from /proc before and after, giving the
proxy's CPU microseconds per request.  Loopback only; every process is stopped by pid.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import psutil  # noqa: E402
from harness import ForkLB, NginxBackend, free_port, kill_tree, wait_port  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")

FORKLB_CONF = """
worker_processes 2;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream www_pools {{
        server 127.0.0.1:{b1} weight=1;
        server 127.0.0.1:{b2} weight=1;
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name www.chaoge.com;
        location / {{ proxy_pass http://www_pools; }}
    }}
}}
"""

NGINX_CONF = """
worker_processes 2;
daemon off;
user root root;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/cbt; proxy_temp_path {dir}/pt; fastcgi_temp_path {dir}/ft;
    uwsgi_temp_path {dir}/ut; scgi_temp_path {dir}/st;
    upstream www_pools {{
        server 127.0.0.1:{b1} weight=1;
        server 127.0.0.1:{b2} weight=1;
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name www.chaoge.com;
        location / {{
            proxy_pass http://www_pools;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and all its descendants (live ones)."""
    total = 0.0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError):
            pass
    return total


def run_wrk(port: int, duration: int, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
         "-H", "Host: www.chaoge.com", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+\w+)", out).group(1)
    p50 = re.search(r"50%\s+([\d.]+\w+)", out).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {"requests": requests, "rps": rps, "p50": p50, "p99": p99,
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sock_err.group(1) if sock_err else ""}


def measure(name: str, pid: int, port: int, args) -> dict:
    run_wrk(port, 2, args.connections)  # warm up: pools, caches
    before = cpu_seconds(pid)
    result = run_wrk(port, args.duration, args.connections)
    used = cpu_seconds(pid) - before
    result["cpu_us_per_req"] = used * 1e6 / max(1, result["requests"])
    result["name"] = name
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="forklb-bench-"))
    b1 = NginxBackend(tmp, "chaoge_www_121").start()
    b2 = NginxBackend(tmp, "chaoge_www_122").start()
    lb = ngx = None
    try:
        fport, nport = free_port(), free_port()
        lb = ForkLB(tmp, FORKLB_CONF.format(b1=b1.port, b2=b2.port, port=fport))
        lb.start(wait_ports=[fport], workers=2)
        ndir = tmp / "nginx-lb"
        ndir.mkdir()
        (ndir / "nginx.conf").write_text(NGINX_CONF.format(dir=ndir, b1=b1.port, b2=b2.port,
                                                           port=nport))
        ngx = subprocess.Popen(["/usr/sbin/nginx", "-p", str(ndir), "-c", str(ndir / "nginx.conf")])
        wait_port(nport)
        rows = []
        for _ in range(args.rounds):
            rows.append(measure("forklb", lb.master_pid, fport, args))
            rows.append(measure("nginx", ngx.pid, nport, args))
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s, keep-alive, 15-byte responses")
        print(f"{'proxy':8} {'req/s':>10} {'p50':>9} {'p99':>9} {'cpu us/req':>11} errors")
        for r in rows:
            print(f"{r['name']:8} {r['rps']:10.0f} {r['p50']:>9} {r['p99']:>9} "
                  f"{r['cpu_us_per_req']:11.1f} {r['non2xx']} {r['socket_errors']}")
    finally:
        if ngx is not None:
            kill_tree(ngx.pid, popen=ngx)
        if lb is not None:
            lb.stop()
        b1.stop()
        b2.stop()


if __name__ == "__main__":
    main()
