"""Zero-copy bodies: forklb with ``proxy_splice on`` and ``off``, and nginx, as proxies.

    python3 bench/splice.py [--runs 3] [--wrk-seconds 5]

Measures, for each proxy, on the same backends:

* 1 GiB up and down with Content-Length (the StreamBackend of
  tests/test_e2e_bigbody.py: a thread that discards uploads and generates
  downloads), best of ``--runs``;
* wrk, 8 connections, 1 MiB responses (a file served by nginx as backend).

One forklb worker and one nginx worker, so the numbers compare one process each.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import ForkLB, NginxBackend, free_port, wait_port  # noqa: E402
from test_e2e_bigbody import GIB, StreamBackend, _download, _upload  # noqa: E402

FORKLB_CONF = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    client_max_body_size 0;
    proxy_splice {splice};
    upstream big {{ server 127.0.0.1:{stream}; }}
    upstream files {{ server 127.0.0.1:{files}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://big; }}
        location /files/ {{ proxy_pass http://files; }}
    }}
}}
"""

NGINX_CONF = """
daemon off;
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ }}
http {{
    access_log off;
    client_body_temp_path {dir}; proxy_temp_path {dir};
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_max_temp_file_size 0;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    upstream big {{ server 127.0.0.1:{stream}; }}
    upstream files {{ server 127.0.0.1:{files}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://big; }}
        location /files/ {{ proxy_pass http://files; }}
    }}
}}
"""


def _cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def gib(port: int, runs: int, pids: list[int]) -> str:
    """Best MB/s of ``runs`` 1 GiB uploads and downloads, and the proxy's CPU
    seconds per GiB (user + system; steadier than MB/s on a shared machine)."""
    up = down = 0.0
    up_cpu = down_cpu = float("inf")
    for _ in range(runs):
        t, c = time.monotonic(), _cpu(pids)
        assert _upload(port, False) == GIB
        up = max(up, GIB / (time.monotonic() - t) / 1e6)
        up_cpu = min(up_cpu, _cpu(pids) - c)
        t, c = time.monotonic(), _cpu(pids)
        assert _download(port, False)[0] == GIB
        down = max(down, GIB / (time.monotonic() - t) / 1e6)
        down_cpu = min(down_cpu, _cpu(pids) - c)
    return (f"1 GiB up {up:.0f} MB/s ({up_cpu:.2f} CPU s), "
            f"down {down:.0f} MB/s ({down_cpu:.2f} CPU s)")


def wrk(port: int, seconds: int, pids: list[int]) -> str:
    """MB/s of 1 MiB responses with wrk (1 thread, 8 connections), and the
    proxy's CPU seconds per GB relayed."""
    c = _cpu(pids)
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s",
                          f"http://127.0.0.1:{port}/files/1m"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert not errors, out
    total = int(re.search(r"(\d+) requests in", out).group(1)) * (1 << 20)
    per_gb = (_cpu(pids) - c) / total * 1e9
    return f"wrk 1 MiB {rps * (1 << 20) / 1e6:.0f} MB/s ({per_gb:.2f} CPU s/GB)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="splice-bench-"))
    (tmp / "files").mkdir()
    (tmp / "files" / "1m").write_bytes(os.urandom(1 << 20))
    stream = StreamBackend()
    files = NginxBackend(tmp, server_directives=f"location /files/ {{ alias {tmp}/files/; }}")
    files.start()
    try:
        for splice in os.environ.get("MODES", "on off").split():
            port = free_port()
            lb = ForkLB(tmp, FORKLB_CONF.format(
                splice=splice, stream=stream.port, files=files.port, port=port),
                name=f"forklb-{splice}")
            lb.start(wait_ports=[port], workers=1)
            try:
                pids = lb.worker_pids()
                print(f"forklb splice {splice}: {gib(port, args.runs, pids)}, "
                      f"{wrk(port, args.wrk_seconds, pids)}", flush=True)
            finally:
                lb.stop()
        port = free_port()
        ndir = tmp / "nginx-proxy"
        ndir.mkdir()
        (ndir / "nginx.conf").write_text(NGINX_CONF.format(
            user="user root root;\n" if os.geteuid() == 0 else "", dir=ndir,
            stream=stream.port, files=files.port, port=port))
        proc = subprocess.Popen(["/usr/sbin/nginx", "-p", str(ndir), "-c",
                                 str(ndir / "nginx.conf")])
        try:
            wait_port(port)
            pids = [p.pid for p in psutil.Process(proc.pid).children()]
            print(f"nginx proxy: {gib(port, args.runs, pids)}, "
                  f"{wrk(port, args.wrk_seconds, pids)}", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        files.stop()
        stream.stop()


if __name__ == "__main__":
    main()
