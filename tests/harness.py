"""End-to-end test harness for forklb.

Everything here works with real processes and real sockets on 127.0.0.1:

* port helpers: :func:`free_port`, :func:`wait_port`, :func:`wait_port_closed`;
* a tiny raw-socket HTTP/1.1 client: :func:`http_request`, :class:`HttpClient`,
  :func:`raw_exchange`, :func:`build_request`;
* managed processes: :class:`NginxBackend` (Debian nginx), :class:`PyBackend`
  (``tests/backend_server.py``) and :class:`ForkLB` (``python -m forklb``);
* raw-socket backends served by threads of the test process: :class:`SocketBackend`
  (the accept loop, subclassed by the tests) and :class:`HangupBackend`;
* process-tree cleanup by pid: :func:`kill_tree`;
* config builders: :func:`proxy_conf`, :func:`proxy_block`;
* a generic polling helper: :func:`wait_for`.

Every managed process is registered so that it is killed (whole tree, by pid) at
interpreter exit even if a test forgets to stop it; the pytest fixtures in
``conftest.py`` stop them at teardown.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psutil

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
TESTS_DIR: Path = Path(__file__).resolve().parent
NGINX_BIN: str = os.environ.get("FORKLB_TEST_NGINX", "/usr/sbin/nginx")
BACKEND_SCRIPT: Path = TESTS_DIR / "backend_server.py"
LOCALHOST = "127.0.0.1"

T = TypeVar("T")
HeadersArg = Mapping[str, str] | Sequence[tuple[str, str]] | None

# --------------------------------------------------------------------------- polling / ports

_ISSUED_PORTS: set[int] = set()


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Raises ``AssertionError`` with ``message`` (a string or a callable building one, so it
    can include late diagnostics) when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s: {text}")
        time.sleep(interval)


def free_port() -> int:
    """Return a currently unused TCP port on 127.0.0.1 (never the same one twice per run)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port
    raise RuntimeError("could not find a fresh free port")


def port_is_open(port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connect to 127.0.0.1:port succeeds right now."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until 127.0.0.1:port accepts TCP connections; ``AssertionError`` on timeout."""
    wait_for(
        lambda: port_is_open(port),
        timeout,
        message=f"nothing accepts connections on 127.0.0.1:{port}",
    )


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connect to 127.0.0.1:port fails; ``AssertionError`` on timeout."""
    wait_for(
        lambda: not port_is_open(port),
        timeout,
        message=f"127.0.0.1:{port} still accepts connections",
    )


# --------------------------------------------------------------------------- HTTP client


class HttpProtocolError(Exception):
    """The peer sent something that is not a valid HTTP/1.x response."""


@dataclass
class Response:
    """A parsed HTTP response."""

    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)
    #: True when the body was delimited by the server closing the connection.
    close_delimited: bool = False

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``default``."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return default

    def header_list(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), in order."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def has_header(self, name: str) -> bool:
        """True if header ``name`` is present (case-insensitive)."""
        return bool(self.header_list(name))

    @property
    def text(self) -> str:
        """Body decoded as UTF-8 (with replacement characters)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """Body parsed as JSON."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 200 else self.body[:200] + b"..."
        return f"<Response {self.status} {self.reason!r} headers={self.headers!r} body={body!r}>"


def _header_items(headers: HeadersArg) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return [(k, v) for k, v in headers]


def build_request(
    method: str = "GET",
    path: str = "/",
    host: str | None = "localhost",
    headers: HeadersArg = None,
    body: bytes = b"",
    connection: str | None = None,
) -> bytes:
    """Serialize an HTTP/1.1 request.

    ``Host`` (unless ``host`` is None), ``Connection`` (if given) and ``Content-Length``
    (when there is a body or the method is POST/PUT/PATCH) are added unless ``headers``
    already contains them.
    """
    items = _header_items(headers)
    present = {k.lower() for k, _ in items}
    out = [f"{method} {path} HTTP/1.1"]
    if host is not None and "host" not in present:
        out.append(f"Host: {host}")
    out.extend(f"{k}: {v}" for k, v in items)
    if connection is not None and "connection" not in present:
        out.append(f"Connection: {connection}")
    needs_length = body or method.upper() in ("POST", "PUT", "PATCH")
    if needs_length and not present & {"content-length", "transfer-encoding"}:
        out.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body


class _Reader:
    """Buffered reader over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readline(self, limit: int = 65536) -> bytes:
        """Read one line including its LF; returns partial data (maybe b"") at EOF."""
        while True:
            idx = self.buf.find(b"\n")
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) > limit:
                raise HttpProtocolError(f"line longer than {limit} bytes")
            if not self._fill():
                line = bytes(self.buf)
                self.buf.clear()
                return line

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise HttpProtocolError(
                    f"connection closed after {len(self.buf)} of {n} expected body bytes"
                )
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_to_close(self) -> bytes:
        while self._fill():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data


def _parse_header_block(reader: _Reader) -> tuple[list[tuple[str, str]], bytes]:
    headers: list[tuple[str, str]] = []
    raw = bytearray()
    while True:
        line = reader.readline()
        raw += line
        if not line:
            raise HttpProtocolError("connection closed inside the header block")
        if line in (b"\r\n", b"\n"):
            return headers, bytes(raw)
        text = line.decode("latin-1").rstrip("\r\n")
        name, sep, value = text.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpProtocolError(f"malformed header line {text!r}")
        headers.append((name, value.strip(" \t")))


def _read_chunked(reader: _Reader) -> tuple[bytes, list[tuple[str, str]]]:
    body = bytearray()
    while True:
        line = reader.readline()
        if not line:
            raise HttpProtocolError("connection closed inside chunked body")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpProtocolError(f"bad chunk size line {line!r}") from None
        if size == 0:
            trailers, _ = _parse_header_block(reader)
            return bytes(body), trailers
        body += reader.read_exact(size)
        if reader.read_exact(2) != b"\r\n":
            raise HttpProtocolError("chunk data not followed by CRLF")


def _read_response(reader: _Reader, method: str) -> Response:
    """Read one final response (skipping 1xx interim responses except 101)."""
    while True:
        status_line = reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection without sending a response")
        text = status_line.decode("latin-1").rstrip("\r\n")
        parts = text.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HttpProtocolError(f"bad status line {text!r}")
        version, status = parts[0], int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers, raw_headers = _parse_header_block(reader)
        if 100 <= status < 200 and status != 101:
            continue
        break

    resp = Response(status, reason, version, headers, b"", raw_head=status_line + raw_headers)
    if method.upper() == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return resp
    te = resp.header_list("transfer-encoding")
    if te:
        codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
        if codings and codings[-1] == "chunked":
            resp.body, resp.trailers = _read_chunked(reader)
            resp.chunked = True
            return resp
        resp.body, resp.close_delimited = reader.read_to_close(), True
        return resp
    lengths = {v.strip() for v in resp.header_list("content-length")}
    if lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise HttpProtocolError(f"bad Content-Length {sorted(lengths)}")
        resp.body = reader.read_exact(int(next(iter(lengths))))
        return resp
    resp.body, resp.close_delimited = reader.read_to_close(), True
    return resp


def http_request(
    port: int,
    path: str = "/",
    host: str | None = "localhost",
    method: str = "GET",
    headers: HeadersArg = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> Response:
    """Send one HTTP/1.1 request with ``Connection: close`` and return the parsed response."""
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(build_request(method, path, host, headers, body, connection="close"))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (e.g. 413) and close before reading everything
        return _read_response(_Reader(sock), method)


class HttpClient:
    """A keep-alive HTTP/1.1 client bound to a single TCP connection."""

    def __init__(self, port: int, host: str | None = "localhost", timeout: float = 5.0) -> None:
        self.port = port
        self.host = host
        self.sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
        self._reader = _Reader(self.sock)

    @property
    def local_port(self) -> int:
        """Client-side port of the connection (identifies the connection)."""
        return int(self.sock.getsockname()[1])

    def send(self, data: bytes) -> None:
        """Send raw bytes on the connection."""
        self.sock.sendall(data)

    def read_response(self, method: str = "GET") -> Response:
        """Read the next response from the connection."""
        return _read_response(self._reader, method)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: HeadersArg = None,
        body: bytes = b"",
    ) -> Response:
        """Send a request (no ``Connection`` header is added) and read its response."""
        self.send(build_request(method, path, self.host, headers, body))
        return self.read_response(method)

    def get(self, path: str = "/", headers: HeadersArg = None) -> Response:
        """Shorthand for ``request("GET", path, headers)``."""
        return self.request("GET", path, headers)

    def server_closed(self, timeout: float = 1.0) -> bool:
        """True if the server closes the connection within ``timeout`` seconds.

        Unread bytes received meanwhile stay buffered for :meth:`read_response`.
        """
        if self._reader.eof:
            return True
        if self._reader.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return not self._reader._fill()
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(old)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_exchange(
    port: int, data: bytes, timeout: float = 5.0, shutdown_write: bool = False
) -> bytes:
    """Send ``data`` and return everything received until the server closes or ``timeout``.

    With ``shutdown_write`` the write side is half-closed after sending.
    """
    received = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


# --------------------------------------------------------------------------- configs


def proxy_conf(
    *,
    port: int,
    backend: int,
    workers: int | str = 1,
    main: str = "",
    error_log: str | None = "logs/error.log notice",
    access_log: str = "off",
    location: str = "",
) -> str:
    """The smallest proxying forklb config: ``worker_processes workers``, ``upstream app``
    with the one server 127.0.0.1:``backend``, and a server on 127.0.0.1:``port`` whose
    ``location /`` proxies to it.

    ``main`` adds main-context directives (``"daemon on;"``, a ``sidecar {...}`` block),
    ``error_log`` and ``access_log`` are those directives' arguments (``error_log=None``
    leaves the directive out), ``location`` adds directives to ``location /``.
    """
    error_line = "" if error_log is None else f"error_log {error_log};"
    return f"""
{main}
worker_processes {workers};
{error_line}
events {{ }}
http {{
    access_log {access_log};
    upstream app {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; {location} }}
    }}
}}
"""


def proxy_block(*, port: int, servers: str, directives: str = "", upstream: str = "app") -> str:
    """http-context text: ``upstream <upstream> { <servers> }`` and a server on
    127.0.0.1:``port`` whose ``location /`` proxies to it with ``proxy_http_version 1.1``
    and ``directives``.  The same block serves forklb and, as ``extra_servers``, an
    :class:`NginxBackend`, so that both balancers are compared on one config.
    """
    return f"""
    upstream {upstream} {{ {servers} }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            {directives}
        }}
    }}
"""


# --------------------------------------------------------------------------- processes


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _wait_dead(
    procs: Iterable[psutil.Process],
    timeout: float,
    popen: subprocess.Popen[Any] | None = None,
) -> None:
    """Poll until none of ``procs`` is alive (zombies count as dead), reaping ``popen``."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not any(_alive(p) for p in procs):
            return
        time.sleep(0.02)


def kill_tree(
    pid: int,
    timeout: float = 10.0,
    sig: int = signal.SIGTERM,
    popen: subprocess.Popen[Any] | None = None,
    orphan_grace: float = 2.0,
) -> int | None:
    """Stop process ``pid`` and all its descendants.

    Sends ``sig`` to ``pid`` only (so a master can shut its workers down itself), waits up to
    ``timeout`` seconds for the whole tree (descendants forked meanwhile are tracked too; once
    the root is gone its leftovers get at most ``orphan_grace`` seconds), then SIGKILLs
    survivors. ``popen`` (the root's Popen, if we started it) is reaped; its exit code is
    returned.
    """
    tree: dict[int, psutil.Process] = {}
    root: psutil.Process | None = None
    if popen is None or popen.poll() is None:  # a reaped pid may have been reused
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass
    if root is not None:
        tree[pid] = root
        tree.update((p.pid, p) for p in _descendants(root))
        try:
            root.send_signal(sig)
        except psutil.Error:
            pass

    deadline = time.monotonic() + timeout
    root_gone_at: float | None = None
    while True:
        if popen is not None:
            popen.poll()
        if root is not None and _alive(root):
            for p in _descendants(root):
                tree.setdefault(p.pid, p)
        elif root_gone_at is None:
            root_gone_at = time.monotonic()
        survivors = [p for p in tree.values() if _alive(p)]
        now = time.monotonic()
        if not survivors or now >= deadline:
            break
        if root_gone_at is not None and now - root_gone_at >= orphan_grace:
            break
        time.sleep(0.05)

    survivors = [p for p in tree.values() if _alive(p)]
    for p in survivors:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_dead(survivors, 5.0, popen)
    if popen is not None:
        try:
            popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        return popen.returncode
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _unique_dir(base: Path, stem: str) -> Path:
    """Create and return ``base/stem`` (or ``base/stem-N`` if taken)."""
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        candidate = base / (stem if n == 0 else f"{stem}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free directory name for {stem!r} in {base}")


_LIVE: set[_ManagedProcess] = set()
_MP = TypeVar("_MP", bound="_ManagedProcess")


class _ManagedProcess:
    """A subprocess with captured stdout/stderr, killed as a tree by pid."""

    stop_timeout: float = 10.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Every descendant ever observed, so orphans (e.g. workers of a crashed master,
        # re-parented away from us) are still killed by stop().
        self._seen: dict[int, psutil.Process] = {}

    def remember_tree(self) -> None:
        """Record the current descendants of the process for cleanup."""
        if not self.running:  # once reaped, the pid may belong to someone else
            return
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        for p in _descendants(root):
            self._seen.setdefault(p.pid, p)

    # -- subclass hooks
    def diagnostics(self) -> str:
        """Text appended to start-up failure messages."""
        return (
            f"--- stdout ({self.stdout_path}):\n{_read_text(self.stdout_path)}\n"
            f"--- stderr ({self.stderr_path}):\n{_read_text(self.stderr_path)}"
        )

    # -- lifecycle
    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        _LIVE.add(self)

    def _wait_ready(self, ports: Iterable[int], timeout: float) -> None:
        """Wait until every port accepts connections; fail fast if the process exits."""
        pending = list(ports)
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{self!r} exited early with status {proc.returncode} "
                    f"(argv: {proc.args})\n{self.diagnostics()}"
                )
            while pending and port_is_open(pending[0]):
                pending.pop(0)
            self.remember_tree()
            return not pending

        try:
            wait_for(
                ready,
                timeout,
                message=lambda: f"{self!r}: ports {pending} not open\n{self.diagnostics()}",
            )
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """Pid of the started process."""
        if self.proc is None:
            raise RuntimeError(f"{self!r} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True while the started process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has exited (None while running or never started)."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the process, wait, SIGKILL its whole tree; return its exit status."""
        _LIVE.discard(self)
        if self.proc is None:
            return None
        wait = self.stop_timeout if timeout is None else timeout
        self.remember_tree()
        code = kill_tree(self.proc.pid, timeout=wait, popen=self.proc)
        leftovers = [p for p in self._seen.values() if _alive(p)]
        for p in leftovers:
            try:
                p.kill()
            except psutil.Error:
                pass
        _wait_dead(leftovers, 5.0)
        return code

    def __enter__(self: _MP) -> _MP:
        """Return self; leaving the block stops the process tree (subclasses may start)."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _cleanup_all() -> None:
    for mp in list(_LIVE):
        try:
            mp.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _nginx_string(text: str) -> str:
    """Quote ``text`` as an nginx string literal ($ stays a variable reference)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class NginxBackend(_ManagedProcess):
    """Debian's nginx on a free 127.0.0.1 port answering every request with a fixed body.

    ``NginxBackend(tmp_path, body="chaoge_www_121")`` answers ``chaoge_www_121\\n`` (200,
    ``text/plain``, plus ``X-Backend: <name>``). ``server_directives`` is inserted into the
    default ``server {}`` (e.g. extra ``location`` blocks, which take precedence over the
    catch-all ``location /`` only when more specific); ``extra_servers`` is inserted into the
    ``http {}`` block (e.g. whole ``server {}`` blocks on other ports).
    """

    def __init__(
        self,
        tmp_path: Path | str,
        body: str = "ok",
        *,
        status: int = 200,
        name: str | None = None,
        port: int | None = None,
        server_directives: str = "",
        extra_servers: str = "",
    ) -> None:
        self._port = port if port is not None else free_port()
        self.name = name or f"nginx-{self._port}"
        super().__init__(_unique_dir(Path(tmp_path), self.name))
        self.body = body
        self.status = status
        self.server_directives = server_directives
        self.extra_servers = extra_servers
        self.conf_path = self.workdir / "conf" / "nginx.conf"
        self.pid_path = self.workdir / "logs" / "nginx.pid"
        self.error_log_path = self.workdir / "logs" / "error.log"

    def __repr__(self) -> str:
        return f"<NginxBackend {self.name} 127.0.0.1:{self._port}>"

    @property
    def port(self) -> int:
        """The port nginx listens on (known before start)."""
        return self._port

    def config_text(self) -> str:
        """The nginx.conf this backend runs with."""
        w = self.workdir
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {w}/temp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""\
daemon off;
master_process on;
worker_processes 1;
{user}pid {self.pid_path};
error_log {self.error_log_path} info;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000;
{temp}

    server {{
        listen 127.0.0.1:{self._port};
        server_name _;
        add_header X-Backend {_nginx_string(self.name)} always;

        location / {{
            return {self.status} {_nginx_string(self.body + chr(10))};
        }}
{self.server_directives}
    }}
{self.extra_servers}
}}
"""

    def diagnostics(self) -> str:
        return (
            f"{super().diagnostics()}\n--- error log ({self.error_log_path}):\n"
            f"{_read_text(self.error_log_path)}\n--- config:\n{self.config_text()}"
        )

    def __enter__(self) -> NginxBackend:
        """Start (unless already running) and return self."""
        if not self.running:
            self.start()
        return self

    def start(self, timeout: float = 10.0) -> NginxBackend:
        """Write the config, start nginx in the foreground and wait for its port."""
        if not os.access(NGINX_BIN, os.X_OK):
            raise RuntimeError(
                f"nginx binary {NGINX_BIN} not found or not executable: the end-to-end tests "
                "need Debian's nginx (apt-get install nginx-light or nginx) or FORKLB_TEST_NGINX"
            )
        for sub in ("conf", "logs", "temp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.conf_path.write_text(self.config_text())
        self._spawn(
            [
                NGINX_BIN,
                "-p",
                f"{self.workdir}/",
                "-c",
                str(self.conf_path),
                "-e",
                str(self.error_log_path),
            ]
        )
        self._wait_ready([self._port], timeout)
        return self

    def worker_pids(self) -> list[int]:
        """Pids of nginx worker processes (children of the master)."""
        if not self.running:
            return []
        self.remember_tree()
        return _child_pids_matching(self.pid, "worker process")

    def error_log(self) -> str:
        """Contents of nginx's error log."""
        return _read_text(self.error_log_path)


class PyBackend(_ManagedProcess):
    """``tests/backend_server.py`` (ThreadingHTTPServer, HTTP/1.1) on a free port.

    Modes: ``"echo"`` answers a JSON description of the request (see backend_server.py);
    ``"name"`` answers ``body + "\\n"`` (``body`` defaults to ``name``). Every response
    carries ``X-Backend: <name>``. Query parameters ``__status``, ``__delay``, ``__size``,
    ``__chunked`` and ``__close`` tweak individual responses.
    """

    def __init__(
        self,
        tmp_path: Path | str,
        mode: str = "echo",
        *,
        name: str | None = None,
        body: str | None = None,
        status: int = 200,
        port: int | None = None,
    ) -> None:
        if mode not in ("echo", "name"):
            raise ValueError(f"unknown PyBackend mode {mode!r}")
        self._port = port if port is not None else free_port()
        self.name = name or f"py-{self._port}"
        super().__init__(_unique_dir(Path(tmp_path), self.name))
        self.mode = mode
        self.body = self.name if body is None else body
        self.status = status

    def __repr__(self) -> str:
        return f"<PyBackend {self.name} mode={self.mode} 127.0.0.1:{self._port}>"

    @property
    def port(self) -> int:
        """The port the backend listens on (known before start)."""
        return self._port

    def __enter__(self) -> PyBackend:
        """Start (unless already running) and return self."""
        if not self.running:
            self.start()
        return self

    def start(self, timeout: float = 10.0) -> PyBackend:
        """Start the backend server and wait for its port."""
        self._spawn(
            [
                sys.executable,
                "-u",
                str(BACKEND_SCRIPT),
                "--port",
                str(self._port),
                "--mode",
                self.mode,
                "--name",
                self.name,
                "--body",
                self.body,
                "--status",
                str(self.status),
            ]
        )
        self._wait_ready([self._port], timeout)
        return self


def _cmdline_text(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) + " " + proc.name()
    except psutil.Error:
        return ""


def _child_pids_matching(pid: int, needle: str) -> list[int]:
    """Pids of live direct children of ``pid`` whose cmdline/title contains ``needle``."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    return sorted(c.pid for c in children if _alive(c) and needle in _cmdline_text(c))


class ForkLB(_ManagedProcess):
    """``python -m forklb`` run in the foreground with its own prefix directory.

    ``ForkLB(tmp_path, conf_text)`` creates ``tmp_path/<name>/`` as prefix, writes
    ``conf/forklb.conf`` there (copying the repo's ``conf/mime.types`` when the config
    mentions it) and runs with cwd = prefix and ``PYTHONPATH`` = repo root.
    """

    def __init__(
        self,
        tmp_path: Path | str,
        conf_text: str,
        *,
        name: str = "forklb",
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(_unique_dir(Path(tmp_path), name))
        self.name = name
        self.prefix = self.workdir
        self.conf_path = self.prefix / "conf" / "forklb.conf"
        self.pid_path = self.prefix / "logs" / "forklb.pid"
        self.error_log_path = self.prefix / "logs" / "error.log"
        self.extra_env = dict(env or {})
        self.write_conf(conf_text)

    def __repr__(self) -> str:
        return f"<ForkLB {self.prefix}>"

    # -- files
    def write_conf(self, text: str) -> None:
        """(Re)write ``conf/forklb.conf``; copy the repo's mime.types if referenced."""
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(text)
        mime = REPO_ROOT / "conf" / "mime.types"
        if "mime.types" in text and mime.is_file():
            shutil.copyfile(mime, self.conf_path.parent / "mime.types")

    def path(self, relative: str) -> Path:
        """A path inside the prefix."""
        return self.prefix / relative

    def error_log(self) -> str:
        """Contents of ``logs/error.log`` ("" if missing)."""
        return _read_text(self.error_log_path)

    def stdout(self) -> str:
        """Captured stdout of the master."""
        return _read_text(self.stdout_path)

    def stderr(self) -> str:
        """Captured stderr of the master."""
        return _read_text(self.stderr_path)

    def read_pid_file(self) -> int | None:
        """Pid in ``logs/forklb.pid``, or None if missing/empty."""
        text = _read_text(self.pid_path).strip()
        return int(text) if text.isdigit() else None

    def diagnostics(self) -> str:
        return (
            f"{super().diagnostics()}\n--- error log ({self.error_log_path}):\n"
            f"{self.error_log()}\n--- config ({self.conf_path}):\n"
            f"{_read_text(self.conf_path)}"
        )

    # -- processes
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
        env.update(self.extra_env)
        return env

    def argv(self, *args: str) -> list[str]:
        """Command line ``python -m forklb -p PREFIX -c CONF *args``."""
        return [
            sys.executable,
            "-m",
            "forklb",
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf_path),
            *args,
        ]

    def start(
        self,
        wait_ports: Iterable[int] = (),
        timeout: float = 10.0,
        workers: int | None = None,
    ) -> ForkLB:
        """Spawn the master; wait for ``wait_ports`` (and ``workers`` worker processes).

        Raises ``AssertionError`` with captured stderr and the error log if the master
        exits early or does not become ready in time.
        """
        self._spawn(self.argv(), env=self._env())
        self._wait_ready(wait_ports, timeout)
        if workers is not None:
            try:
                self.wait_workers(workers, timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m forklb -p PREFIX -c CONF *args`` and capture text output."""
        return subprocess.run(
            self.argv(*args),
            cwd=self.prefix,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def master_pid(self) -> int:
        """Pid of the master (the process we started)."""
        return self.pid

    def worker_pids(self) -> list[int]:
        """Pids of live children of the master whose title contains ``worker process``."""
        if not self.running:
            return []
        self.remember_tree()
        return _child_pids_matching(self.pid, "worker process")

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[int]:
        """Wait until exactly ``count`` workers exist and return their pids."""
        found: list[int] = []

        def done() -> bool:
            found[:] = self.worker_pids()
            return len(found) == count

        wait_for(
            done,
            timeout,
            message=lambda: f"expected {count} workers, have {found}\n{self.diagnostics()}",
        )
        return found

    def wait_workers_replaced(
        self, old: Iterable[int], count: int, timeout: float = 10.0
    ) -> list[int]:
        """After a reload: wait until none of ``old`` is alive and ``count`` new workers run."""
        old_set = set(old)
        found: list[int] = []

        def done() -> bool:
            found[:] = self.worker_pids()
            if any(pid_alive(p) for p in old_set):
                return False
            return len(found) == count and not old_set & set(found)

        wait_for(
            done,
            timeout,
            message=lambda: f"old workers {sorted(old_set)} -> now {found}",
        )
        return found


# --------------------------------------------------------------------------- in-process backends


class SocketBackend:
    """A raw-socket backend served by threads of this process until :meth:`stop`.

    It listens on ``address:port`` (default: 127.0.0.1 and a port the kernel picks; the
    port is in ``self.port``).  A daemon thread accepts, with a 0.05 s accept timeout so
    that ``stop()`` is prompt, and hands each connection to :meth:`serve`: in the accept
    thread, one connection at a time, or with ``threaded = True`` in a daemon thread of
    its own.  A connection is closed once ``serve`` returns (``serve`` may close it
    earlier itself).  The accept loop starts in ``__init__``, so subclasses set their own
    attributes before calling ``super().__init__()``.
    """

    threaded = False
    backlog = 128

    def __init__(self, address: str = LOCALHOST, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(self.backlog)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has been called."""
        return self._stop.is_set()

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Serve one accepted connection from ``addr`` (the client's address)."""
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.threaded:
                threading.Thread(target=self._serve_and_close, args=(conn, addr),
                                 daemon=True).start()
            else:
                self._serve_and_close(conn, addr)

    def _serve_and_close(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            self.serve(conn, addr)
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop accepting (connections being served run on) and close the listener."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class HangupBackend(SocketBackend):
    """A backend that accepts, reads the request and hangs up without answering.

    With ``reset`` (default) it closes with RST (SO_LINGER 0), otherwise with FIN.
    ``accepts`` holds the ``time.monotonic()`` of every accepted connection and
    ``requests`` counts those that sent bytes.  One connection at a time.
    """

    def __init__(self, reset: bool = True) -> None:
        self.reset = reset
        self.accepts: list[float] = []
        self.requests = 0
        super().__init__()

    def serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        self.accepts.append(time.monotonic())
        conn.settimeout(1.0)
        try:
            if conn.recv(65536):
                self.requests += 1
        except OSError:
            pass
        if self.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


__all__ = [
    "BACKEND_SCRIPT",
    "NGINX_BIN",
    "REPO_ROOT",
    "ForkLB",
    "HangupBackend",
    "HttpClient",
    "HttpProtocolError",
    "NginxBackend",
    "PyBackend",
    "Response",
    "SocketBackend",
    "build_request",
    "free_port",
    "http_request",
    "kill_tree",
    "pid_alive",
    "port_is_open",
    "proxy_block",
    "proxy_conf",
    "raw_exchange",
    "wait_for",
    "wait_port",
    "wait_port_closed",
]
