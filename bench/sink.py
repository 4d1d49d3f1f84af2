"""Upload sink backend: reads whole request bodies, throws them away, answers 200.

    python -m bench.sink PORT [PORT...]

It exists because nginx's ``return 200`` answers before the body has arrived (and then
discards it while the proxy is still streaming), which would measure early-response
handling instead of upload throughput. This sink answers only once the last byte of the
body is in, so a client's upload time covers the whole transfer through the proxy.

Bodies are moved with ``os.splice`` socket -> pipe -> /dev/null (no copy into Python);
one thread per connection; HTTP/1.1 keep-alive; ``Content-Length`` and chunked bodies.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Conn:
    """One client connection: a byte buffer in front of the socket, and a splice pipe."""

    def __init__(self, sock: socket.socket, devnull: int) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.devnull = devnull
        self.pipe_r, self.pipe_w = os.pipe()
        try:
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default 64 KiB pipe still works, only with more syscalls

    def close(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        self.sock.close()

    def fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def line(self) -> bytes | None:
        while b"\n" not in self.buf:
            if not self.fill():
                return None
        idx = self.buf.index(b"\n")
        out = bytes(self.buf[: idx + 1])
        del self.buf[: idx + 1]
        return out

    def discard(self, n: int) -> bool:
        """Drop exactly ``n`` body bytes: first from the buffer, then spliced to /dev/null."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        fd = self.sock.fileno()
        while n:
            got = os.splice(fd, self.pipe_w, min(n, PIPE_SIZE))
            if not got:
                return False
            left = got
            while left:
                left -= os.splice(self.pipe_r, self.devnull, left)
            n -= got
        return True

    def discard_chunked(self) -> bool:
        while True:
            size_line = self.line()
            if size_line is None:
                return False
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := self.line()) not in (b"\r\n", b"\n"):
                    if trailer is None:
                        return False
                return True
            if not self.discard(size + 2):  # chunk data and its CRLF
                return False


def serve_connection(sock: socket.socket, devnull: int) -> None:
    """Serve requests on ``sock`` until the peer closes or asks to."""
    conn = _Conn(sock, devnull)
    try:
        while True:
            request_line = conn.line()
            if not request_line:
                return
            length, chunked, close = 0, False, False
            while (line := conn.line()) not in (b"\r\n", b"\n"):
                if line is None:
                    return
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = value.endswith(b"chunked")
                elif name == b"connection":
                    close = value == b"close"
            done = conn.discard_chunked() if chunked else conn.discard(length)
            if not done:
                return
            conn.sock.sendall(RESPONSE)
            if close:
                return
    except (OSError, ValueError):
        return
    finally:
        conn.close()


def serve(ports: list[int]) -> None:
    """Listen on 127.0.0.1 at each port; one thread per accepted connection."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    listeners = []
    for port in ports:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", port))
        lsock.listen(1024)
        listeners.append(lsock)

    def accept_loop(lsock: socket.socket) -> None:
        while True:
            sock, _ = lsock.accept()
            threading.Thread(target=serve_connection, args=(sock, devnull), daemon=True).start()

    threads = [threading.Thread(target=accept_loop, args=(ls,), daemon=True) for ls in listeners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    serve([int(p) for p in sys.argv[1:]])
