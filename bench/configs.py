"""Equivalent configurations of the three proxies, and of the backends behind them.

What "equivalent" means here (see docs/PERFORMANCE.md):

* N workers: forklb and nginx ``worker_processes N``, HAProxy ``nbthread N``;
* the same upstream: the two backend addresses with their weights, round robin, idle
  upstream connections kept (forklb ``keepalive 32``, nginx ``keepalive 32`` with HTTP/1.1,
  HAProxy ``http-reuse always``, so that ``Connection: close`` clients do not cost a new
  upstream connection each with HAProxy only);
* ``/upload`` goes to the upload sinks, streamed (nginx ``proxy_request_buffering off``,
  no body size limit anywhere);
* responses: nginx keeps its default ``proxy_buffering on`` but never spills to temp files
  (``proxy_max_temp_file_size 0``);
* 20,000 connections per worker (less when the open-files limit is lower), 75 s client
  keep-alive, 100,000 requests per connection;
* access log off, or on to a file (nginx ``buffer=64k flush=1s``; forklb buffers by itself;
  HAProxy ``log stdout`` with stdout redirected to a file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Upstream weights of the two backends, the same in all three proxies.
WEIGHTS = (1, 1)
WORKER_CONNECTIONS = 20000
NOFILE = 65536
KEEPALIVE_REQUESTS = 100000

#: Files every backend serves: URI -> size in bytes.
FILES = {"/small": 15, "/64k": 64 * 1024, "/1m": 1024 * 1024}


@dataclass(frozen=True)
class ProxyParams:
    """What a scenario asks of the proxy under test."""

    port: int
    backends: tuple[int, int]
    sinks: tuple[int, int]
    workers: int = 2
    access_log: str | None = None  # a file path, or None for off
    metrics: bool = True  # forklb only: False runs its workers with FORKLB_METRICS=off
    nofile: int = NOFILE  # the open-files limit the proxies can actually get

    @property
    def connections(self) -> int:
        """Connections allowed per worker: 20,000, or what the open-files limit leaves."""
        return max(1024, min(WORKER_CONNECTIONS, self.nofile - 500))


def _nginx_user() -> str:
    return "user root root;\n" if os.geteuid() == 0 else ""


def _nginx_temp_paths(workdir: str) -> str:
    return "".join(f"    {kind}_temp_path {workdir}/temp_{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def backend_nginx(workdir: str, docroot: str, ports: tuple[int, int], nofile: int) -> str:
    """Debian nginx serving the static files of :data:`FILES` on both backend ports."""
    servers = "".join(f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {docroot};
        add_header X-Backend b{i};
        location / {{ }}
    }}
""" for i, port in enumerate(ports, 1))
    return f"""\
daemon off;
worker_processes 2;
worker_rlimit_nofile {nofile};
{_nginx_user()}pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections {min(WORKER_CONNECTIONS, nofile - 500)}; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests {KEEPALIVE_REQUESTS * 10};
    keepalive_timeout 300s;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
{_nginx_temp_paths(workdir)}{servers}
}}
"""


def _upstream_lines(ports: tuple[int, int], fmt: str) -> str:
    return "".join(fmt.format(port=port, weight=w, i=i)
                   for i, (port, w) in enumerate(zip(ports, WEIGHTS, strict=True), 1))


def _shared_http(p: ProxyParams) -> str:
    """The part of ``http {}`` that forklb and nginx share word for word."""
    server = "        server 127.0.0.1:{port} weight={weight};\n"
    return f"""\
    keepalive_timeout 75s;
    keepalive_requests {KEEPALIVE_REQUESTS};
    client_max_body_size 0;
    upstream backends {{
{_upstream_lines(p.backends, server)}        keepalive 32;
    }}
    upstream sinks {{
{_upstream_lines(p.sinks, server)}        keepalive 32;
    }}
"""


def forklb_conf(p: ProxyParams) -> str:
    """forklb as the proxy under test."""
    log = f"access_log {p.access_log} combined;" if p.access_log else "access_log off;"
    return f"""\
worker_processes {p.workers};
worker_rlimit_nofile {p.nofile};
events {{ worker_connections {p.connections}; }}
http {{
    {log}
{_shared_http(p)}    server {{
        listen 127.0.0.1:{p.port} backlog=4096;
        location / {{ proxy_pass http://backends; }}
        location /upload {{ proxy_pass http://sinks; }}
    }}
}}
"""


def nginx_conf(p: ProxyParams, workdir: str) -> str:
    """Debian nginx as the proxy under test."""
    log = (f"access_log {p.access_log} combined buffer=64k flush=1s;" if p.access_log
           else "access_log off;")
    proxy = ("proxy_http_version 1.1; proxy_set_header Connection \"\"; "
             "proxy_max_temp_file_size 0;")
    return f"""\
daemon off;
worker_processes {p.workers};
worker_rlimit_nofile {p.nofile};
{_nginx_user()}pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections {p.connections}; }}
http {{
    {log}
{_nginx_temp_paths(workdir)}{_shared_http(p)}    server {{
        listen 127.0.0.1:{p.port} backlog=4096;
        location / {{ proxy_pass http://backends; {proxy} }}
        location /upload {{ proxy_pass http://sinks; {proxy} proxy_request_buffering off; }}
    }}
}}
"""


def haproxy_conf(p: ProxyParams) -> str:
    """HAProxy as the proxy under test (threads, one process)."""
    server = "    server s{i} 127.0.0.1:{port} weight {weight}\n"
    # maxconn is per process. HAProxy wants 2 fds per connection and refuses to start when
    # the open-files limit is lower ("strict-limits"); idle client connections need only
    # one, so it is told to warn instead, like nginx does for worker_rlimit_nofile.
    maxconn = min(p.connections * p.workers, p.nofile - 500)
    log_global = "    log stdout format raw local0\n" if p.access_log else ""
    log_defaults = "    log global\n    option httplog\n" if p.access_log else ""
    return f"""\
global
    nbthread {p.workers}
    maxconn {maxconn}
    no strict-limits
{log_global}
defaults
    mode http
    maxconn {maxconn}
    timeout connect 60s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
    http-reuse always
{log_defaults}
frontend fe
    bind 127.0.0.1:{p.port}
    use_backend sinks if {{ path_beg /upload }}
    default_backend backends

backend backends
    balance roundrobin
{_upstream_lines(p.backends, server)}
backend sinks
    balance roundrobin
{_upstream_lines(p.sinks, server)}"""
