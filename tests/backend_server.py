"""Standalone HTTP/1.1 backend used by the forklb end-to-end tests.

Run: ``python tests/backend_server.py --port N [--mode echo|name] [--name NAME] [--body TEXT]``.

Modes:

* ``echo``: 200 with a JSON body ``{"backend", "method", "path", "version", "headers",
  "body_len", "body", "client"}`` where ``path`` is the raw request target, ``headers`` a
  list of ``[name, value]`` pairs in received order and ``body`` the request body decoded
  as latin-1.
* ``name``: 200 with ``BODY + "\\n"`` (``text/plain``).

Every response has ``Content-Length`` (so keep-alive works) and ``X-Backend: NAME``.
Query parameters of the request target tweak a single response:
``__status=N`` (status code), ``__delay=SECONDS`` (sleep before answering),
``__size=N`` (answer N bytes of ``x`` instead), ``__chunked=1`` (chunked framing instead of
Content-Length), ``__close=1`` (``Connection: close`` and close after the response).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class BackendServer(ThreadingHTTPServer):
    """Threading server carrying the backend configuration."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, port: int, mode: str, name: str, body: str, status: int) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.mode = mode
        self.name = name
        self.body = body
        self.status = status


class Handler(BaseHTTPRequestHandler):
    """Answers any method according to the server's mode."""

    protocol_version = "HTTP/1.1"
    server: BackendServer

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else b""

    def _handle(self) -> None:
        request_body = self._read_body()
        words = self.requestline.split()
        target = words[1] if len(words) >= 2 else self.path
        query = parse_qs(urlsplit(target).query)

        def param(key: str, default: str) -> str:
            return query.get(key, [default])[0]

        delay = float(param("__delay", "0"))
        if delay > 0:
            time.sleep(delay)
        status = int(param("__status", str(self.server.status)))

        if self.server.mode == "echo":
            info = {
                "backend": self.server.name,
                "method": self.command,
                "path": target,
                "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_len": len(request_body),
                "body": request_body.decode("latin-1"),
                "client": [self.client_address[0], self.client_address[1]],
            }
            payload = (json.dumps(info) + "\n").encode()
            ctype = "application/json"
        else:
            payload = (self.server.body + "\n").encode()
            ctype = "text/plain"
        if "__size" in query:
            payload = b"x" * int(param("__size", "0"))

        bodyless = status < 200 or status in (204, 304)
        chunked = param("__chunked", "0") == "1" and not bodyless
        close = param("__close", "0") == "1"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("X-Backend", self.server.name)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not bodyless:
            self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and not bodyless:
            if chunked:
                for i in range(0, len(payload), 4096):
                    piece = payload[i : i + 4096]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.write(payload)
        self.wfile.flush()


def main() -> None:
    """Parse arguments and serve forever."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("echo", "name"), default="echo")
    ap.add_argument("--name", default="backend")
    ap.add_argument("--body", default=None)
    ap.add_argument("--status", type=int, default=200)
    args = ap.parse_args()
    body = args.name if args.body is None else args.body
    server = BackendServer(args.port, args.mode, args.name, body, args.status)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
