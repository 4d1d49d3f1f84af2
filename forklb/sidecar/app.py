"""The sidecar's HTTP interface, as a WSGI application (no I/O of its own).

``GET /status``   JSON: forklb version, config file, every process's figures.
``GET /``         the same as a small HTML page for people.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from typing import Any

from forklb import __version__
from forklb.model import Config
from forklb.sidecar.processes import ProcessTable

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class StatusApp:
    def __init__(self, config: Config, processes: ProcessTable):
        self.config = config
        self.processes = processes

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "config": self.config.path,
            "master_pid": self.processes.master_pid,
            "processes": self.processes.snapshot(),
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"method not allowed\n",
                            "text/plain", [("Allow", "GET, HEAD")])
        if path == "/status":
            body = json.dumps(self.status(), indent=2).encode() + b"\n"
            return _respond(start_response, "200 OK", body, "application/json")
        if path == "/":
            return _respond(start_response, "200 OK", self._page(), "text/html; charset=utf-8")
        return _respond(start_response, "404 Not Found", b"not found\n", "text/plain")

    def _page(self) -> bytes:
        status = self.status()
        rows = "".join(
            f"<tr><td>{p['pid']}</td><td>{html.escape(p['role'])}</td>"
            f"<td>{p['cpu_user_seconds'] + p['cpu_system_seconds']:.2f}</td>"
            f"<td>{p['rss_bytes'] / 1048576:.1f}</td><td>{p['open_fds']}</td></tr>"
            for p in status["processes"]
        )
        return (
            "<!doctype html><title>forklb status</title>"
            f"<h1>forklb {html.escape(status['version'])}</h1>"
            f"<p>config {html.escape(status['config'])}</p>"
            "<table><tr><th>pid</th><th>role</th><th>CPU s</th><th>RSS MiB</th>"
            f"<th>fds</th></tr>{rows}</table>\n"
        ).encode()


def _respond(start_response: StartResponse, status: str, body: bytes, ctype: str,
             extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), *(extra or [])]
    start_response(status, headers)
    return [body]
