"""The sidecar's HTTP interface, as a WSGI application (no I/O of its own).

=====================================================  ============================
``GET /status``                                        the live HTML page when the client
                                                       accepts text/html, else the JSON of
                                                       ``/status.json``
``GET /status.json``                                   version, config, processes, upstreams
                                                       with their counters, totals
``GET /metrics``                                       Prometheus / OpenMetrics
``GET /-/healthy``, ``GET /-/ready``                   liveness, readiness (a worker accepts)
``POST /-/reload``                                     token; config checked, then HUP
``GET /``                                              the processes as an HTML page
``GET /api/upstreams``                                 every upstream and server (JSON)
``PATCH /api/upstreams/NAME/servers/ADDR``             ``{"state": ..., "weight": N}``
=====================================================  ============================

Clients outside the ``allow``/``deny`` rules (default: loopback only) get 403.
Writes need ``Authorization: Bearer TOKEN`` with the token of
``admin_token_file``; without a token file the API is read-only.
"""

from __future__ import annotations

import hmac
import html
import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

from forklb import __version__
from forklb.model import Config
from forklb.sidecar import api
from forklb.sidecar.endpoints import ROUTES
from forklb.sidecar.processes import ProcessTable
from forklb.upstream.shared import SharedUpstreamState

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
MAX_BODY = 64 * 1024


class StatusApp:
    def __init__(self, config: Config, processes: ProcessTable, shared: SharedUpstreamState,
                 token: str | None):
        self.config = config
        self.processes = processes
        self.shared = shared
        self.token = token
        self.upstreams = dict(config.http.upstreams)
        self.endpoints = None  # forklb.sidecar.endpoints.Endpoints, set by the sidecar process

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
        client = environ.get("REMOTE_ADDR", "")
        sidecar = self.config.sidecar
        if sidecar is not None and not sidecar.allows(client):
            return _json(start_response, 403, {"error": "forbidden"})
        try:
            if self.endpoints is not None and (path in ROUTES or path == "/status"):
                return self._endpoint(environ, start_response, method, path)
            if path.startswith("/api/upstreams"):
                return self._api(environ, start_response, method, path)
            if method not in ("GET", "HEAD"):
                raise api.ApiError(405, "method not allowed")
            if path == "/status":
                return _json(start_response, 200, self.status())
            if path == "/":
                return _respond(start_response, "200 OK", self._page(),
                                "text/html; charset=utf-8")
            raise api.ApiError(404, "not found")
        except api.ApiError as e:
            return _json(start_response, e.status, {"error": e.message})

    def _api(self, environ: dict[str, Any], start_response: StartResponse, method: str,
             path: str) -> list[bytes]:
        views = self.shared.views
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["api", "upstreams"] and method == "GET":
            return _json(start_response, 200, api.snapshot(self.upstreams, views))
        if len(parts) == 5 and parts[:2] == ["api", "upstreams"] and parts[3] == "servers":
            if method != "PATCH":
                raise api.ApiError(405, "method not allowed")
            self._authorize(environ)
            upstream, i = api.find(self.upstreams, views, parts[2], parts[4])
            api.change(views[upstream.name], i, _read_json(environ))
            return _json(start_response, 200, api.snapshot({upstream.name: upstream}, views))
        raise api.ApiError(404, "not found")

    def _endpoint(self, environ: dict[str, Any], start_response: StartResponse, method: str,
                  path: str) -> list[bytes]:
        """Metrics, health, readiness, reload and the status page (endpoints.py)."""
        ep = self.endpoints
        if path == "/-/reload":
            if method != "POST":
                raise api.ApiError(405, "method not allowed")
            self._authorize(environ)
            status, body = ep.reload()
            return _json(start_response, status, body)
        if method not in ("GET", "HEAD"):
            raise api.ApiError(405, "method not allowed")
        if path == "/metrics":
            body, ctype = ep.metrics(environ.get("HTTP_ACCEPT", ""))
            return _respond(start_response, "200 OK", body, ctype)
        if path == "/-/healthy":
            return _respond(start_response, "200 OK", b"forklb is healthy.\n", "text/plain")
        if path == "/-/ready":
            if ep.ready():
                return _respond(start_response, "200 OK", b"forklb is ready.\n", "text/plain")
            return _respond(start_response, "503 Service Unavailable",
                            b"forklb is not ready.\n", "text/plain")
        if path == "/status" and "text/html" in environ.get("HTTP_ACCEPT", ""):
            return _respond(start_response, "200 OK", ep.page, "text/html; charset=utf-8")
        return _json(start_response, 200, ep.status(self.status()))

    def _authorize(self, environ: dict[str, Any]) -> None:
        if self.token is None:
            raise api.ApiError(401, "the API is read-only: no admin_token_file configured")
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), self.token):
            raise api.ApiError(401, "missing or wrong token")

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


def _read_json(environ: dict[str, Any]) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise api.ApiError(400, "bad Content-Length") from None
    if length > MAX_BODY:
        raise api.ApiError(413, "body too large")
    try:
        return json.loads(environ["wsgi.input"].read(length) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise api.ApiError(400, "the body is not valid JSON") from None


def _json(start_response: StartResponse, status: int, body: Any) -> list[bytes]:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
              404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
              503: "Service Unavailable"}
    data = json.dumps(body, indent=2).encode() + b"\n"
    return _respond(start_response, f"{status} {reason.get(status, '')}".strip(), data,
                    "application/json")


def _respond(start_response: StartResponse, status: str, body: bytes, ctype: str,
             extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), *(extra or [])]
    start_response(status, headers)
    return [body]
