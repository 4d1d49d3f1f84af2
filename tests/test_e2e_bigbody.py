"""1 GiB up and down through one forklb worker, Content-Length and chunked.

The backend (a thread here) discards uploads while counting them and generates
downloads from a repeated 1 MiB block, so neither end buffers a body; the client
checks byte counts and a CRC32 of the download. A sampler reads the worker's RSS
every 0.1 s during each transfer: it must stay under 100 MB (forklb streams; it
holds at most one recv worth per direction).
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import psutil
import pytest
from harness import ForkLB, SocketBackend, free_port

GIB = 1 << 30
BLOCK = random.Random(7).randbytes(1 << 20)
RSS_LIMIT = 100 * 1000 * 1000


def _crc_of_stream(size: int) -> int:
    crc = 0
    for _ in range(size // len(BLOCK)):
        crc = zlib.crc32(BLOCK, crc)
    return crc


class _Reader:
    """Buffered reads on a socket for the chunked decoders on both ends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("peer closed")
        self.buf += data

    def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self.fill()
        out = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return out

    def head(self) -> bytes:
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            self.fill()
        out = bytes(self.buf[:i])
        del self.buf[:i + 4]
        return out

    def body(self, length: int | None, on_data) -> None:
        """Pass a Content-Length (``length``) or chunked (None) body to ``on_data``."""
        if length is not None:
            self._exact(length, on_data)
            return
        while True:
            size = int(self.line().split(b";")[0], 16)
            if not size:
                while self.line():
                    pass
                return
            self._exact(size, on_data)
            if self.line():
                raise ValueError("no CRLF after chunk data")

    def _exact(self, n: int, on_data) -> None:
        if self.buf:
            take = bytes(self.buf[:n])
            del self.buf[:n]
            n -= len(take)
            on_data(take)
        while n:
            data = self.sock.recv(min(n, 1 << 20))
            if not data:
                raise ConnectionError("peer closed mid-body")
            n -= len(data)
            on_data(data)


def _framing(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None  # chunked (the only other framing used here)


class StreamBackend(SocketBackend):
    """POST: count and discard the body, answer {"received": N}.
    GET /N[c]: N bytes of BLOCKs, Content-Length framed (chunked with the ``c``)."""

    threaded = True

    def serve(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        reader = _Reader(sock)
        try:
            while True:
                head = reader.head()
                method, target = head.split(b" ")[:2]
                if method == b"POST":
                    received = 0

                    def count(data: bytes) -> None:
                        nonlocal received
                        received += len(data)

                    reader.body(_framing(head), count)
                    body = json.dumps({"received": received}).encode()
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                else:
                    self._download(sock, target[1:])
        except (OSError, ValueError):
            pass

    def _download(self, sock: socket.socket, spec: bytes) -> None:
        chunked = spec.endswith(b"c")
        size = int(spec.rstrip(b"c"))
        if chunked:
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            frame = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK)
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            frame = BLOCK
        for _ in range(size // len(BLOCK)):
            sock.sendall(frame)
        if chunked:
            sock.sendall(b"0\r\n\r\n")


class RssSampler:
    """Peak RSS of some processes, sampled by a thread every 0.1 s."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak = {pid: 0 for pid in pids}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.1):
            for proc in self.procs:
                self.peak[proc.pid] = max(self.peak[proc.pid], proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


CONF = """
worker_processes 1;
events {{ }}
http {{
    access_log off;
    client_max_body_size 0;
    upstream big {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://big; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[tuple[ForkLB, int]]:
    backend = StreamBackend()
    port = free_port()
    lb = ForkLB(tmp_path_factory.mktemp("bigbody"), CONF.format(backend=backend.port, port=port))
    try:
        lb.start(wait_ports=[port], workers=1)
        yield lb, port
    finally:
        lb.stop()
        backend.stop()


def _upload(port: int, chunked: bool) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % GIB
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n\r\n")
        frame = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK) if chunked else BLOCK
        for _ in range(GIB // len(BLOCK)):
            sock.sendall(frame)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        reader = _Reader(sock)
        head = reader.head()
        assert head.startswith(b"HTTP/1.1 200 "), head
        body = bytearray()
        reader.body(_framing(head), body.extend)
        return json.loads(body)["received"]


def _download(port: int, chunked: bool) -> tuple[int, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /%d%s HTTP/1.1\r\nHost: a\r\n\r\n" % (GIB, b"c" if chunked else b""))
        reader = _Reader(sock)
        head = reader.head()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert (_framing(head) is None) == chunked
        count = crc = 0

        def take(data: bytes) -> None:
            nonlocal count, crc
            count += len(data)
            crc = zlib.crc32(data, crc)

        reader.body(_framing(head), take)
        return count, crc


@pytest.mark.timeout(600)
@pytest.mark.parametrize("direction, chunked", [
    ("up", False), ("up", True), ("down", False), ("down", True),
])
def test_one_gib_streams_through_a_worker_in_bounded_memory(setup, direction, chunked):
    lb, port = setup
    (worker,) = lb.worker_pids()
    start = time.monotonic()
    with RssSampler([worker]) as rss:
        if direction == "up":
            assert _upload(port, chunked) == GIB
        else:
            assert _download(port, chunked) == (GIB, _crc_of_stream(GIB))
    took = time.monotonic() - start
    print(f"\n1 GiB {direction} {'chunked' if chunked else 'length'}: {took:.1f} s, "
          f"{GIB / took / 1e6:.0f} MB/s, worker peak RSS {rss.peak[worker] / 1e6:.1f} MB")
    assert rss.peak[worker] and rss.peak[worker] < RSS_LIMIT, rss.peak
    assert took < 120, f"1 GiB took {took:.0f} s"
