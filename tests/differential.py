"""Differential testing: one nginx-syntax config, run by Debian's nginx and by forklb.

A :class:`DiffPair` starts both proxies from the same ``http {}`` body, in front of
the same backends, and sends the same raw bytes to each (:meth:`DiffPair.send`).

To make ``$server_port`` and the client address identical, both listen on the same
port numbers: nginx on :data:`NGINX_ADDR` (127.0.0.2), forklb on :data:`FORKLB_ADDR`
(127.0.0.1). The client always connects from 127.0.0.1, so ``$remote_addr`` is the
same for both.

Config texts use ``@NAME@`` placeholders (:func:`render`): ``@ADDR@`` is the engine's
own listening address; the others (ports of listeners and backends) are the same for
both engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    NGINX_BIN,
    ForkLB,
    HttpProtocolError,
    Response,
    _ManagedProcess,
    _read_response,
    _read_text,
    _Reader,
    _unique_dir,
    wait_for,
)

NGINX_ADDR = "127.0.0.2"
FORKLB_ADDR = "127.0.0.1"
CLIENT_ADDR = "127.0.0.1"

# What only nginx needs to speak to upstreams like forklb does: nginx 1.22 speaks
# HTTP/1.0 unless told otherwise (forklb has no proxy_http_version yet; it always
# speaks 1.1). ``proxy_set_header Connection "";`` is written in the shared configs,
# at every level that sets headers, as both engines understand it.
NGINX_ONLY_HTTP = "proxy_http_version 1.1;"


def render(text: str, values: Mapping[str, Any]) -> str:
    """Replace every ``@NAME@`` in ``text`` by ``values[NAME]``; unknown names fail."""
    out = text
    for name, value in values.items():
        out = out.replace(f"@{name}@", str(value))
    if "@" in out.replace("@@", ""):
        leftover = out[out.index("@") : out.index("@") + 30]
        raise KeyError(f"unfilled placeholder near {leftover!r}")
    return out


def port_open(addr: str, port: int) -> bool:
    """True if a TCP connect to addr:port succeeds now."""
    try:
        with socket.create_connection((addr, port), timeout=0.2):
            return True
    except OSError:
        return False


class NginxProxy(_ManagedProcess):
    """Debian's nginx in its own prefix, in the foreground, with the given ``http {}`` body."""

    def __init__(self, tmp_path: Path, http_body: str) -> None:
        super().__init__(_unique_dir(tmp_path, "nginx-proxy"))
        self.http_body = http_body
        self.conf_path = self.workdir / "conf" / "nginx.conf"
        self.error_log_path = self.workdir / "logs" / "error.log"

    def config_text(self) -> str:
        """The whole nginx.conf: main context, temp paths and the shared body."""
        w = self.workdir
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {w}/temp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}"
            f"pid {w}/logs/nginx.pid;\nerror_log {self.error_log_path} info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp}\n    {NGINX_ONLY_HTTP}\n"
            f"{self.http_body}\n}}\n"
        )

    def error_log(self) -> str:
        """Contents of nginx's error log."""
        return _read_text(self.error_log_path)

    def diagnostics(self) -> str:
        return f"{super().diagnostics()}\n--- error log:\n{self.error_log()}"

    def start(self, ports: list[int], timeout: float = 10.0) -> NginxProxy:
        """Write the config, start nginx and wait until every port accepts."""
        for sub in ("conf", "logs", "temp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.conf_path.write_text(self.config_text())
        self._spawn([NGINX_BIN, "-p", f"{self.workdir}/", "-c", str(self.conf_path),
                     "-e", str(self.error_log_path)])
        _wait_listening(self, NGINX_ADDR, ports, timeout)
        return self


def _wait_listening(proc: _ManagedProcess, addr: str, ports: list[int], timeout: float) -> None:
    def ready() -> bool:
        if not proc.running:
            raise AssertionError(f"{proc!r} exited early\n{proc.diagnostics()}")
        return all(port_open(addr, p) for p in ports)

    try:
        wait_for(ready, timeout, message=lambda: f"{proc!r} not listening\n{proc.diagnostics()}")
    except BaseException:
        proc.stop()
        raise


def forklb_config(http_body: str) -> str:
    """The whole forklb config around the shared ``http {}`` body."""
    return (
        "worker_processes 1;\nerror_log logs/error.log info;\nevents { }\n"
        f"http {{\n    access_log off;\n{http_body}\n}}\n"
    )


@dataclass
class Seen:
    """What the recording backend reported, or None fields when it was not reached."""

    status: int
    backend: str | None
    method: str | None
    target: str | None
    version: str | None  # the HTTP version of the request the backend got
    headers: list[tuple[str, str]] | None
    body_len: int | None
    body_sha256: str | None
    response: Response


def seen(resp: Response) -> Seen:
    """Decode an echo backend's JSON answer (see tests/backend_server.py)."""
    info = None
    if resp.header("content-type") == "application/json":
        try:
            info = json.loads(resp.body)
        except ValueError:
            pass  # HEAD, or a body the test asked for (__size)
    if not isinstance(info, dict):
        return Seen(resp.status, None, None, None, None, None, None, None, resp)
    body = info["body"].encode("latin-1")
    return Seen(
        resp.status, info["backend"], info["method"], info["path"], info["version"],
        [(k, v) for k, v in info["headers"]], info["body_len"],
        hashlib.sha256(body).hexdigest(), resp,
    )


def exchange(addr: str, port: int, raw: bytes, method: str = "GET",
             timeout: float = 10.0) -> Response:
    """Send ``raw`` from 127.0.0.1 to addr:port and read one response."""
    with socket.create_connection((addr, port), timeout=timeout,
                                  source_address=(CLIENT_ADDR, 0)) as sock:
        sock.sendall(raw)
        return _read_response(_Reader(sock), method)


class DiffPair:
    """nginx and forklb running the same ``http {}`` body (started once, module-scoped)."""

    def __init__(self, tmp_path: Path, http_template: str, ports: Mapping[str, int],
                 listen: list[int]) -> None:
        self.tmp_path = tmp_path
        self.listen = listen
        self.values = dict(ports)  # the placeholders' values (ports)
        values = self.values
        self.nginx = NginxProxy(tmp_path, render(http_template, {**values, "ADDR": NGINX_ADDR}))
        self.forklb = ForkLB(tmp_path, forklb_config(
            render(http_template, {**values, "ADDR": FORKLB_ADDR})))

    def start(self) -> DiffPair:
        """Start both; stop both if either fails."""
        try:
            self.nginx.start(self.listen)
            self.forklb.start()
            _wait_listening(self.forklb, FORKLB_ADDR, self.listen, 15.0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both process trees."""
        self.forklb.stop()
        self.nginx.stop()

    def send(self, raw: bytes, port: int | None = None, method: str = "GET",
             timeout: float = 10.0) -> tuple[Response | Exception, Response | Exception]:
        """The same bytes to nginx, then to forklb: (nginx's answer, forklb's answer).

        An exception (connection closed without a response, bad framing) is returned
        instead of a response, so a test can compare failures too.
        """
        port = self.listen[0] if port is None else port
        out: list[Response | Exception] = []
        for addr in (NGINX_ADDR, FORKLB_ADDR):
            try:
                out.append(exchange(addr, port, raw, method, timeout))
            except (OSError, ConnectionError, HttpProtocolError) as e:
                out.append(e)
        return out[0], out[1]


def exchange_many(addr: str, port: int, raw: bytes, methods: list[str],
                  timeout: float = 10.0) -> list[Response]:
    """Send ``raw`` (several pipelined requests) at once and read one response per method."""
    with socket.create_connection((addr, port), timeout=timeout,
                                  source_address=(CLIENT_ADDR, 0)) as sock:
        sock.sendall(raw)
        reader = _Reader(sock)
        return [_read_response(reader, m) for m in methods]


def request(method: str = "GET", target: str = "/", headers: list[tuple[str, str]] | None = None,
            body: bytes = b"", host: str | None = "localhost") -> bytes:
    """A raw HTTP/1.1 request with ``Connection: close``; headers exactly in order."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Blackhole:
    """A listening socket that never accepts: connects succeed, nothing is ever answered."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((CLIENT_ADDR, 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]

    def stop(self) -> None:
        self.sock.close()
