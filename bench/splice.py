"""Zero-copy bodies: forklb splicing every large body, forklb copying, and nginx, as proxies.

    python3 bench/splice.py [--rounds 2] [--wrk-seconds 5] [--sizes 256k,1m,4m,16m,64m]

Three proxies run side by side on the same backends, one worker each:

* ``splice``: forklb with ``proxy_splice 64k`` (every body that skips the parser is spliced);
* ``copy``: forklb with ``proxy_splice off`` (recv_into a 256 KiB buffer);
* ``nginx``: /usr/sbin/nginx, ``proxy_request_buffering off``, no temp files.

For each response size, wrk (1 thread, 8 connections) fetches a file that an nginx backend
serves; then 1 GiB goes up and down with Content-Length (the StreamBackend of
tests/test_e2e_bigbody.py).  Rounds alternate the proxies, so load from elsewhere on the
machine hits all of them alike.  Each line gives MB/s and the proxy worker's CPU seconds
(user + system) per GB, the steadier number on a shared machine.  The measured crossover
sets ``proxy_splice on`` (16 MiB, forklb/config/directives.py).
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

SIZES = {"k": 1 << 10, "m": 1 << 20}


def cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def wrk(port: int, name: str, size: int, seconds: int, pids: list[int]) -> tuple[float, float]:
    """(MB/s, CPU s per GB) of wrk fetching /files/NAME."""
    before = cpu(pids)
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "--timeout", "30s",
                          f"http://127.0.0.1:{port}/files/{name}"],
                         capture_output=True, text=True, check=True).stdout
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    done = int(re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).group(1))
    took = float(re.search(r"requests in ([\d.]+)s", out).group(1))
    total = done * size
    return total / took / 1e6, (cpu(pids) - before) / total * 1e9


def gib(port: int, pids: list[int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """(MB/s, CPU s) of one 1 GiB upload and one download."""
    out = []
    for move in (lambda: _upload(port, False) == GIB,
                 lambda: _download(port, False)[0] == GIB):
        t, c = time.monotonic(), cpu(pids)
        assert move()
        out.append((GIB / (time.monotonic() - t) / 1e6, cpu(pids) - c))
    return out[0], out[1]


def best(results: list[tuple[float, float]]) -> str:
    return f"{max(r[0] for r in results):6.0f} MB/s {min(r[1] for r in results):5.2f} CPU s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--sizes", default="256k,1m,4m,16m,64m")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="splice-bench-"))
    (tmp / "files").mkdir()
    sizes = {name: int(name[:-1]) * SIZES[name[-1]] for name in args.sizes.split(",")}
    for name, size in sizes.items():
        (tmp / "files" / name).write_bytes(os.urandom(size))
    stream = StreamBackend()
    files = NginxBackend(tmp, server_directives=f"location /files/ {{ alias {tmp}/files/; }}")
    files.start()
    proxies: dict[str, tuple[int, list[int]]] = {}
    lbs: list[ForkLB] = []
    nginx = None
    try:
        for name, splice in (("splice", "64k"), ("copy", "off")):
            port = free_port()
            lb = ForkLB(tmp, FORKLB_CONF.format(splice=splice, stream=stream.port,
                                                files=files.port, port=port), name=name)
            lbs.append(lb)
            lb.start(wait_ports=[port], workers=1)
            proxies[name] = (port, lb.worker_pids())
        port = free_port()
        ndir = tmp / "nginx-proxy"
        ndir.mkdir()
        (ndir / "nginx.conf").write_text(NGINX_CONF.format(
            user="user root root;\n" if os.geteuid() == 0 else "", dir=ndir,
            stream=stream.port, files=files.port, port=port))
        nginx = subprocess.Popen(["/usr/sbin/nginx", "-p", str(ndir), "-c",
                                  str(ndir / "nginx.conf")])
        wait_port(port)
        proxies["nginx"] = (port, [p.pid for p in psutil.Process(nginx.pid).children()])
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for proxy, (port, pids) in proxies.items():
                for name, size in sizes.items():
                    results.setdefault((name, proxy), []).append(
                        wrk(port, name, size, args.wrk_seconds, pids))
                up, down = gib(port, pids)
                results.setdefault(("1 GiB up", proxy), []).append(up)
                results.setdefault(("1 GiB down", proxy), []).append(down)
        print(f"{'':>10}  " + "  ".join(f"{p:>24}" for p in proxies))
        for what in [*sizes, "1 GiB up", "1 GiB down"]:
            unit = "" if what.startswith("1 GiB") else "/GB"
            print(f"{what:>10}  " + "  ".join(
                f"{best(results[what, p]) + unit:>24}" for p in proxies))
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for lb in lbs:
            lb.stop()
        files.stop()
        stream.stop()


if __name__ == "__main__":
    main()
